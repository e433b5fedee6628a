"""OpenAI-compatible routes under /v1 and /client/v4/accounts/{account_id}/ai/v1: chat/completions,
completions, models. OpenAI's own ranges and fields, plus vLLM's min_tokens / ignore_eos / top_k /
repetition_penalty; defaults as the hosted model (max_tokens 256, temperature 0.15)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from engine.llm_engine import ContextWindowError
from engine.sampling_params import SamplingParams
from server.errors import ApiError, bad_input, openai_body
from server.generation import ClientGone, admit, collect, finish, follow
from server.structured import OutputSplitter, compile_grammar, parse_tools, response_schema
from server.workers import read_json

log = logging.getLogger(__name__)
router = APIRouter()
PREFIXES = ("/v1", "/client/v4/accounts/{account_id}/ai/v1")
UNSUPPORTED = {"functions": "functions (use tools)", "function_call": "function_call (use tool_choice)"}


def _num(body: dict, name: str, lo: float, hi: float, integer: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and isinstance(v, float)
                                                                   and not v.is_integer()):
        raise bad_input(f"{name} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", name)
    if not lo <= v <= hi:
        raise bad_input(f"{name} must be between {lo} and {hi}, got {v}", name)
    return int(v) if integer else float(v)


def sampling_params(body: dict, chat: bool) -> SamplingParams:
    for key, what in UNSUPPORTED.items():
        if body.get(key) is not None:
            raise bad_input(f"{what} is not supported by this server", key)
    if body.get("n", 1) != 1:
        raise bad_input("only n=1 is supported", "n")
    if not chat and (body.get("echo") or body.get("suffix") or body.get("best_of", 1) != 1):
        raise bad_input("echo, suffix and best_of are not supported", "echo")
    big = 10**9
    max_tokens = _num(body, "max_completion_tokens", 1, big, True) if chat else None
    max_tokens = max_tokens or _num(body, "max_tokens", 1, big, True) or 256
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise bad_input("stop must be a non-empty string or a list of up to 16 of them", "stop")
    if chat:
        want = body.get("logprobs")
        if want is not None and not isinstance(want, bool):
            raise bad_input("logprobs must be a boolean", "logprobs")
        top = _num(body, "top_logprobs", 0, 20, True)
        if top is not None and not want:
            raise bad_input("top_logprobs requires logprobs: true", "top_logprobs")
        logprobs = (top or 0) if want else None
    else:
        logprobs = _num(body, "logprobs", 0, 5, True)
    top_k = _num(body, "top_k", -1, big, True)
    if top_k == 0:
        top_k = None
    min_tokens = _num(body, "min_tokens", 0, max_tokens, True) or 0
    if body.get("ignore_eos") is not None and not isinstance(body["ignore_eos"], bool):
        raise bad_input("ignore_eos must be a boolean", "ignore_eos")
    seed = _num(body, "seed", -(2**63), 2**63 - 1, True)
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=_v(_num(body, "temperature", 0, 2), 0.15),
            top_p=_v(_num(body, "top_p", 0, 1), 1.0), top_k=top_k or 0,
            seed=None if seed is None else seed % 2**63,
            frequency_penalty=_v(_num(body, "frequency_penalty", -2, 2), 0.0),
            presence_penalty=_v(_num(body, "presence_penalty", -2, 2), 0.0),
            repetition_penalty=_v(_num(body, "repetition_penalty", 0, 2), 1.0),
            stop=tuple(stop or ()), min_tokens=min_tokens, ignore_eos=bool(body.get("ignore_eos")),
            logprobs=logprobs)
    except ValueError as e:
        raise bad_input(str(e)) from None


def _v(value, default):
    return default if value is None else value


def check_model(state, body: dict) -> str:
    model = body.get("model")
    if model is None:
        return state.settings.model_names[0]
    if model not in state.settings.model_names:
        raise ApiError(404, 5007, f"The model `{model}` does not exist. Available: "
                       f"{', '.join(state.settings.model_names)}", param="model", openai_code="model_not_found")
    return model


def context_error(e: ContextWindowError, what: str) -> ApiError:
    return ApiError(400, 5021, f"This model's maximum context length is {e.limit} tokens. However, you requested "
                    f"{e.prompt_tokens + e.max_tokens} tokens ({e.prompt_tokens} in the {what}, {e.max_tokens} in "
                    f"the completion). Please reduce the length of the {what} or completion.", param=what,
                    openai_code="context_length_exceeded")


def _usage(out) -> dict:
    u = out.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


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


def _register(path: str, handler) -> None:
    for prefix in PREFIXES:
        router.add_api_route(prefix + path, handler, methods=["POST"] if path != "/models" else ["GET"])


async def chat_completions(request: Request):
    return await _generate(request, chat=True)


async def completions(request: Request):
    return await _generate(request, chat=False)


async def models(request: Request):
    state = request.app.state.server
    s = state.settings
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "demo-random-weights" if s.demo else "mistralai",
         "root": s.model_path, "demo": s.demo,
         "max_model_len": state.engine.engine.config.max_model_len if state.engine else None,
         **({"note": "DEMO: answers come from random weights, not Mistral Small 3.1"} if s.demo else {})}
        for name in s.model_names]}


def tool_choice(body: dict, tools: list[dict] | None):
    """-> "auto" | "none" | "required" | a tool name; None without tools."""
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_input('tool_choice must be "auto", "none", "required" or '
                            '{"type": "function", "function": {"name": ...}}', "tool_choice")
        choice = fn["name"]
    elif choice is not None and choice not in ("auto", "none", "required"):
        raise bad_input(f"tool_choice {choice!r} is not one of auto, none, required or a named function",
                        "tool_choice")
    if tools is None:
        if choice not in (None, "auto", "none"):
            raise bad_input(f"tool_choice {choice!r} needs tools", "tool_choice")
        return None
    if choice not in (None, "auto", "none", "required") and choice not in [t["name"] for t in tools]:
        raise bad_input(f"tool_choice names {choice!r}, which is not among the tools", "tool_choice")
    return choice or "auto"


async def _generate(request: Request, chat: bool):
    state = request.app.state.server
    body = await read_json(request)
    model = check_model(state, body)
    params = sampling_params(body, chat)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_input("stream must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    if not chat and body.get("tools") is not None:
        raise bad_input("tools need /chat/completions", "tools")
    tools = parse_tools(body.get("tools"))
    choice = tool_choice(body, tools)
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise bad_input("parallel_tool_calls must be a boolean", "parallel_tool_calls")
    schema = response_schema(body.get("response_format"), body.get("guided_json"))
    grammar = compile_grammar(state.ready_engine().engine, schema, tools, choice, parallel)
    if grammar is not None:
        params = replace(params, grammar=grammar)
    if chat:
        prompt, raw, what = body.get("messages"), False, "messages"
        if not isinstance(prompt, list) or not prompt:
            raise bad_input("messages must be a non-empty array", "messages")
    else:
        prompt, raw, what = body.get("prompt"), True, "prompt"
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise bad_input("prompt must be a non-empty string", "prompt")
        if not prompt.startswith("<s>"):
            prompt = "<s>" + prompt       # like vLLM's completions: the tokenizer's BOS comes first
    try:
        rs, timer = await admit(state, prompt, params, raw=raw, tools=tools,
                                route="openai-chat" if chat else "openai-completions")
    except ContextWindowError as e:
        raise context_error(e, what) from None
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    tok = state.engine.engine.tokenizer
    splitter = OutputSplitter(tools is not None and choice != "none")
    if stream:
        return StreamingResponse(_sse(state, rs, timer, rid, created, model, chat, include_usage, tok, splitter),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        out = await collect(state, rs, timer, request)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    if chat:
        content, _ = splitter.update(out)
        calls = _openai_calls(splitter)
        message = {"role": "assistant", "content": content if content or not calls else None, "tool_calls": calls}
        choice_obj = {"index": 0, "message": message, "logprobs": chat_logprobs(tok, out.logprobs),
                      "finish_reason": _finish_reason(out, calls)}
        obj = "chat.completion"
    else:
        choice_obj = {"index": 0, "text": out.text, "logprobs": completion_logprobs(tok, out.logprobs, 0),
                      "finish_reason": out.finish_reason}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice_obj],
            "usage": _usage(out)}


def _openai_calls(splitter) -> list[dict] | None:
    if not splitter.has_calls:
        return None
    try:
        calls = splitter.calls()
    except ValueError:          # cut off by max_tokens: finish_reason "length" says so
        return None
    return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments_text"]}}
            for c in calls]


def _finish_reason(out, calls) -> str | None:
    return "tool_calls" if calls and out.finish_reason == "stop" else out.finish_reason


async def _sse(state, rs, timer, rid, created, model, chat, include_usage, tok, splitter):
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices, usage=None):
        c = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return f"data: {json.dumps(c, ensure_ascii=False)}\n\n"

    out, cancelled, offset = None, True, 0
    try:
        if chat:
            yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}])
        async for out in follow(rs, timer):
            if chat:
                content, calls = splitter.update(out)
                delta = {"content": content} if content else {}
                if calls:
                    delta["tool_calls"] = [
                        {"index": d.index, "id": d.id, "type": "function",
                         "function": {"name": d.name, "arguments": ""}} if d.name is not None else
                        {"index": d.index, "function": {"arguments": d.arguments}} for d in calls]
                reason = _finish_reason(out, splitter.has_calls) if out.finished else None
                if delta or out.finished or out.delta_logprobs:
                    yield chunk([{"index": 0, "delta": delta, "finish_reason": reason,
                                  "logprobs": chat_logprobs(tok, out.delta_logprobs or None)}])
            elif out.delta_text or out.finished or out.delta_logprobs:
                yield chunk([{"index": 0, "text": out.delta_text, "finish_reason": out.finish_reason,
                              "logprobs": completion_logprobs(tok, out.delta_logprobs or None, offset)}])
                offset += len(out.delta_text)
        cancelled = False
        if include_usage:
            yield chunk([], _usage(out))
        yield "data: [DONE]\n\n"
    except Exception as e:      # noqa: BLE001 - in-band error: the openai SDK raises APIError on an `error` key
        log.exception("stream %s failed", rs.request_id)
        err = ApiError(500, 5000, f"internal error while generating (request id {rs.request_id}): {e}")
        yield f"data: {json.dumps(openai_body(err))}\n\n"
    finally:
        rs.close()
        finish(state, rs, timer, out, cancelled)


_register("/chat/completions", chat_completions)
_register("/completions", completions)
_register("/models", models)
