"""The SwiGLU feed-forward block of the decoder and the vision encoder: down(silu(gate(x)) * up(x)), with
gate and up as one merged projection (one GEMM) and silu·mul as one Triton kernel on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import Linear
from engine.layers.triton_support import tl, triton


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = Linear(hidden, [intermediate, intermediate], ("gate_proj", "up_proj"))
        self.down_proj = Linear(intermediate, [hidden])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_up_proj(x)))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate then up) -> silu(gate) * up [..., I]."""
    if gate_up.is_cuda and triton is not None:
        return silu_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(x_ptr, out_ptr, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < n_cols
        gate = tl.load(x_ptr + row * 2 * n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * n_cols + n_cols + cols, mask=ok, other=0.0).to(tl.float32)
        out = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=ok)


SILU_BLOCK = 1024


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    n = gate_up.shape[-1] // 2
    x = gate_up.reshape(-1, 2 * n).contiguous()
    out = torch.empty(*gate_up.shape[:-1], n, dtype=gate_up.dtype, device=gate_up.device)
    if x.shape[0]:
        _silu_mul_kernel[(x.shape[0], triton.cdiv(n, SILU_BLOCK))](x, out, n, BLOCK=SILU_BLOCK, num_warps=4)
    return out
