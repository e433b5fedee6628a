"""What crosses the engine's seams, as plain data.

- `CoreOutput`: engine core -> output processor, one per request that sampled a token in a step (ids and
  numbers only, no text).
- `RequestOutput`: what the engine reports per request: cumulative text and tokens, the step's delta, finish
  reason, usage (built by engine/output_processor.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CoreOutput:
    request_id: str
    token_id: int
    # "stop" (EOS, a stop token id, grammar complete) or "length" when the core ended the request at this
    # token; stop strings are found later, in text, by the output processor
    finish_reason: str | None
    num_cached_tokens: int                  # prompt tokens served from the prefix cache
    logprob: float | None = None            # raw logprob of token_id, when the step computed logprobs
    top_ids: list[int] | None = None        # the step's top-K alternatives (K = the batch's largest request)
    top_logprobs: list[float] | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0          # prompt tokens whose K/V came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), most likely first


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None      # "stop" (EOS, stop string or stop token), "length", "cancelled"
    usage: Usage = field(default_factory=Usage)
    logprobs: list[TokenLogprob] | None = None
    tool_calls_offset: int | None = None  # where in `text` the [TOOL_CALLS] token came: tool-call JSON follows
    # what this step added (for streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
