"""What the engine reports per request: cumulative text and tokens, the step's delta, finish reason, usage.

Text is produced by the UTF-8-safe incremental detokenizer and held back while its tail could still be the
start of a stop string, so a stop string (or a partial match of one) never leaks into the streamed text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.tokenizer import IncrementalDetokenizer, Tokenizer


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


class OutputProcessor:
    """Per-request detokenization and stop-string matching."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = stop
        self._text = ""           # everything detokenized so far
        self._emitted = 0         # length of the prefix of _text already released
        self._searched = 0        # stop strings cannot start before this index in _text

    def push(self, token_id: int) -> tuple[str, bool]:
        """Feed one generated token. Returns (new releasable text, whether a stop string matched)."""
        self._text += self._detok.push(token_id)
        if self._stop:
            hit = min((i for i in (self._text.find(s, self._searched) for s in self._stop) if i >= 0), default=-1)
            if hit >= 0:
                self._text = self._text[:hit]
                return self._release(len(self._text)), True
            longest = max(len(s) for s in self._stop)
            self._searched = max(0, len(self._text) - longest + 1)
            return self._release(len(self._text) - self._holdback()), False
        return self._release(len(self._text)), False

    @property
    def text_length(self) -> int:
        """Characters detokenized so far, including any still held back."""
        return len(self._text)

    def _holdback(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._text)), best, -1):
                if self._text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _release(self, upto: int) -> str:
        upto = max(upto, self._emitted)
        out, self._emitted = self._text[self._emitted:upto], upto
        return out

    def finish(self) -> str:
        """The request ended without a stop string: release what was held back."""
        self._text += self._detok.flush()
        return self._release(len(self._text))
