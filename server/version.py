"""What is running: package version, git commit (when run from a checkout), torch and CUDA.

One function feeds `mistral-small --version` and `GET /version`, so the two always agree.
"""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE = "mistral-small-engine"


@functools.cache
def version_info() -> dict:
    """Computed once per process (git and CUDA probing are not free; none of it changes while running)."""
    import torch

    try:
        package = version(PACKAGE)
    except PackageNotFoundError:      # imported from a source tree that was never installed
        package = None
    cuda = torch.cuda.is_available()
    return {"package": PACKAGE, "version": package, "commit": _git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": cuda,
            "gpu": torch.cuda.get_device_name(0) if cuda else None}


def describe(info: dict) -> str:
    """One line for the terminal."""
    commit = f" (git {info['commit'][:12]})" if info["commit"] else ""
    if info["cuda"] is None:
        cuda = "CPU-only build, no CUDA"
    else:
        cuda = f"CUDA {info['cuda']}, " + (f"GPU: {info['gpu']}" if info["cuda_available"] else "no GPU visible")
    return f"{info['package']} {info['version'] or 'unknown'}{commit} | torch {info['torch']} | {cuda}"


def _git_commit() -> str | None:
    """The checkout this package is imported from (an editable install); None for a wheel or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
