"""What an attention backend is: given a layer's q/k/v for the step's tokens and the step's ForwardContext,
store k/v in the paged cache and return the attention output. Chosen once when the engine starts
(engine.layers.attention.select_backend) and handed to every decoder attention layer."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.forward_context import ForwardContext


class AttentionBackend(ABC):
    name: str

    @abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ForwardContext, layer_idx: int,
                scale: float) -> torch.Tensor:
        """q [tokens, heads, d], k/v [tokens, kv_heads, d] (token-strided views allowed) -> [tokens, heads, d].
        Token i of sequence s sits at context position seq_len - query_len + (its index in the sequence) and
        attends to positions 0..itself: the cached prefix plus the step's tokens up to itself. With
        `ctx.kv_caches is None` there is no cache and each sequence attends to its own step tokens only."""

    @abstractmethod
    def graph_safe(self, fp8_kv: bool) -> bool:
        """Whether a decode step through this backend can be captured in a CUDA graph."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
