"""Every Triton kernel configuration the engine launches (all autotune candidates included) compiles to
machine code for A100 (8.0), Ada (8.9) and Hopper (9.0), fits their shared memory and spills no register:
what the interpreter-driven tests cannot check. Triton ships ptxas and cuobjdump, so no GPU is needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tools import needs_tool

# Largest shared memory one block may opt into
SHARED_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@needs_tool("triton")
def test_kernels_compile_for_gpus_without_spills():
    from kernel_compile import configs
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile.py")
    r = subprocess.run([sys.executable, str(script), *map(str, SHARED_LIMIT)], capture_output=True, text=True,
                       env=env, timeout=1800, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == sum(len(list(configs(arch))) for arch in SHARED_LIMIT)
    assert {r["kernel"] for r in rows} == {"_nf4_kernel", "_fp8_kernel", "_attention_kernel", "_combine_kernel",
                                           "_store_kernel", "_rms_norm_kernel", "_silu_mul_kernel", "_rotary_kernel"}
    assert {r["arch"] for r in rows if r["kernel"] == "_fp8_kernel"} == {89, 90}       # fp8 from Ada on
    assert {r.get("kv") for r in rows if r["kernel"] == "_attention_kernel" and r["arch"] == 80} == \
        {"bf16", "fp16", "fp32"}
    for row in rows:
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row
        assert row["n_spills"] == 0, row
