"""Every Triton kernel configuration the engine launches compiles to machine code for A100 (8.0), Ada (8.9)
and Hopper (9.0) and fits their shared memory: what the interpreter-driven tests cannot check. Triton
ships ptxas, so no GPU is needed."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tools import needs_tool

# Largest shared memory one block may opt into
SHARED_LIMIT = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


@needs_tool("triton")
def test_kernels_compile_for_gpus():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("kernel_compile.py")
    r = subprocess.run([sys.executable, str(script), *map(str, SHARED_LIMIT)], capture_output=True, text=True,
                       env=env, timeout=900, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    # quantized matmuls: nf4 on every arch, fp8 from 8.9 on; x in bf16/fp16/fp32; 1, 16 and 64 rows.
    # decode attention: x in bf16/fp16/fp32, with an fp8 cache from 8.9 on.
    assert len(rows) == (9 + 18 + 18) + (3 + 6 + 6)
    assert {r["kernel"] for r in rows} == {"_nf4_kernel", "_fp8_kernel", "_decode_kernel"}
    for row in rows:
        assert row["shared_bytes"] <= SHARED_LIMIT[row["arch"]], row
