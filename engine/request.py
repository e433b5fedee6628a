"""A request inside the engine: its tokens, how many of them have K/V in the cache, its blocks and images.

Token accounting (vLLM v1): a request has `num_tokens` = prompt + generated tokens and `num_computed_tokens`
of them cached. Each step the scheduler gives it some of the difference: a prefill chunk, or the one token
generated last step. Nothing else distinguishes prefill from decode.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


@dataclass
class ImageInput:
    """One image of the prompt: its pixels, identity, and where its [IMG] placeholders sit."""
    pixels: np.ndarray                  # [3, H, W] float32, normalized
    hash: str                           # content hash: the prefix cache must never mix two images
    start: int                          # prompt index of the image's first placeholder token
    end: int                            # prompt index one past its last placeholder ([IMG_END])
    img_positions: np.ndarray           # prompt indices of its [IMG] tokens, ascending
    embeds: torch.Tensor | None = None  # [len(img_positions), hidden] once encoded; dropped after prefill


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int                                      # the counter-based random stream's key (user's or drawn)
    images: list[ImageInput] = field(default_factory=list)
    max_tokens: int = 0                            # params.max_tokens capped by the context window
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0                     # prompt tokens served from the prefix cache (first admission)
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # memo: prefix-cache hash of each full block
    num_hashed_blocks: int = 0                     # leading blocks already offered to the prefix cache
    num_preemptions: int = 0
    finish_reason: str | None = None
    matcher: object | None = None                  # llguidance LLMatcher when params.grammar is set
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        p = self.prompt_token_ids
        if end <= len(p):
            return p[start:end]
        return (p + self.output_token_ids)[start:end]

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
