"""A request inside the engine: its tokens, how many of them have K/V in the cache, its blocks and images.

Token accounting (vLLM v1): a request has `num_tokens` = prompt + generated tokens and `num_computed_tokens`
of them cached. Each step the scheduler gives it some of the difference: a prefill chunk, or the one token
generated last step. Nothing else distinguishes prefill from decode.

The token ids are stored once, in one numpy array sized for prompt + max_tokens (grown by doubling if a
request ever needs more): a decode step appends one id and reads back only the ids it computes, so the work
per step does not depend on the length of the context.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Sequence

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


class Request:
    def __init__(self, request_id: str, prompt_token_ids: Sequence[int] | np.ndarray, params: SamplingParams,
                 seed: int, images: list[ImageInput] | None = None, max_tokens: int = 0, matcher=None):
        self.request_id = request_id
        self.params = params
        self.seed = seed                        # the counter-based random stream's key (user's or drawn)
        self.images = images or []
        self.max_tokens = max_tokens            # output tokens allowed (params.max_tokens)
        self.matcher = matcher                  # llguidance LLMatcher when params.grammar is set
        n = len(prompt_token_ids)
        self.num_prompt_tokens = n
        self._tokens = np.empty(max(n + max_tokens, 1), dtype=np.int64)
        self._tokens[:n] = prompt_token_ids
        self.num_tokens = n                     # prompt + generated
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0              # prompt tokens served from the prefix cache (first admission)
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []     # memo: prefix-cache hash of each full block
        self.num_hashed_blocks = 0              # leading blocks already offered to the prefix cache
        self.num_preemptions = 0
        self.finish_reason: str | None = None

    def append_output(self, token_id: int) -> None:
        if self.num_tokens == len(self._tokens):
            self._tokens = np.concatenate([self._tokens, np.empty_like(self._tokens)])
        self._tokens[self.num_tokens] = token_id
        self.num_tokens += 1

    def token_ids(self, start: int, end: int) -> np.ndarray:
        """Ids [start, end) as a read-only view (valid until the next append)."""
        view = self._tokens[start:min(end, self.num_tokens)]
        view.flags.writeable = False
        return view

    @property
    def all_token_ids(self) -> np.ndarray:
        return self.token_ids(0, self.num_tokens)

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """A fresh list (O(prompt)): for building outputs once, never for per-step work."""
        return self._tokens[:self.num_prompt_tokens].tolist()

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self.num_prompt_tokens:self.num_tokens].tolist()

    @property
    def is_finished(self) -> bool:
        return self.status == RequestStatus.FINISHED
