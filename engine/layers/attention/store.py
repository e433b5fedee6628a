"""Writing a step's K/V rows into the paged cache: the PyTorch reference and a sync-free Triton kernel.

Pool layout: per layer k, v [blocks, block_size, kv_heads, head_dim]; a slot is block * block_size + offset.

fp8 caches (`kv_cache_dtype="fp8"`): the pools hold float8_e4m3fn and one float32 scale per (block, KV
head) beside them ([blocks, kv_heads]). A scale is the largest |value| stored in that block and head / 448,
so every row uses fp8's full range; a per-tensor static scale would not survive outlier heads or tokens.
Blocks fill one step at a time, so when a step brings a larger value the block's earlier rows are
re-quantized to the grown scale (a block of 16 tokens is rescaled at most a few times; an unchanged scale
re-quantizes exactly). A step that writes a block's first slot starts it afresh: whatever the block held
before belonged to a freed request.

The reference finds the touched blocks with torch.unique and boolean indexing: data-dependent shapes, a host
sync each, and nothing a CUDA graph can replay. The kernel needs none of that. It relies on how the runner
lays a step out: the tokens that land in one block are consecutive in the batch (each sequence's tokens
are contiguous, in position order, and a block belongs to one sequence). One program per (token, KV head)
checks whether its token starts such a run; the run's first program does the whole block: the run's amax,
the grown scale, the re-quantized earlier rows and the new ones; the others return at once. Padding rows of
a CUDA graph all write the scratch slot: one run of one block nobody reads.
"""

from __future__ import annotations

import torch

from engine.layers.triton_support import tl, triton
from engine.quant import FP8, FP8_MAX


# ---- reference ----------------------------------------------------------------------------------------------
def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
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


# ---- Triton --------------------------------------------------------------------------------------------------
if triton is not None:
    @triton.jit
    def _e4m3_bits(x):
        """float32 (|x| <= 448) -> float8_e4m3fn bits, rounded to nearest even as torch rounds: integer
        arithmetic, so the interpreter (whose own conversion rounds ties away) and every GPU agree."""
        bits = x.to(tl.uint32, bitcast=True)
        sign = (bits >> 31) << 7
        exp = ((bits >> 23) & 0xFF).to(tl.int32) - 127
        man = (bits & 0x7FFFFF).to(tl.int32)
        keep, rest = man >> 20, man & 0xFFFFF
        up = ((rest > 0x80000) | ((rest == 0x80000) & ((keep & 1) == 1))).to(tl.int32)
        normal = ((exp + 7) << 3) + keep + up               # a mantissa carry moves into the exponent
        a = tl.abs(x)
        sub = ((a * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)   # subnormals: multiples of 2^-9, RNE
        code = tl.where(a < 0.015625, sub, normal)
        code = tl.where(x != x, 0x7F, code)  # noqa: PLR0124 (NaN stays NaN)
        return (code.to(tl.uint32) | sign).to(tl.uint8)

    @triton.jit
    def _e4m3_value(b):
        """float8_e4m3fn bits -> float32, exactly (NaN stays NaN)."""
        b = b.to(tl.uint32)
        e, m = (b >> 3) & 15, b & 7
        normal = (((b >> 7) << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
        sub = m.to(tl.float32) * 0.001953125
        sub = tl.where((b >> 7) == 1, -sub, sub)
        value = tl.where(e == 0, sub, normal)
        return tl.where((e == 15) & (m == 7), float("nan"), value)

    @triton.jit
    def _store_block(x_ptr, stride_x, cache_ptr, scale_ptr, blk, kvh, n_kv, rows, run, offsets,
                     BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One run of rows of one (block, KV head) into an fp8 cache (as bytes), the block re-quantized if
        its scale grows; `rows` are the run's token indices, `offsets` their slots' offsets in the block."""
        ro = tl.arange(0, BLOCK_SIZE)
        rd = tl.arange(0, HEAD_DIM)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + kvh * HEAD_DIM + rd[None, :],
                    mask=run[:, None], other=0.0).to(tl.float32)
        amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
        fresh = tl.max((run & (offsets == 0)).to(tl.int32), axis=0) > 0
        old = tl.load(scale_ptr + blk * n_kv + kvh)
        old = tl.where(fresh, 0.0, old)
        new = tl.maximum(tl.maximum(old, tl.div_rn(amax, 448.0)), 1e-12)
        if fresh | (new > old):     # an unchanged scale would re-quantize the block's rows to themselves
            # block rows no token of the run writes keep their value at the new scale (0 in a fresh block)
            written = tl.max(((offsets[None, :] == ro[:, None]) & run[None, :]).to(tl.int32), axis=1) > 0
            block_rows = cache_ptr + (blk * BLOCK_SIZE + ro[:, None]).to(tl.int64) * (n_kv * HEAD_DIM) \
                + kvh * HEAD_DIM + rd[None, :]
            kept = _e4m3_value(tl.load(block_rows, mask=~written[:, None], other=0)) * tl.div_rn(old, new)
            kept = tl.where(fresh, 0.0, kept)
            tl.store(block_rows, _e4m3_bits(kept), mask=~written[:, None])
        q = tl.clamp(tl.div_rn(x, new), -448.0, 448.0)
        dest = cache_ptr + (blk * BLOCK_SIZE + offsets[:, None]).to(tl.int64) * (n_kv * HEAD_DIM) \
            + kvh * HEAD_DIM + rd[None, :]
        tl.store(dest, _e4m3_bits(q), mask=run[:, None])
        tl.store(scale_ptr + blk * n_kv + kvh, new)

    @triton.jit(do_not_specialize=["num_tokens"])
    def _store_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slots_ptr, num_tokens, stride_k, stride_v,
                      BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, FP8: tl.constexpr):
        i, kvh = tl.program_id(0), tl.program_id(1)
        n_kv = tl.num_programs(1)
        rd = tl.arange(0, HEAD_DIM)
        slot = tl.load(slots_ptr + i)
        if not FP8:
            dest = slot * (n_kv * HEAD_DIM) + kvh * HEAD_DIM + rd
            tl.store(kc_ptr + dest, tl.load(k_ptr + i.to(tl.int64) * stride_k + kvh * HEAD_DIM + rd))
            tl.store(vc_ptr + dest, tl.load(v_ptr + i.to(tl.int64) * stride_v + kvh * HEAD_DIM + rd))
        else:
            blk = slot // BLOCK_SIZE
            prev = tl.load(slots_ptr + tl.maximum(i - 1, 0))
            if (i == 0) | (prev // BLOCK_SIZE != blk):          # this token starts a run of its block
                r = tl.arange(0, BLOCK_SIZE)
                rows = i + r
                in_batch = rows < num_tokens
                slots = tl.load(slots_ptr + rows, mask=in_batch, other=-1)
                same = in_batch & (slots // BLOCK_SIZE == blk)
                end = tl.min(tl.where(same, BLOCK_SIZE, r), axis=0)        # first row past the run
                run = r < end
                offsets = slots % BLOCK_SIZE
                _store_block(k_ptr, stride_k, kc_ptr, ks_ptr, blk, kvh, n_kv, rows, run, offsets,
                             BLOCK_SIZE, HEAD_DIM)
                _store_block(v_ptr, stride_v, vc_ptr, vs_ptr, blk, kvh, n_kv, rows, run, offsets,
                             BLOCK_SIZE, HEAD_DIM)


def store_config(block_size: int, head_dim: int, fp8: bool) -> dict:
    """The constexprs `store_kv` launches with (tests/kernel_compile.py compiles exactly these)."""
    return {"BLOCK_SIZE": block_size, "HEAD_DIM": head_dim, "FP8": fp8}


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    """The Triton store: what store_kv_reference does, in one launch and without a host sync. k, v
    [tokens, kv_heads, head_dim] may be strided views along tokens (slices of the fused QKV output)."""
    n, kv_heads, d = k.shape
    if n == 0:
        return
    for x in (k, v):
        assert x.stride(2) == 1 and x.stride(1) == d, "K/V rows must be contiguous per token"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    fp8 = k_scale is not None
    # unused scale pointers get the slots: never an alias of a written tensor (the interpreter copies
    # arguments back in order)
    if fp8:                 # written as bytes: see _e4m3_bits
        k_cache, v_cache = k_cache.view(torch.uint8), v_cache.view(torch.uint8)
    _store_kernel[(n, kv_heads)](k, v, k_cache, v_cache, k_scale if fp8 else slot_mapping,
                                 v_scale if fp8 else slot_mapping, slot_mapping, n, k.stride(0), v.stride(0),
                                 **store_config(k_cache.shape[1], d, fp8))
