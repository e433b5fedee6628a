"""Triton weight-only matmuls for few-token batches (decode): y = x W^T with W read in its quantized form,
never materialized in 16 bits. Decode reads every weight once per step, so its time is bytes moved: nf4
moves 0.26×, fp8 0.5× of bf16. bitsandbytes' own 4-bit path does not turn that into speed (its gemv
kernel takes one row at a time and batches of 2+ dequantize the whole matrix to 16 bits before a cuBLAS
matmul), hence these kernels.

Both kernels work on the storage `engine.quant` already keeps, so the quantized model is the same whichever
kernel runs:
- nf4: bitsandbytes' layout. Packed codes [N*K/2] uint8 (high nibble = even element); the scale of each
  block of `group` weights (blocks never straddle rows) is itself stored as an 8-bit code:
  absmax = code2[absmax_u8] * absmax2[block // 256] + offset; weight = NF4[nibble] * absmax.
- fp8: float8_e4m3fn [N, K] with one float32 scale per output row.

One program computes a BLOCK_M × BLOCK_N tile of y over a slice of K (split-K when N alone gives too few
programs to fill the GPU); slices land in a float32 [split, M, N] buffer summed afterwards, so the result
does not depend on scheduling (no atomics). Several tokens use tensor-core dots (rows padded to 16); a
single token (single-stream decode) multiplies and reduces in float32 instead, its weights rounded to the
activation dtype first as the dot path rounds them, so a row's result does not depend on the batch size.
The nf4 tile walks K one quantization block at a time, so each block's scale multiplies a partial product
once instead of every weight; even and odd K columns are two dots against the high and low nibbles, so
nothing is interleaved in registers. The 16 NF4 values are loaded once per program and looked up in
registers (tl.gather), not gathered from global memory per weight. A merged layer's shards (engine/
quant_nf4.py) each have their own second-level scales: every output row finds its shard once per program.

BLOCK_N is picked per device and shape by engine/layers/autotune.py among the shipped candidates; the
row count M, which changes every step, is not specialized on (no recompiles mid-run).

With TRITON_INTERPRET=1 (set before this module is imported) the same kernels run on CPU tensors: the
tests use that to check them against the reference dequantization.
"""

from __future__ import annotations

import functools

import torch

from engine.layers import autotune
from engine.layers.triton_support import available, num_sms, tl, triton

MAX_ROWS = 64           # beyond this many tokens a batch is compute-bound: dequantize + cuBLAS wins
# bitsandbytes' NF4 code book (QLoRA): the 16 values a 4-bit code stands for, times its block's absmax
NF4_CODE = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0)


__all__ = ["MAX_ROWS", "NF4_CODE", "available", "fp8_matmul", "nf4_matmul"]


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


def _split_k(n_tiles: int, k_steps: int, device: torch.device, min_steps: int) -> int:
    """Largest power-of-two split of the K loop that still leaves each program `min_steps` iterations and
    stops once there are two programs per SM."""
    split, sms = 1, num_sms(device)
    while n_tiles * split < 2 * sms and k_steps % (2 * split) == 0 and k_steps // (2 * split) >= min_steps:
        split *= 2
    return split


def _block_m(m: int, dtype: torch.dtype) -> int:
    """1 for a single token (the reduction path), else a tl.dot tile (every dimension >= 16). float32 dots
    run without tensor cores and spill registers beyond 16 rows: more rows take more programs."""
    if m == 1:
        return 1
    return 16 if dtype == torch.float32 else max(16, triton.next_power_of_2(m))


if triton is not None:
    @triton.jit(do_not_specialize=["M"])
    def _nf4_kernel(x_ptr, w_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, rows_ptr, base2_ptr, nf4_ptr,
                    y_ptr, M, N, K, stride_xm, K_SPLIT, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, N_SHARDS: tl.constexpr, PRECISION: tl.constexpr):
        HALF: tl.constexpr = GROUP // 2
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rj = tl.arange(0, HALF)
        m_ok, n_ok = rm < M, rn < N
        rn_safe = tl.where(n_ok, rn, 0)                         # out-of-range rows re-read row 0, unstored
        groups_per_row = K // GROUP
        # each row's shard: where its second-level scales start, its offset and its code map
        shard = tl.zeros((BLOCK_N,), tl.int32)
        for j in tl.static_range(1, N_SHARDS):
            shard += (rn_safe >= tl.load(rows_ptr + j)).to(tl.int32)
        base2 = tl.load(base2_ptr + shard)
        first_blk = (rn_safe - tl.load(rows_ptr + shard)) * groups_per_row    # the row's first block in its shard
        offset = tl.load(offset_ptr + shard)
        code2 = code2_ptr + shard * 256
        table = tl.broadcast_to(tl.load(nf4_ptr + tl.arange(0, 16))[:, None], (16, BLOCK_N))
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * K_SPLIT
        for k0 in range(k_begin, k_begin + K_SPLIT, GROUP):
            b = tl.load(w_ptr + rn_safe[None, :] * (K // 2) + (k0 // 2 + rj)[:, None])    # [HALF, BLOCK_N]
            xp = x_ptr + rm[:, None] * stride_xm + (k0 + 2 * rj)[None, :]
            x_even = tl.load(xp, mask=m_ok[:, None], other=0.0)                          # [BLOCK_M, HALF]
            x_odd = tl.load(xp + 1, mask=m_ok[:, None], other=0.0)
            # codes -> NF4 values, rounded to the activation dtype on both paths
            hi = tl.gather(table, (b >> 4).to(tl.int32), 0).to(x_even.dtype)
            lo = tl.gather(table, (b & 15).to(tl.int32), 0).to(x_even.dtype)
            if BLOCK_M == 1:        # one token: multiply-add and reduce, no tensor-core operand shuffles
                part = tl.sum(hi.to(tl.float32) * tl.trans(x_even.to(tl.float32))
                              + lo.to(tl.float32) * tl.trans(x_odd.to(tl.float32)), axis=0)[None, :]
            else:
                part = (tl.dot(x_even, hi, input_precision=PRECISION)
                        + tl.dot(x_odd, lo, input_precision=PRECISION))
            g = k0 // GROUP
            scale = tl.load(code2 + tl.load(absmax_ptr + rn_safe * groups_per_row + g).to(tl.int32)) \
                * tl.load(absmax2_ptr + base2 + (first_blk + g) // 256)
            acc += part * (scale + offset)[None, :]
        out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit(do_not_specialize=["M"])
    def _fp8_kernel(x_ptr, w_ptr, scale_ptr, y_ptr, M, N, K, stride_xm, K_SPLIT, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
        pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok, n_ok = rm < M, rn < N
        rn_safe = tl.where(n_ok, rn, 0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        k_begin = pid_k * K_SPLIT
        for k0 in range(k_begin, k_begin + K_SPLIT, BLOCK_K):
            w = tl.load(w_ptr + rn_safe[None, :] * K + (k0 + rk)[:, None])                # [BLOCK_K, BLOCK_N]
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None], other=0.0)
            if BLOCK_M == 1:
                acc += tl.sum(w.to(tl.float32) * tl.trans(x.to(tl.float32)), axis=0)[None, :]
            else:
                acc += tl.dot(x, w.to(x.dtype), input_precision=PRECISION)
        acc *= tl.load(scale_ptr + rn_safe)[None, :]
        out = y_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    """float32 activations (tests, CPU-like numerics) multiply in full precision, not TF32."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _finish(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (partial[0] if partial.shape[0] == 1 else partial.sum(0)).to(dtype)


def nf4_candidates(m: int, dtype: torch.dtype, group: int = 64, n_shards: int = 1) -> list[dict]:
    """The launch configurations `nf4_matmul` chooses among for `m` rows of `dtype` (tests/kernel_compile.py
    compiles each for sm_80/89/90 and checks none spills registers)."""
    block_m = _block_m(m, dtype)
    if dtype == torch.float32:
        shapes = ((32, 8), (16, 8))
    elif block_m >= 64:         # 64 x 128 tiles spill on Hopper even with 8 warps
        shapes = ((64, 8),)
    else:
        shapes = ((128, 4), (64, 4))
    return [{"GROUP": group, "BLOCK_M": block_m, "BLOCK_N": w, "N_SHARDS": n_shards, "PRECISION": _precision(dtype),
             "num_warps": warps} for w, warps in shapes]


def fp8_candidates(m: int, dtype: torch.dtype, k: int = 4096) -> list[dict]:
    block_k = 32 if dtype == torch.float32 else 128
    while k % block_k:
        block_k //= 2
    shapes = ((32, 8), (16, 8)) if dtype == torch.float32 else ((64, 4), (32, 4))
    return [{"BLOCK_M": _block_m(m, dtype), "BLOCK_N": n, "BLOCK_K": block_k, "PRECISION": _precision(dtype),
             "num_warps": warps} for n, warps in shapes]


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code2: torch.Tensor,
               absmax2: torch.Tensor, offsets: torch.Tensor, shard_rows: torch.Tensor, shard_base2: torch.Tensor,
               n: int, k: int, group: int, block_n: int | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] (16-bit or float32, M <= MAX_ROWS) times the nf4 matrix [N, K] transposed -> [M, N]. Per shard
    (engine/quant_nf4.py): code2 [shards, 256], offsets [shards], shard_rows / shard_base2 [shards] int32."""
    m = x.shape[0]
    if x.stride(1) != 1:
        x = x.contiguous()
    k_steps = k // group

    def launch(cfg: dict) -> torch.Tensor:
        n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
        split = split_k or _split_k(n_tiles, k_steps, x.device, min_steps=8)
        assert k % group == 0 and k_steps % split == 0, (k, group, split)
        y = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _nf4_kernel[(n_tiles, split, triton.cdiv(m, cfg["BLOCK_M"]))](
            x, packed, absmax, code2, absmax2, offsets, shard_rows, shard_base2, _nf4_table(x.device), y,
            m, n, k, x.stride(0), k // split, **cfg)
        return y

    candidates = nf4_candidates(m, x.dtype, group, shard_rows.shape[0])
    if block_n:
        candidates = [{**candidates[0], "BLOCK_N": block_n}]
    cfg = autotune.pick("nf4_matmul", (_block_m(m, x.dtype), n, k, str(x.dtype)), candidates, launch, x.device)
    return _finish(launch(cfg), x.dtype)


def fp8_matmul(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, block_k: int | None = None,
               split_k: int | None = None) -> torch.Tensor:
    """x [M, K] times (w [N, K] float8_e4m3fn * scale[:, None]) transposed -> [M, N] in x's dtype."""
    m, (n, k) = x.shape[0], w.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    candidates = fp8_candidates(m, x.dtype, k)
    if block_k:
        candidates = [{**c, "BLOCK_K": block_k} for c in candidates[:1]]

    def launch(cfg: dict) -> torch.Tensor:
        assert k % cfg["BLOCK_K"] == 0 and cfg["BLOCK_K"] >= 16, f"fp8 kernel needs K divisible by 16, got {k}"
        k_steps = k // cfg["BLOCK_K"]
        n_tiles = triton.cdiv(n, cfg["BLOCK_N"])
        split = split_k or _split_k(n_tiles, k_steps, x.device, min_steps=4)
        assert k_steps % split == 0, (k, cfg["BLOCK_K"], split)
        y = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        _fp8_kernel[(n_tiles, split, triton.cdiv(m, cfg["BLOCK_M"]))](x, w, scale, y, m, n, k, x.stride(0),
                                                                      k // split, **cfg)
        return y

    cfg = autotune.pick("fp8_matmul", (_block_m(m, x.dtype), n, k, str(x.dtype)), candidates, launch, x.device)
    return _finish(launch(cfg), x.dtype)
