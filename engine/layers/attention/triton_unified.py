"""The Triton attention backend: one kernel launch per layer for a whole step, whatever it mixes (prefill
chunks with or without a cached prefix, decodes), reading K/V through the block tables in place.

Work split. A program takes one block of BLOCK_Q consecutive query tokens of one sequence and one KV head,
with all GQA query heads of that KV head at once: BLOCK_M = BLOCK_Q x GQA rows (Mistral Small: 4 query
heads per KV head; rows are (token, head) pairs, so K and V tiles are loaded once for the whole group and
every product is a tensor-core dot of >= 16 rows). The grid's first axis is an upper bound on the step's
query blocks, num_tokens // BLOCK_Q + num_seqs: sequence i's blocks start at cu_seqlens_q[i] // BLOCK_Q + i
(a binary search finds it), and programs past a sequence's last block return at once. Sizes come from
tensor shapes only, so a launch needs no host sync and replays in a CUDA graph.

Memory is O(BLOCK_M x TILE_N) per program: keys are visited TILE_N at a time with an online softmax
(running max, sum, unnormalized output), so no [queries, context] score matrix exists anywhere. Each row
sees keys 0..its own position (the cached prefix, then the step's tokens causally); keys past the block's
last query are never loaded, nor any slot at or past seq_len, so stale rows of a block (NaN included) or
another request's blocks behind padding entries of the table cannot leak.

Split-KV (flash-decoding): when the query blocks x KV heads give too few programs to fill the GPU (decode
of a few long sequences), a third grid axis cuts each program's key range into n_splits slices written as
float32 partial states, which `_combine_kernel` merges. The split count depends only on shapes and on
the context bound (the window under CUDA graphs); each split's range is computed in the kernel from the
real length.

fp8 caches (float8_e4m3fn, one float32 scale per (block, KV head), store.py): K and V are read as fp8 and
converted in registers; the K scale multiplies the scores of its keys after the dot (exact: fp8 -> 16 bit
is exact), V is scaled before its dot.
"""

from __future__ import annotations

import functools

import torch

from engine.forward_context import ForwardContext
from engine.layers import autotune
from engine.layers.attention.backend import AttentionBackend
from engine.layers.attention.reference import self_attention
from engine.layers.attention.store import store_kv
from engine.layers.triton_support import num_sms, tl, triton

MAX_SPLITS = 32


class TritonBackend(AttentionBackend):
    name = "triton"

    def graph_safe(self, fp8_kv: bool) -> bool:
        return True

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int,
                scale: float) -> torch.Tensor:
        if ctx.kv_caches is None:           # cache-less scoring and tests: no pool to read through
            return self_attention(q, k, v, ctx, scale)
        k_cache, v_cache, *scales = ctx.kv_caches[layer_idx]
        k_scale, v_scale = scales or (None, None)
        store_kv(k, v, k_cache, v_cache, ctx.slot_mapping, k_scale, v_scale)
        return unified_attention(q, k_cache, v_cache, ctx.block_tables, ctx.cu_seqlens_q, ctx.seq_lens, scale,
                                 ctx.max_query_len or q.shape[0], ctx.context_bound(k_cache.shape[1]),
                                 k_scale, v_scale)


if triton is not None:
    @triton.jit
    def _find_seq(cu_q_ptr, qb, num_seqs, BLOCK_Q: tl.constexpr):
        """The last sequence i whose first query block, cu_q[i] // BLOCK_Q + i, is <= qb."""
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(cu_q_ptr + mid) // BLOCK_Q + mid <= qb:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    @triton.jit(do_not_specialize=["num_seqs", "num_tokens", "stride_table", "n_splits"])
    def _attention_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, cu_q_ptr, out_ptr, acc_ptr,
                          ml_ptr, scale, num_seqs, num_tokens, stride_q, stride_out, stride_table, n_splits,
                          NUM_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                          GQA: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, FP8: tl.constexpr,
                          PRECISION: tl.constexpr):
        BLOCK_Q: tl.constexpr = BLOCK_M // GQA
        N_KV: tl.constexpr = NUM_HEADS // GQA
        qb, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        seq = _find_seq(cu_q_ptr, qb, num_seqs, BLOCK_Q)
        q_start = tl.load(cu_q_ptr + seq)
        q_len = tl.load(cu_q_ptr + seq + 1) - q_start
        local = qb - (q_start // BLOCK_Q + seq)
        if local * BLOCK_Q >= q_len:
            return
        context = tl.load(lens_ptr + seq) - q_len
        r = tl.arange(0, BLOCK_M)
        rd = tl.arange(0, HEAD_DIM)
        rt = tl.arange(0, TILE_N)
        qi = local * BLOCK_Q + r // GQA                         # the row's query index in its sequence
        head = kvh * GQA + r % GQA
        row_ok = (r < BLOCK_Q * GQA) & (qi < q_len)
        tok = (q_start + qi).to(tl.int64)
        q = tl.load(q_ptr + tok[:, None] * stride_q + head[:, None] * HEAD_DIM + rd[None, :],
                    mask=row_ok[:, None], other=0.0)
        pos = context + qi                                      # the row sees keys 0..pos
        hi = context + tl.minimum(q_len, (local + 1) * BLOCK_Q)
        per_split = tl.cdiv(tl.cdiv(hi, n_splits), TILE_N) * TILE_N
        start = split * per_split
        end = tl.minimum(start + per_split, hi)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
        table = tables_ptr + seq.to(tl.int64) * stride_table
        for t0 in range(start, end, TILE_N):
            t = t0 + rt
            t_ok = t < end
            blk = tl.load(table + t // BLOCK_SIZE, mask=t_ok, other=0).to(tl.int64)
            kv_row = (blk * BLOCK_SIZE + t % BLOCK_SIZE) * (N_KV * HEAD_DIM) + kvh * HEAD_DIM
            k = tl.load(k_ptr + kv_row[:, None] + rd[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(v_ptr + kv_row[:, None] + rd[None, :], mask=t_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION)          # [BLOCK_M, TILE_N]
            if FP8:
                k_s = tl.load(ks_ptr + blk * N_KV + kvh, mask=t_ok, other=0.0)
                v_s = tl.load(vs_ptr + blk * N_KV + kvh, mask=t_ok, other=0.0)
                s = s * (k_s * scale)[None, :]
                v = (v.to(tl.float32) * v_s[:, None]).to(q.dtype)
            else:
                s = s * scale
                v = v.to(q.dtype)
            s = tl.where(t_ok[None, :] & (t[None, :] <= pos[:, None]), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row that saw no key yet stays 0
            alpha = tl.exp(m_i - m_safe)
            p = tl.exp(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if n_splits > 1:            # a partial state for _combine_kernel
            state = (split * num_tokens + tok) * NUM_HEADS + head
            tl.store(acc_ptr + state[:, None] * HEAD_DIM + rd[None, :], acc, mask=row_ok[:, None])
            tl.store(ml_ptr + state * 2, m_i, mask=row_ok)
            tl.store(ml_ptr + state * 2 + 1, l_i, mask=row_ok)
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + tok[:, None] * stride_out + head[:, None] * HEAD_DIM + rd[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])

    @triton.jit(do_not_specialize=["num_tokens", "n_splits"])
    def _combine_kernel(acc_ptr, ml_ptr, out_ptr, num_tokens, n_splits, stride_out, NUM_HEADS: tl.constexpr,
                        HEAD_DIM: tl.constexpr, SPLITS: tl.constexpr):
        """Merge the n_splits (<= SPLITS) partial states of one (token, head); a split that saw no key
        weighs 0."""
        tok, head = tl.program_id(0).to(tl.int64), tl.program_id(1)
        rs = tl.arange(0, SPLITS)
        rd = tl.arange(0, HEAD_DIM)
        ok = rs < n_splits
        state = (rs * num_tokens + tok) * NUM_HEADS + head
        m = tl.load(ml_ptr + state * 2, mask=ok, other=float("-inf"))
        l = tl.load(ml_ptr + state * 2 + 1, mask=ok, other=0.0)
        w = tl.exp(m - tl.max(m, axis=0))
        acc = tl.load(acc_ptr + state[:, None] * HEAD_DIM + rd[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(out_ptr + tok * stride_out + head * HEAD_DIM + rd, out.to(out_ptr.dtype.element_ty))


def candidates(decode: bool, head_dim: int, gqa: int, dtype: torch.dtype, fp8: bool) -> list[dict]:
    """The tunable launch parameters shipped for a shape class (tests/kernel_compile.py compiles each one
    for sm_80/89/90 and checks it does not spill). Decode-only steps use the smallest row block (one token
    x the GQA group, padded to the 16 rows of a tensor-core dot); prefill chunks larger ones. float32
    (tests, CPU-like numerics) multiplies without tensor cores: small tiles, or its operands spill."""
    rows = max(16, triton.next_power_of_2(gqa))
    if dtype == torch.float32 or head_dim > 128:
        if fp8:
            return [{"BLOCK_M": rows, "TILE_N": 16, "num_warps": 8, "num_stages": 2}]
        return [{"BLOCK_M": rows, "TILE_N": 32, "num_warps": 8, "num_stages": 2},
                {"BLOCK_M": rows, "TILE_N": 16, "num_warps": 4, "num_stages": 2}]
    if decode:      # (with 4 warps, 128 16-bit keys spill on Ada; fp8 ones need 4 warps' registers)
        return [{"BLOCK_M": rows, "TILE_N": 64, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": rows, "TILE_N": 128, "num_warps": 4 if fp8 else 8, "num_stages": 2}]
    # 128 rows x 64 fp8 keys spill on Ada (the fp8 -> 16-bit conversion needs registers): 32 keys there
    return [{"BLOCK_M": max(rows, 64), "TILE_N": 64, "num_warps": 8, "num_stages": 2},
            {"BLOCK_M": max(rows, 128), "TILE_N": 32 if fp8 else 64, "num_warps": 8, "num_stages": 2}]


def kernel_constexprs(num_heads: int, block_size: int, head_dim: int, gqa: int, fp8: bool, dtype: torch.dtype) -> dict:
    """The shape-fixed constexprs of `_attention_kernel` (the tunable ones come from `candidates`)."""
    return {"NUM_HEADS": num_heads, "BLOCK_SIZE": block_size, "HEAD_DIM": head_dim, "GQA": gqa, "FP8": fp8,
            "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def num_splits(programs: int, max_len: int, tile_n: int, device: torch.device) -> int:
    """Enough splits that programs x splits fills the SMs twice, each split keeping >= 4 tiles."""
    splits, sms = 1, num_sms(device)
    while splits < MAX_SPLITS and programs * splits < 2 * sms and max_len >= 2 * splits * 4 * tile_n:
        splits *= 2
    return splits


@functools.cache
def _unused(device: torch.device) -> torch.Tensor:
    return torch.zeros(4, dtype=torch.float32, device=device)


def unified_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, max_query_len: int,
                      max_seq_len: int, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                      splits: int | None = None, config: dict | None = None) -> torch.Tensor:
    """q [tokens, heads, d] (rows may be strided); caches [blocks, block_size, kv_heads, d] (model dtype, or
    float8_e4m3fn with scales [blocks, kv_heads]); block_tables [seqs, >= ceil(seq_len / block_size)] int32;
    cu_seqlens_q [seqs + 1], seq_lens [seqs] int32 (this step's tokens included, already stored).
    `max_query_len` and `max_seq_len` are host-side upper bounds that only size the work split."""
    n, heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    gqa = heads // kv_heads
    assert heads % kv_heads == 0 and q.stride(2) == 1 and q.stride(1) == d, (q.shape, q.stride(), kv_heads)
    fp8 = k_scale is not None
    out = torch.empty((n, heads, d), dtype=q.dtype, device=q.device)
    if n == 0:
        return out
    num_seqs = seq_lens.shape[0]
    unused = _unused(q.device)

    def launch(cfg: dict, n_splits: int) -> None:
        block_q = cfg["BLOCK_M"] // gqa
        grid = (n // block_q + num_seqs, kv_heads, n_splits)
        split = n_splits > 1
        # unused pointers get a float32 stand-in: one compiled variant per configuration, the one
        # tests/kernel_compile.py checks
        acc = torch.empty((n_splits, n, heads, d), dtype=torch.float32, device=q.device) if split else unused
        ml = torch.empty((n_splits, n, heads, 2), dtype=torch.float32, device=q.device) if split else unused
        _attention_kernel[grid](q, k_cache, v_cache, k_scale if fp8 else unused, v_scale if fp8 else unused,
                                block_tables, seq_lens, cu_seqlens_q, out, acc, ml, scale, num_seqs, n, q.stride(0),
                                out.stride(0), block_tables.stride(0), n_splits,
                                **kernel_constexprs(heads, block_size, d, gqa, fp8, q.dtype), **cfg)
        if split:
            _combine_kernel[(n, heads)](acc, ml, out, n, n_splits, out.stride(0), NUM_HEADS=heads, HEAD_DIM=d,
                                        SPLITS=triton.next_power_of_2(n_splits))

    def splits_for(cfg: dict) -> int:
        programs = (n // (cfg["BLOCK_M"] // gqa) + num_seqs) * kv_heads
        return splits or num_splits(programs, max_seq_len, cfg["TILE_N"], q.device)

    if config is None:
        decode = max_query_len == 1
        shape_class = ("decode" if decode else "prefill", d, gqa, block_size, str(q.dtype), fp8)
        config = autotune.pick("unified_attention", shape_class, candidates(decode, d, gqa, q.dtype, fp8),
                               lambda c: launch(c, splits_for(c)), q.device)
    launch(config, splits_for(config))
    return out
