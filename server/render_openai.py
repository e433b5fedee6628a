"""Deltas as OpenAI bytes: chat.completion(.chunk) and text_completion objects, SSE chunks ending with
`data: [DONE]`, logprobs in OpenAI's two shapes (chat: content[].top_logprobs; completions: parallel lists),
vLLM's prompt_logprobs.

Mistral's API is a variant of the same objects (`Flavour`): its SDK wants every streamed tool call whole
(name and complete arguments in one delta) and the usage on the chunk that carries the last finish_reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from engine.tool_calls import ToolCallDelta
from server.errors import ApiError, openai_body
from server.pipeline import Delta, Finished
from server.render import usage_dict


@dataclass(frozen=True)
class Flavour:
    """How a client wants the shared OpenAI objects."""
    include_usage: bool = False         # stream_options.include_usage: one more chunk, with usage, no choices
    usage_on_finish: bool = False       # Mistral (and vLLM's --enable-force-include-usage): the last chunk
                                        # with a finish_reason carries the usage
    whole_calls: bool = False           # Mistral: a streamed tool call arrives whole, once complete


def token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


# A token the grammar masks out has logprob -inf, which JSON cannot carry: OpenAI's and vLLM's floor instead.
LOGPROB_FLOOR = -9999.0


def _lp(value: float | None) -> float | None:
    return None if value is None else max(value, LOGPROB_FLOOR)


def chat_logprobs(tokenizer, lps) -> dict | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        text, raw = token_text(tokenizer, lp.token_id)
        top = []
        for tid, val in lp.top:
            t, b = token_text(tokenizer, tid)
            top.append({"token": t, "logprob": _lp(val), "bytes": b})
        content.append({"token": text, "logprob": _lp(lp.logprob), "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer, lps, offset: int) -> dict | None:
    """OpenAI's legacy parallel lists; an echoed prompt's first token has no logprob (null, as vLLM's)."""
    if lps is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text, _ = token_text(tokenizer, lp.token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        values.append(_lp(lp.logprob))
        tops.append(None if lp.top is None else {token_text(tokenizer, t)[0]: _lp(v) for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs(tokenizer, lps) -> list | None:
    """vLLM's shape: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}} holding
    the prompt's own token and the top alternatives."""
    if lps is None:
        return None
    out = []
    for lp in lps:
        if lp is None:
            out.append(None)
            continue
        entry = {str(t): {"logprob": _lp(v), "rank": r, "decoded_token": token_text(tokenizer, t)[0]}
                 for r, (t, v) in enumerate(lp.top, 1)}
        entry[str(lp.token_id)] = {"logprob": _lp(lp.logprob), "rank": lp.rank,
                                   "decoded_token": token_text(tokenizer, lp.token_id)[0]}
        out.append(entry)
    return out


def finish_reason(f: Finished) -> str:
    return "tool_calls" if f.tool_calls and f.reason == "stop" else f.reason


def openai_calls(f: Finished) -> list[dict] | None:
    """Complete calls; a call cut by max_tokens is dropped (finish_reason "length" says so)."""
    if not f.tool_calls:
        return None
    return [_whole_call(None, c) for c in f.tool_calls]


def _whole_call(index: int | None, c: dict) -> dict:
    call = {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments_text"]}}
    return call if index is None else {"index": index, **call}


def _call_fragment(c: ToolCallDelta) -> dict:
    if c.name is not None:      # a call's first delta, as OpenAI sends it
        return {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
    return {"index": c.index, "function": {"arguments": c.arguments}}


def _rounds(calls: list[ToolCallDelta]) -> list[list[ToolCallDelta]]:
    """Fragments in order, grouped so that no chunk holds two entries for one call index."""
    rounds: list[list[ToolCallDelta]] = []
    for c in calls:
        if not rounds or any(x.index == c.index for x in rounds[-1]):
            rounds.append([])
        rounds[-1].append(c)
    return rounds


class OpenAIRenderer:
    def __init__(self, chat: bool, model: str, tokenizer, request_id: str, choices: int = 1,
                 flavour: Flavour = Flavour()):
        self.chat, self.model, self.tok, self.choices, self.flavour = chat, model, tokenizer, choices, flavour
        self.id = request_id            # the id the server logs the request under
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.offsets = [0] * choices    # completions' text_offset of each choice's next token
        self.calls_sent = [0] * choices # whole calls already streamed, per choice (Mistral)
        self.usage = None

    def _chunk(self, choices: list[dict], usage=None, **extra) -> str:
        c = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices,
             **extra}
        if usage is not None or self.flavour.include_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    def start(self):
        if not self.chat:
            return ()
        return [self._chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for k in range(self.choices)]

    def delta(self, d: Delta):
        f = d.finished
        if d.usage is not None:
            self.usage = d.usage
        usage = usage_dict(d.usage, details=True) if d.usage is not None and self.flavour.usage_on_finish else None
        if not self.chat:
            return [self._completion_chunk(d, f, usage)]
        reason = None if f is None else finish_reason(f)
        extra = {"prompt_logprobs": prompt_logprobs(self.tok, d.prompt_logprobs)} if d.prompt_logprobs else {}
        deltas = [{"content": d.text} if d.text else {}]
        for i, calls in enumerate(self._call_chunks(d)):
            if i > 0:
                deltas.append({})
            deltas[-1]["tool_calls"] = calls
        frames = []
        for i, delta in enumerate(deltas):
            last = i == len(deltas) - 1
            frames.append(self._chunk(
                [{"index": d.index, "delta": delta, "finish_reason": reason if last else None,
                  "logprobs": chat_logprobs(self.tok, d.logprobs or None) if i == 0 else None}],
                usage if last else None, **(extra if i == 0 else {})))
        return frames

    def _call_chunks(self, d: Delta) -> list[list[dict]]:
        """The tool-call entries of each chunk this delta becomes."""
        if not self.flavour.whole_calls:
            return [[_call_fragment(c) for c in r] for r in _rounds(d.tool_calls)]
        if not d.calls_done:
            return []
        first, self.calls_sent[d.index] = self.calls_sent[d.index], self.calls_sent[d.index] + len(d.calls_done)
        return [[_whole_call(i, c) for i, c in enumerate(d.calls_done, first)]]

    def _completion_chunk(self, d: Delta, f: Finished | None, usage) -> str:
        choice = {"index": d.index, "text": d.text, "finish_reason": None if f is None else f.reason,
                  "logprobs": completion_logprobs(self.tok, d.logprobs or None, self.offsets[d.index])}
        if d.prompt_logprobs:
            choice["prompt_logprobs"] = prompt_logprobs(self.tok, d.prompt_logprobs)
        self.offsets[d.index] += len(d.text)
        return self._chunk([choice], usage)

    def end(self):
        frames = [self._chunk([], usage_dict(self.usage, details=True))] if self.flavour.include_usage else []
        return frames + ["data: [DONE]\n\n"]

    def error(self, err: ApiError) -> str:
        return f"data: {json.dumps(openai_body(err))}\n\n"

    def whole(self, answers: list[Finished], usage) -> dict:
        choices = []
        for i, f in enumerate(answers):
            if self.chat:
                calls = openai_calls(f)
                message = {"role": "assistant", "content": f.content if f.content or not calls else None,
                           "tool_calls": calls}
                choices.append({"index": i, "message": message, "logprobs": chat_logprobs(self.tok, f.logprobs),
                                "finish_reason": finish_reason(f)})
            else:
                choice = {"index": i, "text": f.text, "logprobs": completion_logprobs(self.tok, f.logprobs, 0),
                          "finish_reason": f.reason}
                if f.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs(self.tok, f.prompt_logprobs)
                choices.append(choice)
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": usage_dict(usage, details=True)}
        if self.chat and answers[0].prompt_logprobs is not None:
            body["prompt_logprobs"] = prompt_logprobs(self.tok, answers[0].prompt_logprobs)
        return body
