"""Triton, when installed, and what every kernel module asks of it: whether kernels can run, whether they
run in Triton's CPU interpreter (tests: TRITON_INTERPRET=1, set before the kernels are defined), and the
device's multiprocessor count that grids are sized against."""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:         # no Triton: `available()` is False and callers keep their PyTorch paths
    triton = tl = None


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_on(device: torch.device) -> bool:
    """Triton kernels can run on tensors of `device`: CUDA, or any device under the interpreter."""
    return available() and (device.type == "cuda" or interpreting())


@functools.cache
def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; 4 elsewhere (the interpreter), so grid sizing stays exercised."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
