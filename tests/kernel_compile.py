"""Compiles every Triton kernel configuration the engine ships ahead of time for real GPU targets, no GPU
needed (Triton ships ptxas and cuobjdump): catches what Triton's interpreter cannot, such as an operation
or dtype a GPU backend rejects, a tile that does not fit shared memory, or registers spilled to local
memory. Prints one JSON line per configuration with its shared memory, registers and `n_spills` (the
local-memory bytes per thread, what Triton's own n_spills reports once a kernel is loaded on a GPU).
Must run with TRITON_INTERPRET unset.

Kernels are compiled as the engine launches them: pointers 16-byte aligned and the strides and sizes that
are multiples of 16 specialized on it (Triton does the same at run time); the integers that change every
step are declared `do_not_specialize` in the kernels and stay generic here too.

    python tests/kernel_compile.py [ARCH ...]        # e.g. 80 89 90 (compute capability x10)"""

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.layers import mlp, norm, rotary
from engine.layers import quant_matmul as qm
from engine.layers.attention import store
from engine.layers.attention import triton_unified as tu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Mistral Small 3.1: hidden 5120, 32 query / 8 KV heads of 128, intermediate 32768, KV blocks of 16
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, BLOCK = 5120, 32, 8, 128, 16

NF4_SIG = {"x_ptr": "*{x}", "w_ptr": "*u8", "absmax_ptr": "*u8", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32",
           "offset_ptr": "*fp32", "rows_ptr": "*i32", "base2_ptr": "*i32", "nf4_ptr": "*fp32", "y_ptr": "*fp32",
           "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "K_SPLIT": "i32"}
FP8_SIG = {"x_ptr": "*{x}", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "K_SPLIT": "i32"}
ATTN_SIG = {"q_ptr": "*{x}", "k_ptr": "*{kv}", "v_ptr": "*{kv}", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
            "tables_ptr": "*i32", "lens_ptr": "*i32", "cu_q_ptr": "*i32", "out_ptr": "*{x}", "acc_ptr": "*fp32",
            "ml_ptr": "*fp32", "scale": "fp32", "num_seqs": "i32", "num_tokens": "i32", "stride_q": "i32",
            "stride_out": "i32", "stride_table": "i32", "n_splits": "i32"}
COMBINE_SIG = {"acc_ptr": "*fp32", "ml_ptr": "*fp32", "out_ptr": "*{x}", "num_tokens": "i32", "n_splits": "i32",
               "stride_out": "i32"}
# non-fp8 stores get the slot tensor for their unused scale pointers (store.store_kv)
STORE_SIG = {"k_ptr": "*{x}", "v_ptr": "*{x}", "kc_ptr": "*{kv}", "vc_ptr": "*{kv}", "ks_ptr": "*{scale}",
             "vs_ptr": "*{scale}", "slots_ptr": "*i64", "num_tokens": "i32", "stride_k": "i32", "stride_v": "i32"}
NORM_SIG = {"x_ptr": "*{x}", "res_ptr": "*{x}", "w_ptr": "*{x}", "out_ptr": "*{x}", "sum_ptr": "*{x}",
            "n_cols": "i32", "eps": "fp32"}
SILU_SIG = {"x_ptr": "*{x}", "out_ptr": "*{x}", "n_cols": "i32"}
ROPE_SIG = {"q_ptr": "*{x}", "k_ptr": "*{x}", "cos_ptr": "*{x}", "sin_ptr": "*{x}", "stride_q": "i32",
            "stride_k": "i32", "heads": "i32", "kv_heads": "i32"}
# integer arguments that are multiples of 16 at the shapes above (specialized, as at run time)
ALIGNED = {"N", "K", "stride_xm", "K_SPLIT", "stride_q", "stride_out", "stride_k", "stride_v", "n_cols", "heads"}
OPTIONS = ("num_warps", "num_stages")


def configs(arch: int):
    """(kernel, signature, {x, kv, scale}, launch configuration) for everything the engine launches on
    `arch`: x in bf16/fp16/fp32; fp8 weights and fp8 KV caches from 8.9 on (engine.quant, attention)."""
    fp8_ok = arch >= 89
    for x, dtype in DTYPES.items():
        for m in (1, 16, 32, 64):               # quantized matmuls: 1, 2-16, 17-32 and 33-64 rows
            for shards in ((1, 3) if x == "bf16" else (3,)):        # o/down, q/k/v (gate/up: 2)
                for cfg in qm.nf4_candidates(m, dtype, 64, shards):
                    yield qm._nf4_kernel, NF4_SIG, {"x": x}, cfg
            if fp8_ok:
                for cfg in qm.fp8_candidates(m, dtype, HIDDEN):
                    yield qm._fp8_kernel, FP8_SIG, {"x": x}, cfg
        for kv in (x, "fp8e4nv") if fp8_ok else (x,):
            fp8 = kv == "fp8e4nv"
            fixed = tu.kernel_constexprs(HEADS, BLOCK, HEAD_DIM, HEADS // KV_HEADS, fp8, dtype)
            seen = []
            for decode in (True, False):
                for cfg in tu.candidates(decode, HEAD_DIM, HEADS // KV_HEADS, dtype, fp8):
                    if cfg not in seen:
                        seen.append(cfg)
                        yield tu._attention_kernel, ATTN_SIG, {"x": x, "kv": kv}, {**fixed, **cfg}
            # the fp8 store writes the cache as bytes; the plain one stores rows of x
            yield store._store_kernel, STORE_SIG, {"x": x, "kv": "u8" if fp8 else x,
                                                  "scale": "fp32" if fp8 else "i64"}, \
                store.store_config(BLOCK, HEAD_DIM, fp8)
        for splits in (2, 4, 8, 16, tu.MAX_SPLITS):
            yield tu._combine_kernel, COMBINE_SIG, {"x": x}, {"NUM_HEADS": HEADS, "HEAD_DIM": HEAD_DIM,
                                                             "SPLITS": splits}
        for residual in (False, True):
            yield norm._rms_norm_kernel, NORM_SIG, {"x": x}, {**norm.norm_config(HIDDEN), "HAS_RES": residual}
        yield mlp._silu_mul_kernel, SILU_SIG, {"x": x}, {"BLOCK": mlp.SILU_BLOCK, "num_warps": 4}
        yield rotary._rotary_kernel, ROPE_SIG, {"x": x}, {**rotary.rotary_config(HEADS, KV_HEADS, HEAD_DIM),
                                                          "num_warps": 4}


def compile_one(job: tuple[int, int]) -> dict:
    arch, index = job                           # (kernels do not pickle: each worker rebuilds the list)
    fn, sig, types, cfg = list(configs(arch))[index]
    signature = {k: v.format(**types) for k, v in sig.items()}
    consts = {k: v for k, v in cfg.items() if k not in OPTIONS}
    signature.update({k: "constexpr" for k in consts})
    attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
             if v.startswith("*") or k in ALIGNED}
    options = {k: cfg[k] for k in OPTIONS if k in cfg}
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    registers, stack = map(int, re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    return {"kernel": fn.__name__, "arch": arch, **types, **cfg, "shared_bytes": compiled.metadata.shared,
            "registers": registers, "n_spills": stack}


def main(archs: list[int]) -> None:
    jobs = [(arch, i) for arch in archs for i in range(len(list(configs(arch))))]
    with ProcessPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for row in pool.map(compile_one, jobs):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 89, 90])
