"""One request on one route: the body each route takes, and its answer read back — streamed (SSE) or whole.

Routes (`--backend`): `workers` (Workers AI run: envelope, SSE events with random `p` padding, a final usage
event; contract.md §1–§4), `openai-chat` (chat.completion(.chunk)), `openai` (text_completion).

Timing follows vLLM's bench serve: TTFT runs from sending the request to the first event carrying text or a tool
call (the hosted stream opens with an empty `response`: not a token); each later content event adds an ITL gap;
E2EL ends at the last content event. Padding fields are ignored; usage events give the token counts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from server.bench.datasets import SampleRequest
from server.bench.endpoint import Endpoint


@dataclass(frozen=True)
class RequestOptions:
    temperature: float | None = 0.0
    seed: int | None = None             # a request's seed is seed + its index (+1: Workers' seeds start at 1)
    ignore_eos: bool = False
    logprobs: int | None = None         # top logprobs per token (OpenAI routes; Workers has none)
    stream: bool = True
    extra_body: dict | None = None


@dataclass
class RequestOutput:
    """vLLM's RequestFuncOutput, plus what the server said about the request."""
    index: int
    prompt_len: int = 0                  # planned
    expected_output_len: int = 0
    success: bool = False
    error: str = ""
    status: int | None = None            # HTTP status (None: no answer)
    code: int | str | None = None        # the error's code (Workers' 10000, 5007; OpenAI's 'model_not_found')
    retry_after: float | None = None
    generated_text: str = ""
    tool_calls: list[dict] = field(default_factory=list)      # [{name, arguments (JSON text)}]
    prompt_tokens: int | None = None     # usage.prompt_tokens
    output_tokens: int | None = None     # usage.completion_tokens
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0              # seconds since the run started
    request_id: str | None = None        # x-request-id, else the answer's id
    finish_reason: str | None = None
    logprobs: list[dict] | None = None   # [{token, logprob, top: {token: logprob}}]
    retries: int = 0                     # 429s answered by waiting and sending again


def body(ep: Endpoint, s: SampleRequest, o: RequestOptions) -> dict:
    b: dict = {"max_tokens": s.expected_output_len, "stream": o.stream}
    if ep.backend == "openai":
        b.update(model=ep.model, prompt=s.prompt)
    else:
        b["messages"] = s.messages()
        if ep.backend == "openai-chat":
            b["model"] = ep.model
    if o.stream and ep.backend != "workers":
        b["stream_options"] = {"include_usage": True}
    if o.temperature is not None:
        b["temperature"] = o.temperature
    if o.seed is not None:
        b["seed"] = o.seed + s.index + 1
    if o.ignore_eos:                    # vLLM's extensions; our Workers route takes them too
        b.update(ignore_eos=True, min_tokens=s.expected_output_len)
    if o.logprobs is not None and ep.backend != "workers":
        b.update({"logprobs": True, "top_logprobs": o.logprobs} if ep.backend == "openai-chat"
                 else {"logprobs": o.logprobs})
    if s.tools:
        b["tools"] = s.tools
    if s.json_schema is not None:
        b.update({"guided_json": s.json_schema} if ep.backend == "workers" else
                 {"response_format": {"type": "json_schema", "json_schema": {"name": "answer",
                                                                             "schema": s.json_schema}}})
    return {**b, **(o.extra_body or {})}


async def send(client: httpx.AsyncClient, ep: Endpoint, s: SampleRequest, o: RequestOptions,
               t0: float) -> RequestOutput:
    """One attempt. Never raises for what the endpoint or the network does: the output says it."""
    out = RequestOutput(s.index, s.prompt_len, s.expected_output_len)
    st = time.perf_counter()
    out.start_time = st - t0
    last = None
    try:
        async with client.stream("POST", ep.url, json=body(ep, s, o), headers=ep.headers) as r:
            out.status = r.status_code
            out.request_id = r.headers.get("x-request-id")
            if r.status_code != 200:
                _refused(out, r, await r.aread())
                return out
            if "text/event-stream" not in r.headers.get("content-type", ""):
                _whole(ep, out, json.loads(await r.aread()))       # e.g. hosted JSON mode does not stream
                last = time.perf_counter()
                out.ttft = last - st
            else:
                reader = _StreamReader(ep, out)
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue                                    # blank separators, comments
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    if reader.event(json.loads(data)):
                        now = time.perf_counter()
                        if last is None:
                            out.ttft = now - st
                        else:
                            out.itl.append(now - last)
                        last = now
                    if out.error:
                        return out
                reader.finish()
    except (httpx.HTTPError, OSError) as e:
        out.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return out
    except ValueError as e:
        out.error = f"unreadable answer: {e}"
        return out
    out.latency = (last if last is not None else time.perf_counter()) - st
    out.success = not out.error
    return out


def _refused(out: RequestOutput, r: httpx.Response, raw: bytes) -> None:
    try:
        err = error_of(json.loads(raw))
    except ValueError:
        err = None
    out.code, message = err if err else (None, raw.decode("utf-8", "replace")[:300])
    out.error = f"HTTP {r.status_code}: {message}"
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            out.retry_after = float(r.headers[header]) * scale
            break
        except (KeyError, ValueError):
            continue


def error_of(payload) -> tuple[int | str | None, str] | None:
    """(code, message) of an error body in either shape — Cloudflare's envelope or OpenAI's error — else None."""
    if not isinstance(payload, dict):
        return None
    if isinstance(payload.get("error"), dict):
        e = payload["error"]
        return e.get("code"), str(e.get("message"))
    if payload.get("success") is False and payload.get("errors"):
        e = payload["errors"][0]
        return e.get("code"), f"{e.get('code')}: {e.get('message')}"
    return None


def _text(value) -> str:
    """Workers' `response`: a string, or (JSON mode, some hosted models) a JSON value."""
    if value is None or isinstance(value, str):
        return value or ""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _args(a) -> str:
    return a if isinstance(a, str) else json.dumps(a, ensure_ascii=False, separators=(",", ":"))


def _usage(out: RequestOutput, usage) -> None:
    if isinstance(usage, dict):
        out.prompt_tokens = usage.get("prompt_tokens", out.prompt_tokens)
        out.output_tokens = usage.get("completion_tokens", out.output_tokens)


def chat_logprobs(lp) -> list[dict]:
    return [{"token": t["token"], "logprob": t["logprob"],
             "top": {x["token"]: x["logprob"] for x in t.get("top_logprobs") or []}}
            for t in (lp or {}).get("content") or []]


def completion_logprobs(lp) -> list[dict]:
    lp = lp or {}
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens") or [])
    return [{"token": t, "logprob": v, "top": top or {}}
            for t, v, top in zip(lp.get("tokens") or [], lp.get("token_logprobs") or [], tops)]


def _whole(ep: Endpoint, out: RequestOutput, payload: dict) -> None:
    err = error_of(payload)
    if err is not None:
        out.code, out.error = err
        return
    if ep.backend == "workers":
        res = payload.get("result", payload)        # the envelope (REST) or the bare result
        out.generated_text = _text(res.get("response"))
        out.tool_calls = [{"name": c.get("name"), "arguments": _args(c.get("arguments"))}
                          for c in res.get("tool_calls") or []]
    else:
        out.request_id = out.request_id or payload.get("id")
        choice = (payload.get("choices") or [{}])[0]
        out.finish_reason = choice.get("finish_reason")
        if ep.backend == "openai-chat":
            msg = choice.get("message") or {}
            out.generated_text = msg.get("content") or ""
            out.tool_calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                              for c in msg.get("tool_calls") or []]
            out.logprobs = chat_logprobs(choice.get("logprobs")) if choice.get("logprobs") else None
        else:
            out.generated_text = choice.get("text") or ""
            out.logprobs = completion_logprobs(choice.get("logprobs")) if choice.get("logprobs") else None
    _usage(out, payload.get("result", payload).get("usage") if ep.backend == "workers" else payload.get("usage"))


class _StreamReader:
    """Folds a route's SSE events into a RequestOutput; `event` says whether the event carried content."""

    def __init__(self, ep: Endpoint, out: RequestOutput):
        self.ep, self.out = ep, out
        self.parts: list[str] = []
        self.calls: dict[int, dict] = {}       # OpenAI streams a call in fragments, by index

    def event(self, ev) -> bool:
        out = self.out
        err = error_of(ev)
        if err is not None:                    # an error after the stream started arrives in-band
            out.code, out.error = err
            return False
        if self.ep.backend == "workers":
            _usage(out, ev.get("usage"))
            text = _text(ev.get("response"))
            calls = [c for c in ev.get("tool_calls") or [] if c.get("name") or c.get("function")]
            for c in calls:
                fn = c.get("function", c)
                out.tool_calls.append({"name": fn.get("name"), "arguments": _args(fn.get("arguments"))})
            self.parts.append(text)
            return bool(text) or bool(calls)
        out.request_id = out.request_id or ev.get("id")
        _usage(out, ev.get("usage"))
        choices = ev.get("choices") or []
        if not choices:
            return False
        c = choices[0]
        out.finish_reason = c.get("finish_reason") or out.finish_reason
        if self.ep.backend == "openai-chat":
            delta = c.get("delta") or {}
            text = delta.get("content") or ""
            for frag in delta.get("tool_calls") or []:
                call = self.calls.setdefault(frag.get("index", 0), {"name": None, "arguments": ""})
                fn = frag.get("function") or {}
                call["name"] = fn.get("name") or call["name"]
                call["arguments"] += fn.get("arguments") or ""
            lps = chat_logprobs(c.get("logprobs"))
            has_calls = bool(delta.get("tool_calls"))
        else:
            text, has_calls = c.get("text") or "", False
            lps = completion_logprobs(c.get("logprobs"))
        if lps:
            out.logprobs = (out.logprobs or []) + lps
        self.parts.append(text)
        return bool(text) or has_calls

    def finish(self) -> None:
        self.out.generated_text = "".join(self.parts)
        if self.calls:
            self.out.tool_calls = [self.calls[i] for i in sorted(self.calls)]
