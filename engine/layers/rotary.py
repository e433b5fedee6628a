"""Rotary position embeddings in the rotate-half layout of the HF checkpoint.

Native (consolidated) q/k weights use interleaved pairs; the loader permutes them into this layout once,
so the model has a single RoPE convention.

Text: `RotaryEmbedding` computes the cos/sin table of every position once per model (device, dtype) and a
step only gathers its positions' rows ([tokens, head_dim / 2] each, shared by all layers);
`apply_rotary_qk` turns q and k with them, in place in one Triton kernel on CUDA. Angles are computed in
float32 (θ = 1e9 at 128k positions needs it) and cast afterwards, exactly as `rope_1d` does per position.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.triton_support import tl, triton


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))


def rope_1d(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Text RoPE of the given positions: cos, sin [tokens, head_dim]."""
    freqs = positions.float()[:, None] * _inv_freq(head_dim, theta, positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rope_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Pixtral's axial RoPE: the first half of the rotated pairs turns with the patch row, the second half
    with the patch column, using alternate frequencies of one 1-D table."""
    inv = _inv_freq(head_dim, theta, rows.device)
    freqs = torch.cat((rows.float()[:, None] * inv[None, 0::2], cols.float()[:, None] * inv[None, 1::2]), dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryEmbedding(nn.Module):
    """The text RoPE table: cos, sin [max_positions, head_dim / 2] in the model dtype, built on first use."""

    def __init__(self, head_dim: int, theta: float, max_positions: int):
        super().__init__()
        self.head_dim, self.theta, self.max_positions = head_dim, theta, max_positions
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def table(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self._table is None or self._table[0].device != device or self._table[0].dtype != dtype:
            pos = torch.arange(self.max_positions, device=device)
            freqs = pos.float()[:, None] * _inv_freq(self.head_dim, self.theta, device)[None, :]
            self._table = (freqs.cos().to(dtype), freqs.sin().to(dtype))
        return self._table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of `positions` [tokens]: cos, sin [tokens, head_dim / 2]."""
        cos, sin = self.table(positions.device, dtype)
        return cos[positions], sin[positions]


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [tokens, heads, d], k [tokens, kv_heads, d] (token-strided views allowed); cos/sin [tokens, d / 2].
    Returns the turned (q, k): on CUDA the same tensors, turned in place."""
    if q.is_cuda and triton is not None:
        apply_rotary_qk_triton_(q, k, cos, sin)
        return q, k
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


if triton is not None:
    @triton.jit
    def _rotate(x_ptr, stride_x, tok, heads, c, s, HEADS_PAD: tl.constexpr, HALF: tl.constexpr):
        rh = tl.arange(0, HEADS_PAD)
        rj = tl.arange(0, HALF)
        ptr = x_ptr + tok * stride_x + rh[:, None] * (2 * HALF) + rj[None, :]
        ok = (rh < heads)[:, None]
        x1 = tl.load(ptr, mask=ok, other=0.0)
        x2 = tl.load(ptr + HALF, mask=ok, other=0.0)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        tl.store(ptr, (a * c - b * s).to(x1.dtype), mask=ok)
        tl.store(ptr + HALF, (b * c + a * s).to(x1.dtype), mask=ok)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, stride_q, stride_k, heads, kv_heads,
                       Q_PAD: tl.constexpr, K_PAD: tl.constexpr, HALF: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        rj = tl.arange(0, HALF)
        c = tl.load(cos_ptr + tok * HALF + rj).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + tok * HALF + rj).to(tl.float32)[None, :]
        _rotate(q_ptr, stride_q, tok, heads, c, s, Q_PAD, HALF)
        _rotate(k_ptr, stride_k, tok, kv_heads, c, s, K_PAD, HALF)


def rotary_config(heads: int, kv_heads: int, head_dim: int) -> dict:
    """The constexprs of `_rotary_kernel` (tests/kernel_compile.py compiles them)."""
    return {"Q_PAD": triton.next_power_of_2(heads), "K_PAD": triton.next_power_of_2(kv_heads),
            "HALF": head_dim // 2}


def apply_rotary_qk_triton_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    n, heads, d = q.shape
    for x in (q, k):
        assert x.stride(2) == 1 and x.stride(1) == d, "q/k rows must be contiguous per token"
    if n:
        _rotary_kernel[(n,)](q, k, cos.contiguous(), sin.contiguous(), q.stride(0), k.stride(0), heads, k.shape[1],
                             num_warps=4, **rotary_config(heads, k.shape[1], d))
