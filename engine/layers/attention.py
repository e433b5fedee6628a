"""Causal attention for the decoder over the paged KV cache; bidirectional per-image attention for vision.

This file is the pure-PyTorch reference path: it runs on CPU and defines what a fused GPU kernel must
reproduce. The model hands over q/k/v for the step's tokens; where they are cached and which earlier tokens
they see comes only from the ForwardContext.
"""

import torch
import torch.nn.functional as F

from engine.forward_context import ForwardContext

QUERY_BLOCK = 1024


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's K/V rows ([tokens, kv_heads, head_dim]) into their cache slots.
    Slots < 0 mark padding rows (e.g. CUDA-graph padding) and are not written."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    n_blocks = -(-length // block_size)
    return cache[block_table[:n_blocks].long()].flatten(0, 1)[:length]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                     layer_idx: int, scale: float) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d] for this step. Returns [tokens, heads, d].

    Each query at context position p attends to key positions 0..p of its own sequence: the cached prefix
    (seq_len - query_len tokens) plus this step's tokens up to itself.
    """
    if ctx.kv_caches is not None:
        k_cache, v_cache = ctx.kv_caches[layer_idx]
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    qlens = ctx.query_lens_cpu or (ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]).tolist()
    slens = ctx.seq_lens_cpu or ctx.seq_lens.tolist()
    out = torch.empty_like(q)
    start = 0
    for i, (ql, sl) in enumerate(zip(qlens, slens)):
        if ctx.kv_caches is not None:
            ki = _gather(k_cache, ctx.block_tables[i], sl).transpose(0, 1)
            vi = _gather(v_cache, ctx.block_tables[i], sl).transpose(0, 1)
        else:
            ki, vi = k[start:start + ql].transpose(0, 1), v[start:start + ql].transpose(0, 1)
        # query j sits at context position sl - ql + j and sees keys 0..that position. Long prefills are
        # split into query blocks so the score matrix stays [heads, QUERY_BLOCK, sl].
        for lo in range(0, ql, QUERY_BLOCK):
            hi = min(lo + QUERY_BLOCK, ql)
            last = sl - ql + hi                     # keys past the block's last query are never visible
            qpos = torch.arange(last - (hi - lo), last, device=q.device)[:, None]
            mask = torch.arange(last, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(q[start + lo:start + hi].transpose(0, 1), ki[:, :last],
                                               vi[:, :last], attn_mask=mask, scale=scale, enable_gqa=True)
            out[start + lo:start + hi] = o.transpose(0, 1)
        start += ql
    return out


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int],
                      scale: float) -> torch.Tensor:
    """Bidirectional attention within each segment (one image each) of a concatenated sequence.

    Images never see each other, and no [N, N] mask over all images is ever built: the cost is the sum of
    per-image attention, not the square of the total patch count.
    """
    out = torch.empty_like(q)
    start = 0
    for n in lens:
        s = slice(start, start + n)
        o = F.scaled_dot_product_attention(q[s].transpose(0, 1), k[s].transpose(0, 1), v[s].transpose(0, 1),
                                           scale=scale)
        out[s] = o.transpose(0, 1)
        start += n
    return out
