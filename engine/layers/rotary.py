"""Rotary position embeddings in the rotate-half layout of the HF checkpoint.

Native (consolidated) q/k weights use interleaved pairs; the loader permutes them into this layout once,
so the model has a single RoPE convention.
"""

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _inv_freq(head_dim: int, theta: float, device) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))


def rope_1d(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Text RoPE. Angles are computed in float32 (θ = 1e9 at 128k positions needs it) and cast afterwards."""
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
