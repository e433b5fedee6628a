"""Compiles the quantized decode kernels ahead of time for real GPU targets, no GPU needed (Triton ships
ptxas): catches what Triton's interpreter cannot, such as an operation or dtype a GPU backend rejects.
Prints one JSON line per kernel configuration. Must run with TRITON_INTERPRET unset.

    python tests/kernel_compile.py [ARCH ...]        # e.g. 80 89 90 (compute capability x10)"""

import json
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.layers import paged_attention as pa
from engine.layers import quant_matmul as qm

NF4_SIG = {"x_ptr": "*{x}", "w_ptr": "*u8", "absmax_ptr": "*u8", "code2_ptr": "*fp32", "absmax2_ptr": "*fp32",
           "offset_ptr": "*fp32", "nf4_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32",
           "stride_xm": "i32", "K_SPLIT": "i32", "GROUP": "constexpr", "BLOCK_M": "constexpr",
           "BLOCK_N": "constexpr", "PRECISION": "constexpr"}
FP8_SIG = {"x_ptr": "*{x}", "w_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "y_ptr": "*fp32", "M": "i32", "N": "i32",
           "K": "i32", "stride_xm": "i32", "K_SPLIT": "i32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
           "BLOCK_K": "constexpr", "PRECISION": "constexpr"}

ATTN_SIG = {"q_ptr": "*{x}", "k_ptr": "*{kv}", "v_ptr": "*{kv}", "ks_ptr": "*fp32", "vs_ptr": "*fp32",
            "tables_ptr": "*i32", "lens_ptr": "*i32", "acc_ptr": "*fp32", "ml_ptr": "*fp32", "scale": "fp32",
            "stride_q": "i32", "stride_table": "i32", "stride_block": "i32", "stride_scale": "i32",
            "n_splits": "i32", "BLOCK_SIZE": "constexpr", "HEAD_DIM": "constexpr", "GQA": "constexpr",
            "BLOCK_N": "constexpr", "FP8": "constexpr", "PRECISION": "constexpr"}


def configs(arch: int):
    """What nf4_matmul / fp8_matmul launch (x in bf16/fp16/fp32, with 1, 2-16 and 33-64 rows) and what
    paged decode attention launches."""
    for x, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for m in (1, 16, 64):
            yield qm._nf4_kernel, NF4_SIG, x, qm.nf4_config(m, dtype)
            if arch >= 89:                      # fp8 weights take the kernel from Ada on (engine.quant)
                yield qm._fp8_kernel, FP8_SIG, x, qm.fp8_config(m, dtype)
        # decode attention at Mistral Small's shapes: 32 query / 8 KV heads of 128, blocks of 16
        for fp8 in (False, True) if arch >= 89 else (False,):
            kv = "fp8e4nv" if fp8 else x
            yield pa._decode_kernel, {k: v.replace("{kv}", kv) for k, v in ATTN_SIG.items()}, x, \
                pa.decode_config(16, 128, 4, fp8, dtype)


def main(archs: list[int]) -> None:
    for arch in archs:
        for fn, sig, x, consts in configs(arch):
            signature = {k: v.format(x=x) for k, v in sig.items()}
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                      target=GPUTarget("cuda", arch, 32))
            print(json.dumps({"kernel": fn.__name__, "arch": arch, "x": x, **consts,
                              "shared_bytes": compiled.metadata.shared}), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 89, 90])
