"""Per-request sampling controls. Validated once at construction; every route maps its own schema onto it."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256            # the hosted model's default
    temperature: float = 0.15        # the model card's recommendation and the hosted default; 0 = greedy
    top_p: float = 1.0               # >= 1 disables nucleus sampling
    top_k: int = 0                   # 0 disables top-k
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"{field}: {why}")

        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                bad(name, f"must be a finite number, got {v!r}")
        if self.temperature < 0:
            bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p < 0:
            bad("top_p", f"must be >= 0, got {self.top_p}")
        for name in ("max_tokens", "top_k"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                bad(name, f"must be an integer, got {v!r}")
        if self.max_tokens < 1:
            bad("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", f"must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        # top_p 0 keeps only the most likely token: the same as greedy, never an empty distribution
        return self.temperature == 0 or self.top_k == 1 or self.top_p == 0
