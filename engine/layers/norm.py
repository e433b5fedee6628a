"""RMSNorm, optionally fused with the residual add that precedes it.

`norm(x)` normalizes; `norm(x, residual)` returns (norm(x + residual), x + residual): the decoder's
pre-norm layers add each block's output to the residual stream and normalize the sum for the next block,
one read of both and one write of both on CUDA (a Triton kernel), where PyTorch would take four passes.
The math is the reference's on every device: the sum rounded to the model dtype, the norm computed in
float32 and cast back before the weight multiply.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.triton_support import tl, triton


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if x.is_cuda and triton is not None:
            return rms_norm_triton(x, self.weight, self.eps, residual)
        return rms_norm_reference(x, self.weight, self.eps, residual)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(dtype)
    return out if residual is None else (out, x)


if triton is not None:
    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_cols, eps, BLOCK: tl.constexpr,
                         HAS_RES: tl.constexpr):
        row = tl.program_id(0).to(tl.int64) * n_cols
        cols = tl.arange(0, BLOCK)
        ok = cols < n_cols
        x = tl.load(x_ptr + row + cols, mask=ok, other=0.0)
        if HAS_RES:
            x = (x.to(tl.float32) + tl.load(res_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(sum_ptr + row + cols, x, mask=ok)
        h = x.to(tl.float32)
        h = (h * tl.rsqrt(tl.sum(h * h, axis=0) / n_cols + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row + cols, (w.to(tl.float32) * h.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


def norm_config(hidden: int) -> dict:
    """The launch parameters of `_rms_norm_kernel` (tests/kernel_compile.py compiles them)."""
    block = triton.next_power_of_2(hidden)
    return {"BLOCK": block, "num_warps": 8 if block >= 4096 else 4}


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n).contiguous()
    rows = x2.shape[0]
    out = torch.empty(shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    total = torch.empty_like(x2) if residual is not None else x2
    res = residual.reshape(-1, n).contiguous() if residual is not None else x2
    if rows:
        _rms_norm_kernel[(rows,)](x2, res, weight, out, total, n, eps, HAS_RES=residual is not None,
                                  **norm_config(n))
    return out if residual is None else (out, total.view(shape))
