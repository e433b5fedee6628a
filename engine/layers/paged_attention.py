"""Triton decode attention over the paged KV cache: one query token per sequence, keys and values read in
place through the block table (no gathered copy of the context, unlike the reference path in
attention.py, which copies every sequence's blocks into a padded batch first).

One program handles one (sequence, KV head, split): the GQA query heads that share the KV head (4 for
Mistral Small: 32 query / 8 KV heads) are padded to 16 rows so scores and the weighted sum are tensor-core
dots. Long contexts are cut into NUM_SPLITS slices of whole tiles (flash-decoding), so a single sequence
still fills the GPU; each split keeps a running max, sum and unnormalized output (online softmax), and
`_combine` merges the splits in float32. Only positions < seq_len are read: stale rows of a block (or of a
freed request) are never loaded, so they cannot leak, NaN included.

fp8 caches (float8_e4m3fn, one float32 scale per block and KV head) are converted in registers. With
TRITON_INTERPRET=1 the kernel runs on CPU tensors (tests); tests/kernel_compile.py compiles it for GPUs.
"""

from __future__ import annotations

import torch

from engine.layers.quant_matmul import triton

if triton is not None:
    import triton.language as tl

HEADS_PAD = 16          # tl.dot needs >= 16 rows: the GQA group is padded to this
MAX_SPLITS = 32


def available() -> bool:
    return triton is not None


if triton is not None:
    @triton.jit
    def _decode_kernel(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, tables_ptr, lens_ptr, acc_ptr, ml_ptr, scale,
                       stride_q, stride_table, stride_block, stride_scale, n_splits,
                       BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, GQA: tl.constexpr,
                       BLOCK_N: tl.constexpr, FP8: tl.constexpr, PRECISION: tl.constexpr):
        seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kv = tl.num_programs(1)
        rh = tl.arange(0, 16)                                   # query rows: GQA real ones, then padding
        rd = tl.arange(0, HEAD_DIM)
        rt = tl.arange(0, BLOCK_N)
        h_ok = rh < GQA
        q = tl.load(q_ptr + seq * stride_q + (kvh * GQA + rh)[:, None] * HEAD_DIM + rd[None, :],
                    mask=h_ok[:, None], other=0.0)
        seq_len = tl.load(lens_ptr + seq)
        per_split = tl.cdiv(tl.cdiv(seq_len, n_splits), BLOCK_N) * BLOCK_N
        start = split * per_split
        end = tl.minimum(start + per_split, seq_len)
        m_i = tl.full((16,), float("-inf"), tl.float32)
        l_i = tl.zeros((16,), tl.float32)
        acc = tl.zeros((16, HEAD_DIM), tl.float32)
        for t0 in range(start, end, BLOCK_N):
            t = t0 + rt
            t_ok = t < end
            block = tl.load(tables_ptr + seq * stride_table + t // BLOCK_SIZE, mask=t_ok, other=0)
            row = block.to(tl.int64) * stride_block + (t % BLOCK_SIZE) * (n_kv * HEAD_DIM) + kvh * HEAD_DIM
            k = tl.load(k_ptr + row[:, None] + rd[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(v_ptr + row[:, None] + rd[None, :], mask=t_ok[:, None], other=0.0)
            if FP8:
                k_s = tl.load(ks_ptr + block * stride_scale + kvh, mask=t_ok, other=0.0)
                v_s = tl.load(vs_ptr + block * stride_scale + kvh, mask=t_ok, other=0.0)
                k = (k.to(tl.float32) * k_s[:, None]).to(q.dtype)
                v = (v.to(tl.float32) * v_s[:, None]).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale                   # [16, BLOCK_N]
            s = tl.where(t_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        base = (seq * n_kv + kvh) * n_splits + split
        out_rows = base * 16 + rh
        tl.store(acc_ptr + out_rows[:, None] * HEAD_DIM + rd[None, :], acc)
        tl.store(ml_ptr + out_rows * 2, m_i)
        tl.store(ml_ptr + out_rows * 2 + 1, l_i)


def decode_config(block_size: int, head_dim: int, gqa: int, fp8: bool, dtype: torch.dtype) -> dict:
    """The constexprs the kernel launches with (tests/kernel_compile.py compiles exactly these)."""
    return {"BLOCK_SIZE": block_size, "HEAD_DIM": head_dim, "GQA": gqa, "BLOCK_N": 64 if head_dim <= 128 else 32,
            "FP8": fp8, "PRECISION": "ieee" if dtype == torch.float32 else "tf32"}


def _num_splits(num_seqs: int, kv_heads: int, max_len: int, device: torch.device, block_n: int) -> int:
    """Enough splits that sequences x KV heads x splits fills the SMs twice, each split >= 4 tiles."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    splits = 1
    while (splits < MAX_SPLITS and num_seqs * kv_heads * splits < 2 * sms
           and max_len >= 2 * splits * 4 * block_n):
        splits *= 2
    return splits


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, max_len: int, scale: float, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, num_splits: int | None = None) -> torch.Tensor:
    """q [seqs, heads, d]; caches [blocks, block_size, kv_heads, d] (model dtype, or float8_e4m3fn with
    scales [blocks, kv_heads]); block_tables [seqs, >= ceil(max_len / block_size)] int32; seq_lens [seqs]
    (this step's token included, already stored). `max_len` (host int) only sizes the split count."""
    n, heads, d = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    gqa = heads // kv_heads
    assert gqa <= HEADS_PAD and heads % kv_heads == 0, (heads, kv_heads)
    cfg = decode_config(block_size, d, gqa, k_scale is not None, q.dtype)
    splits = num_splits or _num_splits(n, kv_heads, max_len, q.device, cfg["BLOCK_N"])
    q = q.contiguous()
    acc = torch.empty((n, kv_heads, splits, HEADS_PAD, d), dtype=torch.float32, device=q.device)
    ml = torch.empty((n, kv_heads, splits, HEADS_PAD, 2), dtype=torch.float32, device=q.device)
    fp8 = k_scale is not None
    dummy = acc                                              # scale pointers unused without fp8
    _decode_kernel[(n, kv_heads, splits)](
        q, k_cache, v_cache, k_scale if fp8 else dummy, v_scale if fp8 else dummy, block_tables, seq_lens, acc, ml,
        scale, q.stride(0), block_tables.stride(0), k_cache.stride(0), kv_heads if fp8 else 0, splits,
        **cfg)
    return _combine(acc[:, :, :, :gqa], ml[:, :, :, :gqa]).reshape(n, heads, d).to(q.dtype)


def _combine(acc: torch.Tensor, ml: torch.Tensor) -> torch.Tensor:
    """Merge per-split online-softmax states: acc [..., splits, g, d] unnormalized, ml [..., splits, g, 2]
    (running max, sum). Splits that saw no token have max -inf and weigh 0. -> [..., g, d]"""
    m, l = ml[..., 0], ml[..., 1]
    m_all = m.amax(dim=-2, keepdim=True)
    w = torch.exp(m - m_all)                                 # [..., splits, g]
    return (acc * w[..., None]).sum(-3) / (l * w).sum(-2)[..., None]
