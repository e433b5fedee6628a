"""The Workers AI route: POST /client/v4/accounts/{account_id}/ai/run/{model} (contract.md §1–§4, §9).

Input is validated against the hosted schema's fields and documented ranges (400 / 5006 naming the field).
Non-streaming answers come in the v4 envelope; streams are bare SSE `data: {"response": ...}` events, a final
event with cumulative usage, then `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import secrets
from dataclasses import replace
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.llm_engine import ContextWindowError
from engine.sampling_params import SamplingParams
from server.errors import BAD_INPUT, CONTEXT_WINDOW, NO_SUCH_MODEL, ApiError, bad_input, cloudflare_body
from server.generation import ClientGone, admit, collect, finish, follow, padding
from server.structured import OutputSplitter, compile_grammar, parse_tools, response_schema

log = logging.getLogger(__name__)
router = APIRouter()

# name: (lowest, highest, integer) — the hosted schema's documented ranges (contract.md §2.1)
RANGES = {
    "max_tokens": (1, None, True), "temperature": (0, 5, False), "top_p": (0, 2, False), "top_k": (1, 50, True),
    "seed": (1, 9_999_999_999, True), "repetition_penalty": (0, 2, False), "frequency_penalty": (0, 2, False),
    "presence_penalty": (0, 2, False),
}


async def read_json(request: Request) -> dict:
    raw = await request.body()
    if not raw:
        raise bad_input("the request body is empty; send a JSON object with 'prompt' or 'messages'")
    try:
        body = json.loads(raw)
    except ValueError as e:
        raise bad_input(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad_input("the request body must be a JSON object")
    return body


def number(body: dict, name: str):
    v = body.get(name)
    if v is None:
        return None
    lo, hi, integer = RANGES[name]
    # float(v) of a huge JSON integer overflows: only floats need the is_integer check
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and isinstance(v, float)
                                                                   and not v.is_integer()):
        raise bad_input(f"Type mismatch of '/{name}': expected {'an integer' if integer else 'a number'}, "
                        f"got {json.dumps(v)}", name)
    if not (v >= lo and (hi is None or v <= hi)):      # written so that NaN (json.loads accepts it) fails
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise bad_input(f"'/{name}' must be {bound}, got {v}", name)
    return int(v) if integer else float(v)


def sampling_params(body: dict) -> SamplingParams:
    v = {name: number(body, name) for name in RANGES}
    return SamplingParams(
        max_tokens=v["max_tokens"] if v["max_tokens"] is not None else 256,
        temperature=v["temperature"] if v["temperature"] is not None else 0.15,
        top_p=v["top_p"] if v["top_p"] is not None else 1.0, top_k=v["top_k"] or 0, seed=v["seed"],
        repetition_penalty=v["repetition_penalty"] if v["repetition_penalty"] is not None else 1.0,
        frequency_penalty=v["frequency_penalty"] or 0.0, presence_penalty=v["presence_penalty"] or 0.0)


def check_messages(messages) -> None:
    """The hosted schema's shape: content a string, a list of parts, or one part; never null; images only as
    data URIs. Everything else (roles, order, tool ids) is checked by the prompt encoder."""
    if not isinstance(messages, list) or not messages:
        raise bad_input("'/messages' must be a non-empty array", "messages")
    for i, m in enumerate(messages):
        where = f"/messages/{i}"
        if not isinstance(m, dict):
            raise bad_input(f"'{where}' must be an object", "messages")
        content = m.get("content")
        if content is None:
            raise bad_input(f"'{where}/content' must be a string or an array of parts, not null "
                            "(send \"\" for an assistant message that only calls tools)", "messages")
        parts = [content] if isinstance(content, dict) else content if isinstance(content, list) else []
        if not isinstance(content, (str, list, dict)):
            raise bad_input(f"Type mismatch of '{where}/content': expected a string or an array", "messages")
        for j, part in enumerate(parts):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise bad_input(f"'{where}/content/{j}' must be an object with a 'type'", "messages")
            if part["type"] == "image_url":
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str) or not url.startswith("data:"):
                    raise bad_input(f"'{where}/content/{j}/image_url/url' must be a data URI "
                                    "(data:image/...;base64,...); HTTP URLs are not accepted", "messages")


def parse(body: dict):
    """-> (prompt or messages, raw, stream, params)."""
    has_prompt, has_messages = body.get("prompt") is not None, body.get("messages") is not None
    if has_prompt == has_messages:
        raise bad_input("oneOf at '/' not met: send exactly one of 'prompt' or 'messages'")
    if body.get("functions") is not None:
        raise bad_input("'/functions' (code run by the hosted platform) is not supported: this server never "
                        "executes code; use 'tools'", "functions")
    if body.get("lora") is not None:
        raise bad_input("'/lora': LoRA adapters are not supported for this model", "lora")
    for flag in ("raw", "stream"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise bad_input(f"Type mismatch of '/{flag}': expected a boolean", flag)
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise bad_input("'/prompt' must be a non-empty string", "prompt")
    else:
        check_messages(body["messages"])
        prompt = body["messages"]
    return prompt, bool(body.get("raw")) and has_prompt, bool(body.get("stream")), sampling_params(body)


@router.post("/client/v4/accounts/{account_id}/ai/run/{model:path}")
async def run(account_id: str, model: str, request: Request):
    state = request.app.state.server
    model = unquote(model)      # the cloudflare SDK v5 sends @cf%2Fmistralai%2F...: accept it
    if model not in state.settings.model_names:
        raise ApiError(400, NO_SUCH_MODEL, f"No such model {model} or task")
    body = await read_json(request)
    prompt, raw, stream, params = parse(body)
    tools = parse_tools(body.get("tools"))
    if tools is not None and body.get("prompt") is not None:
        raise bad_input("'/tools' needs 'messages' (the chat format), not 'prompt'", "tools")
    schema = response_schema(body.get("response_format"), body.get("guided_json"))
    engine = state.ready_engine().engine
    grammar = compile_grammar(engine, schema, tools)
    if grammar is not None:
        params = replace(params, grammar=grammar)
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    try:
        rs, timer = await admit(state, prompt, params, raw=raw, tools=tools, route="workers",
                                reject_if_busy=bool(options.get("rejectIfBusy")))
    except ContextWindowError as e:
        # the hosted wording; the engine's message carries the split (or why the KV pool cannot hold it)
        raise ApiError(413, CONTEXT_WINDOW, f"{CONTEXT_WINDOW}: {e}") from None
    splitter = OutputSplitter(tools is not None)
    if stream:
        return StreamingResponse(_sse(state, rs, timer, splitter, schema is not None),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        out = await collect(state, rs, timer, request)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    content, _ = splitter.update(out)
    calls = _finished_calls(splitter, out)
    response = content
    if schema is not None:
        _check_json_complete(out)
        json.loads(out.text)                # complete (the grammar's guarantee): never send broken JSON
        response = RawJSON(out.text)        # JSON mode: the object itself, as the hosted JSON mode shows
    return Response(dumps({"result": {"response": response, "tool_calls": calls, "usage": _usage(out)},
                           "success": True, "errors": [], "messages": []}, separators=(",", ":")),
                    media_type="application/json")


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


def _check_json_complete(out) -> None:
    if out.finish_reason == "length":
        raise ApiError(400, BAD_INPUT, f"JSON Mode couldn't be met: max_tokens ran out after "
                       f"{out.usage.completion_tokens} tokens, before the JSON was complete; raise max_tokens")


def _finished_calls(splitter: OutputSplitter, out) -> list[dict]:
    if not splitter.has_calls and not (splitter.tools and out.tool_calls_offset is not None):
        return []         # no call; one begun but cut before its name is complete still fails below
    try:
        return [{"name": c["name"], "arguments": RawJSON(c["arguments_text"])} for c in splitter.calls()]
    except ValueError:
        raise ApiError(400, BAD_INPUT, f"the tool call was cut off by max_tokens after "
                       f"{out.usage.completion_tokens} tokens; raise max_tokens") from None


def _usage(out) -> dict:
    u = out.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


def _event(payload: dict, pad: bool) -> str:
    if pad:
        payload["p"] = padding()
    return f"data: {dumps(payload)}\n\n"


async def _sse(state, rs, timer, splitter: OutputSplitter, json_mode: bool):
    pad = state.settings.stream_padding
    out, cancelled = None, True
    try:
        async for out in follow(rs, timer):
            content, _ = splitter.update(out)
            if content:
                yield _event({"response": content, "tool_calls": []}, pad)
        cancelled = False
        if json_mode:
            _check_json_complete(out)
        calls = _finished_calls(splitter, out)
        if calls:         # the hosted shape: complete calls, as in the non-streamed result
            yield _event({"response": "", "tool_calls": calls}, pad)
        yield f"data: {json.dumps({'response': '', 'usage': _usage(out)})}\n\n"
        yield "data: [DONE]\n\n"
    except ApiError as err:           # the answer cannot be completed as asked: say so in-band
        yield f"data: {json.dumps(cloudflare_body(err))}\n\n"
    except Exception as e:      # noqa: BLE001 - the stream has started: say so in-band, never cut silently
        log.exception("stream %s failed", rs.request_id)
        err = ApiError(500, 3040, f"internal error while generating (request id {rs.request_id}): {e}")
        yield f"data: {json.dumps(cloudflare_body(err))}\n\n"
    finally:
        rs.close()
        finish(state, rs, timer, out, cancelled)
