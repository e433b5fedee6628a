"""Decoder attention over the paged KV cache, through a backend chosen once when the engine starts.

- "reference" (reference.py): PyTorch. The CPU path and the oracle of the tests.
- "triton" (triton_unified.py): one Triton kernel per layer for a whole step, prefill chunks (with or
  without a cached prefix) and decodes together, reading the cache in place; the K/V store is a sync-free
  Triton kernel too (store.py). The CUDA default; on CPU it runs in Triton's interpreter (tests).

`select_backend` resolves EngineConfig.attention_backend for the device and KV dtype; `set_backend` hands
the result to every `Attention` layer of a model. Nothing queries the device per layer call.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.config import ATTENTION_BACKENDS as BACKENDS
from engine.forward_context import ForwardContext
from engine.layers import triton_support
from engine.layers.attention.backend import AttentionBackend
from engine.layers.attention.reference import ReferenceBackend

log = logging.getLogger(__name__)


class Attention(nn.Module):
    """The attention op of one decoder layer: q/k/v in, output out; the KV cache comes from the context."""

    def __init__(self, layer_idx: int, scale: float):
        super().__init__()
        self.layer_idx, self.scale = layer_idx, scale
        self.backend: AttentionBackend = REFERENCE

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.backend.forward(q, k, v, ctx, self.layer_idx, self.scale)

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, backend={self.backend.name}"


REFERENCE = ReferenceBackend()


def select_backend(name: str, device: torch.device, fp8_kv: bool) -> AttentionBackend:
    """The backend for `name` ("auto" | "triton" | "reference") on `device`. "auto" is triton on CUDA
    (Triton installed; fp8 KV from compute capability 8.9 on, where Triton converts float8_e4m3fn), else
    the reference. An explicit "triton" that cannot run is an error, never a silent fallback."""
    if name not in BACKENDS:
        raise ValueError(f"attention_backend must be one of {BACKENDS}, got {name!r}")
    problem = _triton_problem(device, fp8_kv)
    if name == "auto" and device.type != "cuda":
        return REFERENCE
    if name == "reference" or (name == "auto" and problem):
        if name == "auto":
            log.warning("attention: the PyTorch reference backend (%s); long contexts need far more memory "
                        "on it", problem)
        return REFERENCE
    if problem:
        raise ValueError(f"attention_backend='triton': {problem}")
    from engine.layers.attention.triton_unified import TritonBackend
    return TritonBackend()


def _triton_problem(device: torch.device, fp8_kv: bool) -> str | None:
    if not triton_support.available():
        return "Triton is not installed"
    if not triton_support.runs_on(device):
        return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1), not {device.type}"
    if fp8_kv and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return "an fp8 KV cache needs compute capability 8.9+ for Triton's float8_e4m3fn"
    return None


def set_backend(model: nn.Module, backend: AttentionBackend) -> None:
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = backend
