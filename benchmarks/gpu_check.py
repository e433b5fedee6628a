"""The GPU check: what to run first when a GPU is lent (benchmarks/README.md, "On a lent GPU").

`benchmarks/gpu_check.sh` is the entry point; it calls this file once per step, each stage in its own
process under its own `timeout`:

    gpu_check.py plan   [options]      check packages, start (or resume) the results, print the stages to run
                                       ("plan deadline S", then "plan stage NAME TIMEOUT" lines)
    gpu_check.py stage NAME [options]  run one stage, rewrite the results JSON
    gpu_check.py record NAME --rc N --seconds S   after a stage's process ended: a crash or timeout that the
                                       stage could not write itself is written here
    gpu_check.py table  [options]      headline figures, the printed table, the schema check

Everything lands in two files under --out: gpu_check.json (rewritten after every stage) and gpu_check.log
(appended by the wrapper). Work files (model directories, pytest's report) go under --work, never under
--out (the device tool brings back at most 8 files) and never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

PROCESS_START = time.time()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = "gpu_check.json"
SCHEMA = HERE / "gpu_check.schema.json"
SCHEMA_VERSION = 1
# failed: the stage ran to its end and a check did not hold (it has results: a rerun leaves it alone)
STATUSES = ("ok", "failed", "error", "oom", "timeout", "crashed", "skipped", "running")
HAS_RESULTS = ("ok", "failed")
# import name -> the wheel/package that provides it (carried to the GPU machine as .whl, see the README)
REQUIRED = {"torch": "torch", "safetensors": "safetensors", "numpy": "numpy", "mistral_common": "mistral-common",
            "pydantic": "pydantic", "pydantic_core": "pydantic-core", "llguidance": "llguidance",
            "jsonschema": "jsonschema", "transformers": "transformers", "accelerate": "accelerate",
            "pytest": "pytest", "bitsandbytes": "bitsandbytes", "tqdm": "tqdm"}
REQUIRED_GPU = {"triton": "triton"}


@dataclass(frozen=True)
class Stage:
    name: str
    budget_s: int       # expected seconds at 24B shapes on an H200 (README: the arithmetic)
    timeout_s: int      # the process is killed after this
    what: str


# ordered by value: each stage is worth more than the ones after it if the loan ends early
STAGES = (
    Stage("env", 15, 60, "GPU, driver, versions, disk, memory; copy bandwidth and bf16 matmul rate, measured"),
    Stage("tests", 45, 120, "the tests whose behaviour differs on CUDA: Triton kernels, CUDA-graph capture, bf16"),
    Stage("parity", 25, 90, "bf16 fast path vs the fp32 reference path at small shapes; batched vs alone"),
    Stage("decode", 55, 150, "24B dummy weights: decode at batch 1, 32, 64 (1k context), bandwidth share"),
    Stage("prefill", 70, 180, "24B dummy weights: 8k prefill FLOP rate; TTFT at 32k, and 128k if it fits"),
    Stage("quant", 85, 180, "24B dummy weights: nf4, int8, fp8, fp8 KV decode at batch 1 and 32 vs bf16"),
    Stage("hf", 35, 120, "transformers generate (sdpa, no compile), batch 1, same weights, own process"),
)
STAGE = {s.name: s for s in STAGES}
SETUP_BUDGET_S = 20      # wheel install, the plan process, the record/table processes


@dataclass(frozen=True)
class Params:
    """Workload of every stage. GPU: the real 24B shapes; --cpu-smoke: the same code at tiny shapes."""
    mode: str
    device: str
    dtype: str
    preset: str                                  # model of the decode/prefill/quant/hf stages
    parity_preset: str
    copy_bytes: int                              # ceiling buffers
    matmul_n: int
    ceiling_repeats: int
    tests: tuple[str, ...]
    parity_prompts: int = 8
    parity_prompt_len: tuple[int, int] = (16, 96)
    parity_tokens: int = 32
    parity_tie_nats: float = 0.05                # a greedy divergence is a near-tie below this reference margin
    parity_rel_tol: float = 2e-2
    context: int = 1024                          # prompt tokens of every decode batch
    decode_steps: int = 64                       # decode-only steps timed per batch
    batches: tuple[int, ...] = (1, 32, 64)
    chunk: int = 8192                            # max_num_batched_tokens: prefill chunk
    prefill_len: int = 8192
    long_lens: tuple[int, ...] = (32768, 131071)
    warmup_len: int = 512
    quant_modes: tuple[str, ...] = ("nf4", "int8", "fp8", "kv_fp8")
    quant_batches: tuple[int, ...] = (1, 32)
    hf_new_tokens: int = 64
    seed: int = 0
    max_seconds: int = 540                       # the whole script, inside the device tool's 600-s call
    extra: dict = field(default_factory=dict)


GPU_TESTS = ("tests/test_quant_kernels.py", "tests/test_attention.py", "tests/test_layers.py", "tests/test_cuda_graph.py")
PARAMS = {
    "gpu": Params("gpu", "cuda", "bfloat16", "full", "small", copy_bytes=2 * 2**30, matmul_n=8192,
                  ceiling_repeats=50, tests=GPU_TESTS),
    # tiny shapes, same code paths; one quick test proves the pytest stage's plumbing
    "cpu-smoke": Params("cpu-smoke", "cpu", "bfloat16", "tiny", "tiny", copy_bytes=32 * 2**20, matmul_n=256,
                        ceiling_repeats=5, tests=("tests/test_cuda_graph.py::test_batch_sizes",),
                        parity_prompts=3, parity_prompt_len=(8, 24), parity_tokens=6, context=24,
                        decode_steps=4, batches=(1, 2, 4), chunk=64, prefill_len=64, long_lens=(128, 255),
                        warmup_len=16, quant_batches=(1, 2), hf_new_tokens=6, max_seconds=900),
}


# ---- the results file ----------------------------------------------------------------------------------------
def load(path: Path) -> dict:
    return json.loads(path.read_text())


def save(path: Path, results: dict) -> None:
    """Atomic rewrite, headline figures and table recomputed from the stage entries."""
    from common import write_json
    from gpu_report import summarize
    summarize(results, STAGES)
    write_json(path, results)


def header(params: Params) -> dict:
    import torch
    from common import run_metadata
    meta = run_metadata("triton", "bitsandbytes", "accelerate")
    versions = meta["versions"]
    versions["cuda"] = torch.version.cuda
    versions["driver"] = None           # the env stage reads it from nvidia-smi
    return {"schema_version": SCHEMA_VERSION, **meta,
            "params": {**asdict(params), "stages": {s.name: asdict(s) for s in STAGES},
                       "setup_budget_s": SETUP_BUDGET_S},
            "stages": {}, "ceilings": {"copy_gb_s": None, "matmul_tflop_s": None}, "figures": {}, "table": ""}


def missing_packages(params: Params) -> list[str]:
    import importlib.util
    need = {**REQUIRED, **(REQUIRED_GPU if params.device == "cuda" else {})}
    return sorted({pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None})


def cmd_plan(args, params: Params) -> int:
    missing = missing_packages(params)
    if missing:
        print(f"gpu_check: missing packages: {', '.join(missing)}. Carry them as wheels: run "
              "../shared/device/fetch-wheels.sh --quant in the repository, then call with carry: [\".whl\"]",
              file=sys.stderr)
        return 3
    try:
        import engine.llm_engine  # noqa: F401  (every engine import, before any stage spends time)
    except ImportError as e:
        print(f"gpu_check: the engine does not import: {e}", file=sys.stderr)
        return 3
    if params.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("gpu_check: torch sees no CUDA device (use --cpu-smoke on a CPU machine)", file=sys.stderr)
            return 3
    path = args.out / RESULTS
    old = load(Path(args.resume)) if args.resume else (load(path) if path.exists() else None)
    if old is not None and old["params"]["mode"] != params.mode:
        print(f"gpu_check: {args.resume or path} holds a {old['params']['mode']} run, not {params.mode}",
              file=sys.stderr)
        return 2
    results = header(params)
    if old is not None:
        results["stages"] = old["stages"]
    wanted = args.stages.split(",") if args.stages else [s.name for s in STAGES]
    if unknown := [n for n in wanted if n not in STAGE]:
        print(f"gpu_check: unknown stages {unknown}; choose from {[s.name for s in STAGES]}", file=sys.stderr)
        return 2
    todo = [s for s in STAGES if s.name in wanted
            and results["stages"].get(s.name, {}).get("status") not in HAS_RESULTS]
    save(path, results)
    # prefixed: whatever an import prints on stdout cannot be taken for the plan
    print(f"plan deadline {params.max_seconds}")
    for s in todo:
        print(f"plan stage {s.name} {s.timeout_s}")
    return 0


def cmd_stage(args, params: Params) -> int:
    import gpu_stages
    path = args.out / RESULTS
    stage = STAGE[args.name]
    results = load(path)
    entry = {"status": "running", "seconds": None, "wall_s": None, "budget_s": stage.budget_s,
             "timeout_s": stage.timeout_s,
             "error": None, "commit": results["commit"]["sha"], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
             "figures": [], "details": {}}
    results["stages"][stage.name] = entry
    save(path, results)
    start = time.perf_counter()
    # optional work (the 128k prompt) runs only if it is predicted to end within the stage's budget
    deadline = PROCESS_START + min(stage.budget_s, args.limit or stage.budget_s)

    def checkpoint(details: dict, figures: list[dict]) -> None:
        """Partial results survive a later crash or kill of this process."""
        entry.update(details=details, figures=figures, seconds=time.perf_counter() - start)
        save(path, results)

    ctx = gpu_stages.StageContext(params=params, work=args.work, results=results, deadline=deadline,
                                  checkpoint=checkpoint)
    print(f"==== stage {stage.name}: {stage.what}", flush=True)
    try:
        status, error = gpu_stages.run(stage.name, ctx)
    except Exception as e:          # the stage's own failure: recorded, the next stages still run
        import traceback
        traceback.print_exc()
        status, error = ("oom" if "OutOfMemoryError" in type(e).__name__ else "error"), f"{type(e).__name__}: {e}"
    entry.update(status=status, error=error, seconds=time.perf_counter() - start,
                 details=ctx.details, figures=ctx.figures)
    save(path, results)
    print(f"==== stage {stage.name}: {status} in {entry['seconds']:.1f} s" + (f": {error}" if error else ""),
          flush=True)
    return 0 if status == "ok" else 1


def cmd_record(args, params: Params) -> int:
    """After a stage's process ended (or was never started): write what the process could not, print the
    stage's line."""
    path = args.out / RESULTS
    results = load(path)
    stage = STAGE[args.name]
    blank = {"budget_s": stage.budget_s, "timeout_s": stage.timeout_s, "figures": [], "details": {},
             "commit": results["commit"]["sha"], "started": None}
    entry = results["stages"].get(stage.name)
    wall = time.time() - args.started if args.started else 0.0
    if args.skip:
        results["stages"][stage.name] = {**blank, "status": "skipped", "seconds": 0.0, "wall_s": 0.0,
                                         "error": args.skip}
    elif entry is None or entry["status"] == "running":   # the process died before it could say how it ended
        limit = min(stage.timeout_s, args.limit or stage.timeout_s)
        timed_out = args.rc in (124, 137) and wall >= limit
        why = f" after the {limit}-s limit" if timed_out else " (killed: out of host memory?)" if args.rc == 137 else ""
        results["stages"][stage.name] = {**blank, **(entry or {}), "status": "timeout" if timed_out else "crashed",
                                         "seconds": wall, "wall_s": wall, "error": f"exit status {args.rc}{why}"}
    else:           # the stage wrote its own result; add the process's whole time (start-up and imports too)
        entry["wall_s"] = wall
    save(path, results)
    e = results["stages"][stage.name]
    print(f"==== {stage.name}: {e['status']} in {e['wall_s']:.1f} s" + (f": {e['error']}" if e.get("error") else ""),
          flush=True)
    return 0


def cmd_table(args, params: Params) -> int:
    from gpu_report import validate
    path = args.out / RESULTS
    results = load(path)
    save(path, results)          # the table of the final state
    results = load(path)
    print(results["table"])
    problems = validate(results, SCHEMA)
    print("schema: " + ("valid" if not problems else "INVALID\n  " + "\n  ".join(problems)))
    print(f"results: {path}  (from a GPU run: copy it to benchmarks/results/ and commit it)")
    ran = args.stages.split(",") if args.stages else [s.name for s in STAGES]
    bad = [n for n in ran if results["stages"].get(n, {}).get("status") != "ok"]
    return 1 if bad or problems else 0


def main(argv=None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cpu-smoke", action="store_true", help="every stage at tiny shapes on the CPU")
    common.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/gpu-check-out")))
    common.add_argument("--work", type=Path, default=Path("/tmp/gpu-check-work"))
    common.add_argument("--stages", default=None, help="comma-separated; those without an ok result run")
    common.add_argument("--resume", default=None, help="a results JSON of an earlier run to complete")
    common.add_argument("--limit", type=int, default=None, help="seconds this stage may take (wrapper)")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan", parents=[common])
    p = sub.add_parser("stage", parents=[common])
    p.add_argument("name", choices=list(STAGE))
    p = sub.add_parser("record", parents=[common])
    p.add_argument("name", choices=list(STAGE))
    p.add_argument("--rc", type=int, default=0, help="the stage process's exit status")
    p.add_argument("--started", type=float, default=None, help="epoch seconds when the wrapper started it")
    p.add_argument("--skip", default=None, help="record the stage as skipped, with this reason")
    sub.add_parser("table", parents=[common])
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    params = PARAMS["cpu-smoke" if args.cpu_smoke else "gpu"]
    return {"plan": cmd_plan, "stage": cmd_stage, "record": cmd_record, "table": cmd_table}[args.cmd](args, params)


if __name__ == "__main__":
    sys.exit(main())
