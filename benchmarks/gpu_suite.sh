#!/usr/bin/env bash
# What to run when a GPU is lent, as few long calls (device time is scarce: 30 min a session, 10 min a call).
# Each stage writes under $OUT (the device tool brings it back) and benchmarks/results/.
#
# Here, once:   ../shared/device/fetch-wheels.sh --quant      (wheels into .whl, git-ignored)
# There:        bash benchmarks/gpu_suite.sh tests            (~3 min: kernel + engine tests on CUDA)
#               bash benchmarks/gpu_suite.sh quant            (~6 min: decode tok/s of every mode, 24B shapes)
#               bash benchmarks/gpu_suite.sh quant-eager      (~5 min: the same for ref/nf4/fp8 without CUDA graphs)
#               bash benchmarks/gpu_suite.sh offline          (~8 min: engine vs HF generate, 24B shapes)
# with `carry: [".whl"]` in each call. Copy $OUT's JSON into benchmarks/results/ and commit it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$PWD/.site" \
    .whl/*.whl || exit 1
  export PYTHONPATH="$PWD/.site:$PWD"
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

case "${1:-}" in
  tests)
    # conftest leaves TRITON_INTERPRET unset with CUDA: the quantized kernels compile and run for real
    # -m "not slow" includes the tests marked gpu (CUDA graph capture), which CI leaves out
    python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_quant_kernels.py tests/test_attention.py tests/test_layers.py \
      tests/test_cuda_graph.py tests/test_quant.py tests/test_model_parity.py tests/test_engine.py 2>&1 | tee "$OUT/tests.log"
    ;;
  quant)
    python3 benchmarks/bench_quant.py --preset full --device cuda --no-quality --speed \
      --modes ref,nf4,nf4-bnb,fp8,fp8-w8a8,int8 --batch-sizes 1,8,32 --context 1024 --steps 32 \
      --out "$OUT" 2>&1 | tee "$OUT/quant.log"
    ;;
  quant-eager)
    python3 benchmarks/bench_quant.py --preset full --device cuda --no-quality --speed --enforce-eager \
      --modes ref,nf4,fp8 --batch-sizes 1,8,32 --context 1024 --steps 64 --out "$OUT" 2>&1 | tee "$OUT/quant-eager.log"
    ;;
  offline)
    python3 -m engine.tiny_checkpoint /tmp/full --preset full --format hf --device cuda 2>&1 | tail -2
    python3 benchmarks/bench_offline.py --model /tmp/full --device cuda --num-requests 16 --out "$OUT" \
      2>&1 | tee "$OUT/offline.log"
    python3 benchmarks/bench_offline.py --model /tmp/full --device cuda --num-requests 16 --out "$OUT" \
      --paths ours-batched ours-single --enforce-eager 2>&1 | tee "$OUT/offline-eager.log"
    ;;
  *)
    echo "usage: $0 tests|quant|quant-eager|offline" >&2
    exit 2
    ;;
esac
