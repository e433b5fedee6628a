"""The stages of the GPU check, one function each; benchmarks/gpu_check.py runs each in its own process.

A stage fills `ctx.details` (everything measured, for the JSON) and `ctx.figures` (headline figures, see
gpu_report.py) and calls `ctx.save()` after each part, so what was measured survives a later crash or
timeout of the same process. It returns (status, error): "ok", "failed" (it ran, a check did not hold) or
"oom"/"error" for a part that could not run; an exception escaping it is recorded by the caller.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from common import REPO_ROOT, model_presets, random_prompts
from gpu_workloads import describe, free_memory, sync, with_engine

QUANT_MODES = {"nf4": ("nf4", "auto"), "int8": ("int8", "auto"), "fp8": ("fp8", "auto"), "kv_fp8": (None, "fp8")}


@dataclass
class StageContext:
    params: object
    work: Path
    results: dict
    deadline: float                          # epoch seconds: optional work must end before this
    checkpoint: Callable[[dict, list], None]
    details: dict = field(default_factory=dict)
    figures: list = field(default_factory=list)

    def save(self) -> None:
        self.checkpoint(self.details, self.figures)

    def figure(self, name: str, value, unit: str, ceiling: str | None = None, **options) -> None:
        self.figures.append({"name": name, "value": value, "unit": unit, "ceiling": ceiling, "options": options})

    def time_left(self) -> float:
        return self.deadline - time.time()

    def stage_details(self, stage: str) -> dict:
        return self.results["stages"].get(stage, {}).get("details", {})


def run(name: str, ctx: StageContext) -> tuple[str, str | None]:
    import gpu_engine_stages  # stages 4-7; it imports this module
    fn = globals().get(f"stage_{name}") or getattr(gpu_engine_stages, f"stage_{name}")
    return fn(ctx)


def _status(errors: list[str]) -> tuple[str, str | None]:
    if not errors:
        return "ok", None
    return ("oom" if any(e.startswith("OutOfMemoryError") for e in errors) else "error"), "; ".join(errors)


# ---- 1: environment and ceilings ---------------------------------------------------------------------------
def _timed(fn, repeats: int, device) -> list[float]:
    """Seconds per call: device events on CUDA (after 3 warm-up calls), the host clock on CPU."""
    for _ in range(3):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1000)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def _copy_seconds(nbytes: int, repeats: int, device) -> float:
    """Median time of a device-to-device copy of `nbytes` of random data (never zeros: METHOD.md)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return float(np.median(_timed(lambda: dst.copy_(src), repeats, device)))


def _matmul_seconds(n: int, dtype: torch.dtype, repeats: int, device) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return float(np.median(_timed(lambda: a @ b, repeats, device)))


def _meminfo() -> dict:
    try:
        rows = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return {k: int(rows[k].split()[0]) * 1024 / 2**30 for k in ("MemTotal", "MemAvailable")}
    except (OSError, KeyError, ValueError):
        return {}


def stage_env(ctx: StageContext):
    p, dev = ctx.params, torch.device(ctx.params.device)
    d = ctx.details
    d["host"] = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                 "memory_gib": _meminfo(),
                 "disk_free_gib": {str(x): shutil.disk_usage(x).free / 2**30 for x in (ctx.work, Path("/tmp"))}}
    d["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None}
    if dev.type == "cuda":
        prop = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        d["gpu"] = {"name": prop.name, "capability": f"{prop.major}.{prop.minor}", "sms": prop.multi_processor_count,
                    "memory_gib": total / 2**30, "free_gib": free / 2**30}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem,power.draw",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20, check=True)
            d["driver"], *clocks = [x.strip() for x in q.stdout.strip().splitlines()[0].split(",")]
            d["nvidia_smi"] = clocks
        except (OSError, subprocess.SubprocessError, IndexError) as e:
            d["driver"] = None
            d["nvidia_smi_error"] = describe(e)
    ctx.save()
    copy_s = _copy_seconds(p.copy_bytes, p.ceiling_repeats, dev)
    copy_gb_s = 2 * p.copy_bytes / copy_s / 1e9
    mm_s = _matmul_seconds(p.matmul_n, getattr(torch, p.dtype), p.ceiling_repeats, dev)
    matmul = 2 * p.matmul_n ** 3 / mm_s / 1e12
    free_memory(dev)
    d["ceilings"] = {"copy_gb_s": copy_gb_s, "matmul_tflop_s": matmul, "copy_bytes": p.copy_bytes,
                     "copy_s_median": copy_s, "matmul_n": p.matmul_n, "matmul_dtype": p.dtype, "matmul_s_median": mm_s,
                     "repeats": p.ceiling_repeats, "timer": "cuda events" if dev.type == "cuda" else "host clock"}
    ctx.figure("copy_gb_s", copy_gb_s, "GB/s", buffer_bytes=p.copy_bytes, counted="read+written")
    ctx.figure("matmul_tflop_s", matmul, "TFLOP/s", n=p.matmul_n, dtype=p.dtype, data="randn")
    return "ok", None


# ---- 2: the tests whose behaviour differs on CUDA ----------------------------------------------------------------
def stage_tests(ctx: StageContext):
    import xml.etree.ElementTree as ET
    present = [t for t in ctx.params.tests if (REPO_ROOT / t.split("::")[0]).exists()]
    ctx.details["missing_test_files"] = sorted(set(ctx.params.tests) - set(present))
    report = ctx.work / "tests-junit.xml"
    report.unlink(missing_ok=True)
    # -m "not slow" includes the tests marked gpu, which CI leaves out
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
           f"--junitxml={report}", *present]
    ctx.details["command"] = " ".join(cmd[1:])
    rc = subprocess.run(cmd, cwd=REPO_ROOT, check=False).returncode
    suites = ET.parse(report).getroot().iter("testsuite") if report.exists() else []
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for s in suites:
        for k in counts:
            counts[k] += int(s.get(k, 0))
        failed += [f"{c.get('classname')}::{c.get('name')}" for c in s.iter("testcase")
                   if c.find("failure") is not None or c.find("error") is not None]
    ctx.details.update(returncode=rc, **counts, failed=failed)
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    ctx.figure("tests_passed", passed, "tests", files=len(present))
    ctx.figure("tests_failed", counts["failures"] + counts["errors"], "tests")
    if rc not in (0, 1) or not counts["tests"]:
        return "error", f"pytest exit status {rc}, {counts['tests']} tests reported"
    if failed or ctx.details["missing_test_files"]:
        return "failed", f"{len(failed)} failed: {', '.join(failed[:5])}" + (
            f"; missing: {ctx.details['missing_test_files']}" if ctx.details["missing_test_files"] else "")
    return "ok", None


# ---- 3: bf16 parity at small shapes ----------------------------------------------------------------------------
def compare_greedy(ref: list, out: list, tie_nats: float) -> dict:
    """Greedy runs of the same prompts (RequestOutputs with top logprobs). Up to each request's first
    differing token both paths saw the same context: there the logprobs of the tokens both list are
    compared. A divergence is a near-tie when the reference ranks the other path's token within `tie_nats`
    of its own choice; otherwise (or when the reference does not list it) it is a real mismatch."""
    diffs, refs = [], []
    identical = ties = real = 0
    prefix = []
    for r, o in zip(ref, out):
        k = next((j for j, (a, b) in enumerate(zip(r.token_ids, o.token_ids)) if a != b), len(r.token_ids))
        prefix.append(k)
        for j in range(k):
            theirs = dict(o.logprobs[j].top)
            for tok, lp in r.logprobs[j].top:
                if tok in theirs:
                    diffs.append(theirs[tok] - lp)
                    refs.append(lp)
        if k == len(r.token_ids):
            identical += 1
            continue
        margin = dict(r.logprobs[k].top).get(o.token_ids[k])
        if margin is not None and r.logprobs[k].logprob - margin <= tie_nats:
            ties += 1
        else:
            real += 1
    diffs, refs = np.asarray(diffs), np.asarray(refs)
    return {"requests": len(ref), "identical": identical, "near_ties": ties, "real_mismatches": real,
            "mean_common_prefix": float(np.mean(prefix)), "compared_logprobs": int(diffs.size),
            "logprob_rel_err": float(np.linalg.norm(diffs) / np.linalg.norm(refs)) if diffs.size else None,
            "logprob_max_abs_err": float(np.abs(diffs).max()) if diffs.size else None}


def stage_parity(ctx: StageContext):
    """Our fast path (the device, bf16, CUDA graphs, Triton kernels) against our reference path (CPU,
    float32, pure PyTorch) on the same small real-format checkpoint; then the fast path's batch against
    each prompt alone."""
    from engine import SamplingParams
    from engine.tiny_checkpoint import write_checkpoint
    p = ctx.params
    cfg = model_presets()[p.parity_preset]
    ckpt = ctx.work / f"parity-{p.parity_preset}"
    if not (ckpt / "model.safetensors.index.json").exists():
        write_checkpoint(ckpt, cfg, "hf", seed=p.seed)
    prompts = random_prompts(p.parity_prompts, p.parity_prompt_len, cfg.text.vocab_size, p.seed)
    n = p.parity_tokens
    sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, logprobs=5)
    window = {"max_model_len": p.parity_prompt_len[1] + n + 16, "max_num_seqs": p.parity_prompts}
    got = {}

    def paths(key: str, alone_too: bool):
        def work(llm, out):
            got[key] = llm.generate(prompts, sp)
            if alone_too:
                got["alone"] = [llm.generate(q, sp)[0] for q in prompts]
        return work

    for key, load, extra, alone in (("reference", {"device": "cpu", "dtype": "float32"}, {}, False),
                                    ("fast", {"device": p.device, "dtype": p.dtype}, {"enforce_eager": False}, True)):
        out, err = with_engine(ckpt, p, {**window, **extra}, paths(key, alone), load_format="auto", **load)
        ctx.details[key] = {"load_s": out.get("load_s"), "options": {**load, **out["options"]}}
        ctx.save()
        if err:
            return _status([f"{key}: {err}"])
    cmp = {"fast_batched_vs_reference": compare_greedy(got["reference"], got["fast"], p.parity_tie_nats),
           "fast_alone_vs_reference": compare_greedy(got["reference"], got["alone"], p.parity_tie_nats),
           "fast_batched_vs_alone": compare_greedy(got["alone"], got["fast"], p.parity_tie_nats)}
    ctx.details.update(comparisons=cmp, tie_nats=p.parity_tie_nats, rel_tol=p.parity_rel_tol,
                       prompts=len(prompts), tokens=n, model=p.parity_preset)
    for name, c in cmp.items():
        ctx.figure(f"parity_{name}_identical", c["identical"] / c["requests"], "fraction",
                   near_ties=c["near_ties"], real_mismatches=c["real_mismatches"])
        if name != "fast_batched_vs_alone":
            ctx.figure(f"parity_{name}_logprob_rel_err", c["logprob_rel_err"], "rel", tol=p.parity_rel_tol)
    bad = [f"{name}: {c['real_mismatches']} real mismatches, logprob rel. error {c['logprob_rel_err']}"
           for name, c in cmp.items() if c["real_mismatches"] or (c["logprob_rel_err"] or 0) > p.parity_rel_tol]
    return ("failed", "; ".join(bad)) if bad else ("ok", None)
