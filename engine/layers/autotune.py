"""A short, cached choice among a kernel's shipped configurations, per device and shape class.

Each kernel ships a small candidate list (tests/kernel_compile.py compiles every one of them for sm_80/89/90
and checks it does not spill). On a CUDA device the first call of a (device name, kernel, shape class)
times each candidate a few times on the call's own inputs and keeps the fastest: in memory for the
process, and on disk (`$MISTRAL_SMALL_AUTOTUNE_CACHE`, default ~/.cache/mistral-small-engine/autotune.json;
set it to "" to keep choices in memory only) so later processes skip the timing. The timing runs once per
class, at start (the memory profile and the CUDA-graph warm-up reach every class the engine uses), never
inside a graph capture: there the first candidate is used without timing.

On CPU (Triton's interpreter) the first candidate is taken without timing, so tests are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from engine.layers.triton_support import interpreting, triton

log = logging.getLogger(__name__)
REPS = 5
_memory: dict[str, dict] = {}
_chosen: dict[tuple, dict] = {}         # the same choices by a cheap key, for the per-launch lookup


def cache_path() -> Path | None:
    env = os.environ.get("MISTRAL_SMALL_AUTOTUNE_CACHE")
    if env is not None:
        return Path(env) if env else None
    return Path.home() / ".cache" / "mistral-small-engine" / "autotune.json"


def pick(kernel: str, shape_class: tuple, candidates: list[dict], run: Callable[[dict], None],
         device: torch.device) -> dict:
    """The candidate `run(config)` is fastest with on `device`; candidates[0] off CUDA or while capturing."""
    if device.type != "cuda" or interpreting() or len(candidates) == 1:
        return candidates[0]
    fast = (kernel, shape_class, device.index, tuple(tuple(sorted(c.items())) for c in candidates))
    if fast in _chosen:
        return _chosen[fast]
    if torch.cuda.is_current_stream_capturing():
        return _memory.get(_key(kernel, shape_class, candidates, device), candidates[0])
    _chosen[fast] = choose(_key(kernel, shape_class, candidates, device), candidates, lambda c: _time(run, c))
    return _chosen[fast]


def choose(key: str, candidates: list[dict], measure: Callable[[dict], float]) -> dict:
    """Cached (memory, then disk) or measured choice; `measure` returns seconds, inf for a failed candidate."""
    if key in _memory:
        return _memory[key]
    path = cache_path()
    stored = _read(path).get(key) if path else None
    if stored in candidates:
        _memory[key] = stored
        return stored
    times = [measure(c) for c in candidates]
    best = min(range(len(candidates)), key=times.__getitem__)
    if math.isinf(times[best]):
        raise RuntimeError(f"{key}: no configuration of the kernel ran")
    _memory[key] = candidates[best]
    log.info("autotune %s: %s (%s)", key, candidates[best], ", ".join(f"{t * 1e6:.0f} us" for t in times))
    if path:
        _write(path, key, candidates[best])
    return candidates[best]


def _key(kernel: str, shape_class: tuple, candidates: list[dict], device: torch.device) -> str:
    # the candidate list is part of the key: a changed list never reuses a stale choice
    return (f"{torch.cuda.get_device_name(device)}|triton {triton.__version__}|{kernel}|{shape_class}|"
            f"{hashlib.sha1(json.dumps(candidates, sort_keys=True).encode()).hexdigest()[:8]}")


def _time(run: Callable[[dict], None], config: dict) -> float:
    try:
        run(config)                                 # compiles, and settles caches
        torch.cuda.synchronize()
        times = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run(config)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    except Exception as e:  # noqa: BLE001 (e.g. more shared memory than this GPU has: skip the candidate)
        log.warning("autotune: %s failed (%s: %s)", config, type(e).__name__, e)
        return math.inf


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: Path, key: str, config: dict) -> None:
    """Merge one entry and replace the file atomically (other processes may write it too)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read(path)
        data[key] = config
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError as e:
        log.warning("autotune: cannot write %s (%s); the choice stays in memory", path, e)
