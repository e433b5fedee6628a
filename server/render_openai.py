"""Deltas as OpenAI bytes: chat.completion(.chunk) and text_completion objects, SSE chunks ending with
`data: [DONE]`, logprobs in OpenAI's two shapes (chat: content[].top_logprobs; completions: parallel lists)."""

from __future__ import annotations

import json
import time
import uuid

from server.errors import ApiError, openai_body
from server.pipeline import Delta, Finished
from server.render import usage_dict


def _token_text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, lps) -> dict | None:
    if lps is None:
        return None
    content = []
    for lp in lps:
        text, raw = _token_text(tokenizer, lp.token_id)
        top = []
        for tid, val in lp.top:
            t, b = _token_text(tokenizer, tid)
            top.append({"token": t, "logprob": val, "bytes": b})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content}


def completion_logprobs(tokenizer, lps, offset: int) -> dict | None:
    if lps is None:
        return None
    tokens, values, tops, offsets = [], [], [], []
    for lp in lps:
        text, _ = _token_text(tokenizer, lp.token_id)
        offsets.append(offset)
        offset += len(text)
        tokens.append(text)
        values.append(lp.logprob)
        tops.append({_token_text(tokenizer, t)[0]: v for t, v in lp.top})
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def finish_reason(f: Finished) -> str:
    return "tool_calls" if f.tool_calls and f.reason == "stop" else f.reason


def openai_calls(f: Finished) -> list[dict] | None:
    """Complete calls; a call cut by max_tokens is dropped (finish_reason "length" says so)."""
    if not f.tool_calls:
        return None
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments_text"]}}
            for c in f.tool_calls]


class OpenAIRenderer:
    def __init__(self, chat: bool, model: str, include_usage: bool, tokenizer):
        self.chat, self.model, self.include_usage, self.tok = chat, model, include_usage, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        self.offset = 0                 # completions' text_offset of the next token
        self.usage = None

    def _chunk(self, choices: list[dict], usage=None) -> str:
        c = {"id": self.id, "object": self.object, "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    def start(self):
        if not self.chat:
            return ()
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def delta(self, d: Delta):
        f = d.finished
        if f is not None:
            self.usage = f.usage
        reason = None if f is None else finish_reason(f) if self.chat else f.reason
        if not self.chat:
            frame = self._chunk([{"index": d.index, "text": d.text, "finish_reason": reason,
                                  "logprobs": completion_logprobs(self.tok, d.logprobs or None, self.offset)}])
            self.offset += len(d.text)
            return [frame]
        delta = {"content": d.text} if d.text else {}
        if d.tool_calls:
            delta["tool_calls"] = [
                {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
                if c.name is not None else {"index": c.index, "function": {"arguments": c.arguments}}
                for c in d.tool_calls]
        return [self._chunk([{"index": d.index, "delta": delta, "finish_reason": reason,
                              "logprobs": chat_logprobs(self.tok, d.logprobs or None)}])]

    def end(self):
        frames = [self._chunk([], usage_dict(self.usage, details=True))] if self.include_usage else []
        return frames + ["data: [DONE]\n\n"]

    def error(self, err: ApiError) -> str:
        return f"data: {json.dumps(openai_body(err))}\n\n"

    def whole(self, answers: list[Finished]) -> dict:
        choices = []
        for i, f in enumerate(answers):
            if self.chat:
                calls = openai_calls(f)
                message = {"role": "assistant", "content": f.content if f.content or not calls else None,
                           "tool_calls": calls}
                choices.append({"index": i, "message": message, "logprobs": chat_logprobs(self.tok, f.logprobs),
                                "finish_reason": finish_reason(f)})
            else:
                choices.append({"index": i, "text": f.text, "logprobs": completion_logprobs(self.tok, f.logprobs, 0),
                                "finish_reason": f.reason})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices,
                "usage": usage_dict(answers[0].usage, details=True)}
