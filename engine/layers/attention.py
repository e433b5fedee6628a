"""Causal attention for the decoder over the paged KV cache; bidirectional per-image attention for vision.

This file is the pure-PyTorch reference path: it runs on CPU and defines what a fused GPU kernel must
reproduce. On CUDA, decode steps (one token per sequence) take the Triton paged kernel instead
(paged_attention.py), which reads the cache in place. The model hands over q/k/v for the step's tokens; where they are cached and which earlier tokens
they see comes only from the ForwardContext.

KV cache in fp8 (`kv_cache_dtype="fp8"`): a layer's cache entry is (k, v, k_scale, v_scale), the pools in
float8_e4m3fn and one float32 scale per (block, KV head) beside them: [blocks, kv_heads]. A scale is the
largest |value| stored in that block and head / 448, so every row uses fp8's full range; a per-tensor
static scale would not survive outlier heads or tokens. Blocks fill one step at a time, so when a step
brings a larger value the block's earlier rows are re-quantized to the grown scale (a block that holds 16
tokens is rescaled at most a few times; an unchanged scale re-quantizes exactly). A step that writes a
block's first slot starts it afresh: whatever the block held before belonged to a freed request.
"""

import torch
import torch.nn.functional as F

from engine.forward_context import ForwardContext
from engine.layers import paged_attention
from engine.quant import FP8, FP8_MAX

QUERY_BLOCK = 1024
DECODE_GATHER_ROWS = 1 << 26    # elements of K (and as many of V) gathered at once for batched decode


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """Scatter the step's K/V rows ([tokens, kv_heads, head_dim]) into their cache slots. Every slot must
    be a real one (>= 0): checking on the device would cost a GPU->CPU sync in every layer."""
    if k_scale is not None:
        _store_fp8(k, k_cache, k_scale, slot_mapping)
        _store_fp8(v, v_cache, v_scale, slot_mapping)
        return
    k_cache.view(-1, *k_cache.shape[2:])[slot_mapping] = k
    v_cache.view(-1, *v_cache.shape[2:])[slot_mapping] = v


def _store_fp8(x: torch.Tensor, cache: torch.Tensor, scale: torch.Tensor, slots: torch.Tensor) -> None:
    """x [tokens, kv_heads, d] into cache [blocks, block_size, kv_heads, d] (fp8); scale [blocks, kv_heads]"""
    block_size, heads = cache.shape[1], cache.shape[2]
    raw = cache.view(torch.uint8)       # gathers and scatters on the bytes: not every device indexes fp8
    touched, inv = torch.unique(slots // block_size, return_inverse=True)
    amax = torch.zeros(len(touched), heads, dtype=torch.float32, device=x.device)
    amax.scatter_reduce_(0, inv[:, None].expand(-1, heads), x.abs().amax(-1).float(), "amax")
    fresh = torch.zeros(len(touched), dtype=torch.bool, device=x.device)
    fresh[inv[slots % block_size == 0]] = True
    old = scale[touched].masked_fill(fresh[:, None], 0.0)
    new = torch.maximum(old, amax / FP8_MAX).clamp_min(1e-12)
    rows = raw[touched].view(FP8).float() * (old / new)[:, None, :, None]     # the touched blocks, re-quantized
    raw[touched] = rows.masked_fill(fresh[:, None, None, None], 0.0).to(FP8).view(torch.uint8)
    scale[touched] = new
    q = (x.float() / new[inv][:, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    raw.view(-1, *raw.shape[2:])[slots] = q.view(torch.uint8)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: torch.Tensor | None = None,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """One sequence's first `length` cached rows: [length, kv_heads, d]."""
    n_blocks = -(-length // cache.shape[1])
    return _gather_blocks(cache, block_table[None, :n_blocks], scale, dtype)[0, :length]


def _gather_blocks(cache: torch.Tensor, tables: torch.Tensor, scale: torch.Tensor | None,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """The cached rows of the blocks in `tables` [seqs, n_blocks]: [seqs, n_blocks * block_size, kv_heads, d]."""
    ids = tables.long()
    if scale is None:
        return cache[ids].flatten(1, 2)
    # fp8 -> model dtype is exact; then one multiply by the block's per-head scale
    blocks = cache.view(torch.uint8)[ids].view(FP8).to(dtype) * scale[ids].to(dtype)[:, :, None, :, None]
    return blocks.flatten(1, 2)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                     layer_idx: int, scale: float) -> torch.Tensor:
    """q: [tokens, heads, d]; k, v: [tokens, kv_heads, d] for this step. Returns [tokens, heads, d].

    Each query at context position p attends to key positions 0..p of its own sequence: the cached prefix
    (seq_len - query_len tokens) plus this step's tokens up to itself.
    """
    k_scale = v_scale = None
    if ctx.kv_caches is not None:
        k_cache, v_cache, *scales = ctx.kv_caches[layer_idx]       # + (k_scale, v_scale) for an fp8 cache
        k_scale, v_scale = scales or (None, None)
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
    qlens = ctx.query_lens_cpu or (ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]).tolist()
    if ctx.kv_caches is not None and len(qlens) == q.shape[0]:      # every sequence brings one token
        max_len = ctx.max_seq_len or max(ctx.seq_lens_cpu or ctx.seq_lens.tolist())
        if use_triton_decode(q, k_scale is not None):
            return paged_attention.decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.seq_lens,
                                                    max_len, scale, k_scale, v_scale)
        return _decode_attention(q, k_cache, v_cache, ctx, max_len, k_scale, v_scale, scale)
    slens = ctx.seq_lens_cpu or ctx.seq_lens.tolist()
    out = torch.empty_like(q)
    start = 0
    for i, (ql, sl) in enumerate(zip(qlens, slens)):
        if ctx.kv_caches is not None:
            ki = _gather(k_cache, ctx.block_tables[i], sl, k_scale, q.dtype).transpose(0, 1)[None]
            vi = _gather(v_cache, ctx.block_tables[i], sl, v_scale, q.dtype).transpose(0, 1)[None]
        else:
            ki, vi = k[start:start + ql].transpose(0, 1)[None], v[start:start + ql].transpose(0, 1)[None]
        # query j sits at context position sl - ql + j and sees keys 0..that position. Long prefills are
        # split into query blocks so the score matrix stays [heads, QUERY_BLOCK, sl]. Inputs are 4-D
        # ([1, heads, len, d]): 3-D ones take PyTorch's slow math kernel on CPU.
        for lo in range(0, ql, QUERY_BLOCK):
            hi = min(lo + QUERY_BLOCK, ql)
            last = sl - ql + hi                     # keys past the block's last query are never visible
            mask = None
            if hi - lo > 1:                         # a single query sees every key up to itself: no mask
                qpos = torch.arange(last - (hi - lo), last, device=q.device)[:, None]
                mask = torch.arange(last, device=q.device)[None, :] <= qpos
            o = F.scaled_dot_product_attention(q[start + lo:start + hi].transpose(0, 1)[None], ki[:, :, :last],
                                               vi[:, :, :last], attn_mask=mask, scale=scale, enable_gqa=True)
            out[start + lo:start + hi] = o[0].transpose(0, 1)
        start += ql
    return out


def use_triton_decode(q: torch.Tensor, fp8_cache: bool) -> bool:
    """Decode steps on CUDA take the Triton paged kernel (engine/layers/paged_attention.py); Triton reads
    float8_e4m3fn only from compute capability 8.9 on, so older GPUs keep the reference path for fp8 KV."""
    if q.device.type != "cuda" or not paged_attention.available():
        return False
    return not fp8_cache or torch.cuda.get_device_capability(q.device) >= (8, 9)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext,
                      max_len: int, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                      scale: float) -> torch.Tensor:
    """One query per sequence, all sequences at once: their blocks gathered into one zero-padded
    [seqs, kv_heads, keys, d] batch, the padding masked by `seq_lens`. Fixed launches per layer whatever the
    batch size, and no host sync. Sequences go in groups so the gathered copy stays bounded."""
    n, block_size = q.shape[0], k_cache.shape[1]
    n_blocks = -(-max_len // block_size)
    tables = ctx.block_tables[:, :n_blocks]
    keys = n_blocks * block_size
    valid = torch.arange(keys, device=q.device)[None, :] < ctx.seq_lens[:, None]           # [seqs, keys]
    out = torch.empty_like(q)
    group = max(1, DECODE_GATHER_ROWS // (keys * k_cache.shape[2] * k_cache.shape[3]))
    for lo in range(0, n, group):
        hi = min(n, lo + group)
        # Rows past a sequence's length hold whatever their block held before (or another request's rows,
        # for padding entries of the table). Masked scores get weight 0, but 0 * NaN is NaN: zero them.
        ok = valid[lo:hi, :, None, None]
        ki = torch.where(ok, _gather_blocks(k_cache, tables[lo:hi], k_scale, q.dtype), 0).transpose(1, 2)
        vi = torch.where(ok, _gather_blocks(v_cache, tables[lo:hi], v_scale, q.dtype), 0).transpose(1, 2)
        o = F.scaled_dot_product_attention(q[lo:hi, :, None], ki, vi, attn_mask=valid[lo:hi, None, None, :],
                                           scale=scale, enable_gqa=True)
        out[lo:hi] = o[:, :, 0]
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
        o = F.scaled_dot_product_attention(q[s].transpose(0, 1)[None], k[s].transpose(0, 1)[None],
                                           v[s].transpose(0, 1)[None], scale=scale)
        out[s] = o[0].transpose(0, 1)
        start += n
    return out
