"""Output processing (vLLM v1's OutputProcessor): the engine core's sampled ids -> RequestOutputs.

Per request: incremental detokenizing, stop strings, logprobs, finish reasons, usage and where a tool call
begins in the text. The core has already decided the token-level endings (EOS, stop token ids, a completed
grammar, max_tokens); a stop string is a text-level ending, found here: `process` returns the ids it ended
so the caller finishes them in the core too.

Text is produced by the UTF-8-safe incremental detokenizer and held back while its tail could still be the
start of a stop string, so a stop string (or a partial match of one) never leaks into the streamed text.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.guided import TOOL_CALLS_ID
from engine.outputs import CoreOutput, RequestOutput, TokenLogprob, Usage
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


class StopStringDetokenizer:
    """One request's text: detokenization and stop-string matching."""

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


@dataclass
class RequestState:
    params: SamplingParams
    num_prompt_tokens: int
    text: StopStringDetokenizer
    output: RequestOutput


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_id
        self.states: dict[str, RequestState] = {}

    def add(self, req: Request) -> None:
        p = req.params
        self.states[req.request_id] = RequestState(
            p, req.num_prompt_tokens, StopStringDetokenizer(self.tokenizer, p.stop),
            RequestOutput(req.request_id, req.prompt_token_ids, logprobs=[] if p.logprobs is not None else None))

    def process(self, outputs: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's sampled tokens. Returns the outputs that changed (finished ones are forgotten after
        this) and the ids of the requests a stop string ended, which the core must finish as well."""
        changed, stopped = [], []
        for co in outputs:
            state = self.states[co.request_id]
            if self._append(state, co):
                stopped.append(co.request_id)
            changed.append(state.output)
            if state.output.finished:
                del self.states[co.request_id]
        return changed, stopped

    def abort(self, request_id: str, num_cached_tokens: int) -> RequestOutput | None:
        state = self.states.pop(request_id, None)
        if state is None:
            return None
        self._finish(state, "cancelled", num_cached_tokens)
        return state.output

    def _append(self, state: RequestState, co: CoreOutput) -> bool:
        """Returns whether a stop string ended the request at this token."""
        out, p, token = state.output, state.params, co.token_id
        out.delta_text, out.delta_token_ids, out.delta_logprobs = "", [token], []
        out.token_ids.append(token)
        if p.logprobs is not None:
            top = list(zip(co.top_ids[:p.logprobs], co.top_logprobs[:p.logprobs])) if p.logprobs else []
            lp = TokenLogprob(token, co.logprob, top)
            out.logprobs.append(lp)
            out.delta_logprobs = [lp]
        if token == TOOL_CALLS_ID and out.tool_calls_offset is None:
            out.tool_calls_offset = state.text.text_length
        is_eos = token == self.eos_id and not p.ignore_eos
        text, stopped = ("", False) if is_eos else state.text.push(token)
        out.delta_text = text
        out.text += text
        if stopped:
            # the text was cut where the stop string begins: nothing held back is released
            self._finish(state, "stop", co.num_cached_tokens, flush=False)
        elif co.finish_reason is not None:
            self._finish(state, co.finish_reason, co.num_cached_tokens)
        else:
            out.usage = Usage(state.num_prompt_tokens, len(out.token_ids), co.num_cached_tokens)
        return stopped

    def _finish(self, state: RequestState, reason: str, num_cached_tokens: int, flush: bool = True) -> None:
        out = state.output
        if flush:
            rest = state.text.finish()
            out.delta_text += rest
            out.text += rest
        out.finish_reason = reason
        out.usage = Usage(state.num_prompt_tokens, len(out.token_ids), num_cached_tokens)
