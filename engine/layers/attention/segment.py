"""Bidirectional attention within each image of the vision encoder's concatenated patch sequence."""

import torch
import torch.nn.functional as F


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
                      scale: float) -> torch.Tensor:
    """q, k, v [patches, heads, d]; `lens` the patch count of each image, in order.

    Images never see each other, and no [N, N] mask over all images is ever built: the cost is the sum of
    per-image attention, not the square of the total patch count. Without a mask SDPA takes its fused
    (flash / memory-efficient) kernels on a GPU.
    """
    out = torch.empty_like(q)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[s].transpose(0, 1)[None], k[s].transpose(0, 1)[None],
                                           v[s].transpose(0, 1)[None], scale=scale)
        out[s] = o[0].transpose(0, 1)
        start += n
    return out
