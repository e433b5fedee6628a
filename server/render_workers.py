"""Deltas as Workers AI bytes (contract.md §1.2, §3, §4): the v4 envelope for whole answers; for streams, bare
SSE `data: {"response": ...}` events with the random `p` padding, the complete tool calls in one event, a
final event with cumulative usage, then `data: [DONE]`.

The hosted route has no finish reason, so an answer that cannot be delivered as asked is an error: JSON mode
cut by max_tokens ("JSON Mode couldn't be met"), or a tool call cut off before it was complete.
"""

from __future__ import annotations

import json
import secrets
import string

from fastapi.responses import Response

from server.errors import BAD_INPUT, ApiError, cloudflare_body
from server.pipeline import Delta, Finished, GenerationRequest
from server.render import usage_dict

_PAD = string.ascii_letters + string.digits


def padding() -> str:
    """Random-length filler like the hosted service's `p` field, against token-length side channels."""
    return "".join(secrets.choice(_PAD) for _ in range(secrets.randbelow(48) + 4))


class RawJSON:
    """Generated JSON put into a response as written: a valid number such as 1e999 has no float to go through."""

    def __init__(self, text: str):
        self.text = text


def dumps(payload, **kwargs) -> str:
    """json.dumps with RawJSON values spliced in verbatim."""
    nonce, raws = secrets.token_hex(8), []

    def default(o):
        if not isinstance(o, RawJSON):
            raise TypeError(f"{type(o).__name__} is not JSON serializable")
        raws.append(o.text)
        return f"{nonce}:{len(raws) - 1}"

    text = json.dumps(payload, ensure_ascii=False, allow_nan=False, default=default, **kwargs)
    for i, raw in enumerate(raws):
        text = text.replace(f'"{nonce}:{i}"', raw, 1)
    return text


class WorkersRenderer:
    def __init__(self, req: GenerationRequest, pad: bool):
        self.json_mode = req.schema is not None
        self.pad = pad
        self.finished: Finished | None = None

    def _event(self, payload: dict) -> str:
        if self.pad:
            payload["p"] = padding()
        return f"data: {dumps(payload)}\n\n"

    def start(self):
        return ()

    def delta(self, d: Delta):
        if d.finished is not None:
            self.finished = d.finished
        return [self._event({"response": d.text, "tool_calls": []})] if d.text else []

    def end(self):
        f = self.finished
        self._check_json(f)
        frames = []
        calls = self._calls(f)
        if calls:           # the hosted shape: complete calls, as in the non-streamed result
            frames.append(self._event({"response": "", "tool_calls": calls}))
        frames.append(f"data: {json.dumps({'response': '', 'usage': usage_dict(f.usage)})}\n\n")
        frames.append("data: [DONE]\n\n")
        return frames

    def error(self, err: ApiError) -> str:
        return f"data: {json.dumps(cloudflare_body(err))}\n\n"

    def whole(self, answers: list[Finished]) -> Response:
        f = answers[0]
        calls = self._calls(f)
        response = f.content
        if self.json_mode:
            self._check_json(f)
            json.loads(f.text)              # complete (the grammar's guarantee): never send broken JSON
            response = RawJSON(f.text)      # JSON mode: the object itself, as the hosted JSON mode shows
        return Response(dumps({"result": {"response": response, "tool_calls": calls, "usage": usage_dict(f.usage)},
                               "success": True, "errors": [], "messages": []}, separators=(",", ":")),
                        media_type="application/json")

    def _check_json(self, f: Finished) -> None:
        if self.json_mode and f.reason == "length":
            raise ApiError(400, BAD_INPUT, f"JSON Mode couldn't be met: max_tokens ran out after "
                           f"{f.usage.completion_tokens} tokens, before the JSON was complete; raise max_tokens")

    @staticmethod
    def _calls(f: Finished) -> list[dict]:
        if f.calls_cut:
            raise ApiError(400, BAD_INPUT, f"the tool call was cut off by max_tokens after "
                           f"{f.usage.completion_tokens} tokens; raise max_tokens")
        return [{"name": c["name"], "arguments": RawJSON(c["arguments_text"])} for c in f.tool_calls or []]
