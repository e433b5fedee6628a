"""Shared helpers for the benchmarks: run metadata (git, machine, versions), seeded prompts, latency
statistics, model presets, result files (JSON + optional PNG) and a plain-text table.

Every benchmark writes one JSON per run under benchmarks/results/ with the same top-level keys
(`commit`, `date`, `machine`, `gpu`, `versions`, `params`, `figures`) so runs can be compared over time.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


# ---- run metadata ------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_info() -> dict:
    """HEAD commit and whether the working tree differs from it (read-only git commands only)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    changed = [line[3:] for line in status.splitlines()] if status else []
    return {"sha": _git("rev-parse", "HEAD"), "dirty": bool(changed), "changed_files": changed[:50]}


def machine_info() -> dict:
    import torch
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    return {"node": platform.node(), "machine": platform.machine(), "processor": platform.processor() or None,
            "system": f"{platform.system()} {platform.release()}", "cpu_count": os.cpu_count(),
            "cpu_affinity": affinity, "torch_threads": torch.get_num_threads()}


def gpu_info() -> dict | None:
    import torch
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
            "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
            "cuda": torch.version.cuda}


def versions(*extra: str) -> dict:
    """Installed versions, read from package metadata (importing transformers or bitsandbytes takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": sys.version.split()[0]}
    for dist in ("torch", "transformers", "mistral_common", "numpy", *extra):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:            # not installed: record that
            out[dist] = None
    return out


def run_metadata(*extra_versions: str) -> dict:
    """The common header of every result file (params and figures are added by the benchmark)."""
    return {"commit": git_info(), "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "machine": machine_info(), "gpu": gpu_info(), "versions": versions(*extra_versions)}


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


# ---- model presets and summaries ---------------------------------------------------------------------------
def model_presets() -> dict:
    """tiny / full from engine.tiny_checkpoint, plus "small": big enough that matmuls, not Python, set the
    pace on a CPU, small enough to benchmark in about a minute on two cores. Real vocabulary (131,072)."""
    from engine.config import TextConfig
    from engine.tiny_checkpoint import PRESETS, TINY
    small = replace(TINY, text=TextConfig(vocab_size=131072, hidden_size=512, intermediate_size=1536,
                                          num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                                          head_dim=64))
    return {"tiny": PRESETS["tiny"], "small": small, "full": PRESETS["full"]}


def model_summary(cfg) -> dict:
    """Shapes and parameter counts of a ModelConfig (computed, no weights needed)."""
    t, v = cfg.text, cfg.vision
    attn = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    layers = t.num_hidden_layers * (attn + mlp + 2 * t.hidden_size)
    embed = t.vocab_size * t.hidden_size
    return {"text": asdict(t), "vision": asdict(v),
            "params": {"decoder_layers": layers, "embedding": embed, "lm_head": embed,
                       "text_total": layers + 2 * embed + t.hidden_size}}


# ---- workloads ---------------------------------------------------------------------------------------------
def random_prompts(n: int, len_range: tuple[int, int], vocab_size: int, seed: int,
                   low_id: int = 1000) -> list[list[int]]:
    """n prompts of random token ids in [low_id, vocab_size), lengths uniform in len_range (inclusive).
    Ids >= 1000 are ordinary tokens in tekken (0..999 are control tokens), so prompts hold no [IMG]/EOS."""
    rng = np.random.default_rng(seed)
    lo, hi = len_range
    lengths = rng.integers(lo, hi + 1, size=n)
    return [rng.integers(low_id, vocab_size, size=int(L)).tolist() for L in lengths]


# ---- statistics --------------------------------------------------------------------------------------------
def stats(values, scale: float = 1.0) -> dict | None:
    """mean / median / p90 / p99 / min / max of a list (multiplied by `scale`, e.g. 1000 for ms)."""
    vals = [float(x) * scale for x in values if x is not None and not math.isnan(x)]
    if not vals:
        return None
    a = np.asarray(vals)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max()), "n": len(vals)}


# ---- output ------------------------------------------------------------------------------------------------
def result_path(out_dir: str | Path, kind: str, label: str, device: str, stamp: str | None = None) -> Path:
    """<out_dir>/<kind>-<label>-<device>-<YYYYmmdd-HHMMSS>.json"""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{kind}-{label}-{device}-{stamp or timestamp()}.json"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def write_json(path: str | Path, obj: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + "\n")
    tmp.replace(path)
    return path


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def format_table(headers: list[str], rows: list[list], floatfmt: str = "{:.1f}") -> str:
    """A fixed-width text table; None prints as '-'."""
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)
    body = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(headers), line, *(fmt(r) for r in body)])
