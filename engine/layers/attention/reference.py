"""The PyTorch reference attention backend: the CPU path, and the oracle the Triton backend is tested against.

Causal attention over the paged KV cache. The model hands over q/k/v for the step's tokens; where they are
cached and which earlier tokens they see comes only from the ForwardContext. Prefill chunks gather each
sequence's context and call SDPA with an explicit mask (the score matrix is [heads, QUERY_BLOCK, context]:
fine on CPU, what the Triton backend exists to avoid on a GPU); steps whose sequences each bring one token
gather all of them into one padded batch. Storing K/V is store.store_kv_reference.
"""

import torch
import torch.nn.functional as F

from engine.forward_context import ForwardContext
from engine.layers.attention.backend import AttentionBackend
from engine.layers.attention.store import store_kv_reference

QUERY_BLOCK = 1024
DECODE_GATHER_ROWS = 1 << 26    # elements of K (and as many of V) gathered at once for batched decode


class ReferenceBackend(AttentionBackend):
    name = "reference"

    def graph_safe(self, fp8_kv: bool) -> bool:
        return not fp8_kv             # the fp8 store's torch.unique has data-dependent shapes

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int,
                scale: float) -> torch.Tensor:
        if ctx.kv_caches is None:
            return self_attention(q, k, v, ctx, scale)
        k_cache, v_cache, *scales = ctx.kv_caches[layer_idx]       # + (k_scale, v_scale) for an fp8 cache
        k_scale, v_scale = scales or (None, None)
        store_kv_reference(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
        qlens = ctx.query_lens_cpu or (ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]).tolist()
        if len(qlens) == q.shape[0]:                                # every sequence brings one token
            max_len = ctx.max_seq_len or max(ctx.seq_lens_cpu or ctx.seq_lens.tolist())
            return decode_attention(q, k_cache, v_cache, ctx, max_len, k_scale, v_scale, scale)
        slens = ctx.seq_lens_cpu or ctx.seq_lens.tolist()
        out = torch.empty_like(q)
        start = 0
        for i, (ql, sl) in enumerate(zip(qlens, slens)):
            ki = gather(k_cache, ctx.block_tables[i], sl, k_scale, q.dtype).transpose(0, 1)[None]
            vi = gather(v_cache, ctx.block_tables[i], sl, v_scale, q.dtype).transpose(0, 1)[None]
            out[start:start + ql] = _causal(q[start:start + ql], ki, vi, sl, scale)
            start += ql
        return out


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext,
                   scale: float) -> torch.Tensor:
    """No cache (`ctx.kv_caches is None`): each sequence attends causally to its own tokens of this step."""
    qlens = ctx.query_lens_cpu or (ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]).tolist()
    out = torch.empty_like(q)
    start = 0
    for ql in qlens:
        s = slice(start, start + ql)
        out[s] = _causal(q[s], k[s].transpose(0, 1)[None], v[s].transpose(0, 1)[None], ql, scale)
        start += ql
    return out


def _causal(q: torch.Tensor, ki: torch.Tensor, vi: torch.Tensor, sl: int, scale: float) -> torch.Tensor:
    """q [ql, heads, d], the sequence's last ql tokens; ki, vi [1, kv_heads, >= sl, d] its keys/values.
    Query j sits at context position sl - ql + j and sees keys 0..that position. Long prefills are split
    into query blocks so the score matrix stays [heads, QUERY_BLOCK, sl]. Inputs are 4-D ([1, heads, len,
    d]): 3-D ones take PyTorch's slow math kernel on CPU."""
    ql = q.shape[0]
    out = torch.empty_like(q)
    for lo in range(0, ql, QUERY_BLOCK):
        hi = min(lo + QUERY_BLOCK, ql)
        last = sl - ql + hi                     # keys past the block's last query are never visible
        mask = None
        if hi - lo > 1:                         # a single query sees every key up to itself: no mask
            qpos = torch.arange(last - (hi - lo), last, device=q.device)[:, None]
            mask = torch.arange(last, device=q.device)[None, :] <= qpos
        o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None], ki[:, :, :last], vi[:, :, :last],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        out[lo:hi] = o[0].transpose(0, 1)
    return out


def gather(cache: torch.Tensor, block_table: torch.Tensor, length: int, scale: torch.Tensor | None = None,
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
    blocks = cache.view(torch.uint8)[ids].view(cache.dtype).to(dtype) * scale[ids].to(dtype)[:, :, None, :, None]
    return blocks.flatten(1, 2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: ForwardContext,
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
