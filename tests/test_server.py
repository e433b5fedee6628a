"""The HTTP server end to end: a real uvicorn server on a loopback port around the tiny random-weight engine,
driven by the real `openai` and `cloudflare` SDKs and by raw httpx for exact bytes (contract.md §1–§5, §9).

Every request is greedy (temperature 0) and short, so the module stays fast on two CPUs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cloudflare
import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from server_fixture import free_port, start_server, tiny_engine
from util import data_uri

from engine.async_llm import AsyncLLM
from server.app import create_app
from server.config import API_KEY_ENV, CLOUDFLARE_MODEL, ServerSettings

CF = CLOUDFLARE_MODEL
ACCOUNT = "acct"
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{CF}"
RUN_ENCODED = f"/client/v4/accounts/{ACCOUNT}/ai/run/{CF.replace('/', '%2F')}"
CF_V1 = f"/client/v4/accounts/{ACCOUNT}/ai/v1"
HELLO = [{"role": "user", "content": "Hello there"}]
REPO = Path(__file__).resolve().parents[1]


# ---- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def no_env_key():
    mp = pytest.MonkeyPatch()
    mp.delenv(API_KEY_ENV, raising=False)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def live(tiny_dir, no_env_key):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small(tiny_dir, no_env_key):
    """A second server whose engine has a 64-token context window."""
    srv = start_server(tiny_engine(tiny_dir, max_model_len=64), ServerSettings())
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def no_leak(request):
    """After every test that used the main server: the engine drains and its KV pool is whole again."""
    yield
    if "live" in request.fixturenames:
        request.getfixturevalue("live").assert_drained(5)


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


@pytest.fixture
def oai(live):
    return openai.OpenAI(api_key="test-token", base_url=f"{live.url}/v1", max_retries=0)


@pytest.fixture
def cf(live):
    return cloudflare.Cloudflare(api_token="test-token", base_url=f"{live.url}/client/v4", max_retries=0)


@pytest.fixture
def captured(live, monkeypatch):
    """Record what reaches the engine instead of running it (the request then fails with 400 'captured')."""
    seen = []

    async def spy(prompt, params, n, request_id=None, raw=False, tools=None):
        seen.append(SimpleNamespace(prompt=prompt, params=params, n=n, raw=raw, tools=tools))
        raise ValueError("captured by the test")

    monkeypatch.setattr(live.llm, "submit_choices", spy)
    return seen


# ---- helpers --------------------------------------------------------------------------------------------------
def sse_payloads(body: str) -> list[str]:
    """Exact framing: every event is one `data: ...` line followed by a blank line, nothing else."""
    assert body.endswith("\n\n"), repr(body[-40:])
    frames = body.split("\n\n")[:-1]
    for f in frames:
        assert f.startswith("data: ") and "\n" not in f and "\r" not in f, repr(f)
    return [f[len("data: "):] for f in frames]


def cf_error(r: httpx.Response, status: int, code: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"errors", "success", "result", "messages"}, body
    assert body["success"] is False and body["messages"] == []
    assert len(body["errors"]) == 1 and body["errors"][0]["code"] == code, body
    return body["errors"][0]["message"]


def oai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def metric(text: str, sample: str, **labels) -> float:
    total, found = 0.0, False
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
                found = True
    assert found, f"{sample} {labels} not in /metrics"
    return total


def closes_after_response(port: int, path: str, body: bytes) -> bool:
    """POST on a raw keep-alive connection, read the whole response, then see whether the server hangs up."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            data += s.recv(65536)
        head, rest = data.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
        while len(rest) < length:
            rest += s.recv(65536)
        s.settimeout(0.5)
        try:
            return s.recv(1) == b""
        except TimeoutError:
            return False


def request_logs(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "server.requests"]


# ---- Workers AI route: SDK ------------------------------------------------------------------------------------
def test_cloudflare_sdk_run_returns_the_result(cf, http):
    res = cf.ai.run(CF, account_id=ACCOUNT, messages=HELLO, max_tokens=4, temperature=0)
    assert isinstance(res, dict) and set(res) == {"response", "usage", "tool_calls"}
    assert isinstance(res["response"], str) and res["response"] and res["tool_calls"] == []
    assert res["usage"]["completion_tokens"] == 4
    assert res["usage"]["total_tokens"] == res["usage"]["prompt_tokens"] + 4
    # the SDK sent @cf%2Fmistralai%2F...; literal slashes give the same greedy answer
    r = http.post(RUN, json={"messages": HELLO, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["result"] == res


def test_cloudflare_sdk_streaming(cf):
    with cf.ai.with_streaming_response.run(CF, account_id=ACCOUNT, messages=HELLO, max_tokens=5, temperature=0,
                                           stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    data = [ln for ln in lines if ln]
    assert all(ln.startswith("data: ") for ln in data), data
    assert data[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in data[:-1]]
    text = "".join(e.get("response", "") for e in events)
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert text == cf.ai.run(CF, account_id=ACCOUNT, messages=HELLO, max_tokens=5, temperature=0)["response"]


def test_cloudflare_sdk_bad_request_raises(cf):
    with pytest.raises(cloudflare.BadRequestError) as ei:
        cf.ai.run(CF, account_id=ACCOUNT, prompt="hi", temperature=6)
    assert ei.value.status_code == 400
    err = ei.value.body["errors"][0]
    assert err["code"] == 5006 and "temperature" in err["message"]


def test_cloudflare_sdk_image_part(cf):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_uri(56, 56, 1)}}]}]
    with_image = cf.ai.run(CF, account_id=ACCOUNT, messages=msgs, max_tokens=2, temperature=0)
    text_only = cf.ai.run(CF, account_id=ACCOUNT, messages=[{"role": "user", "content": "What is this?"}],
                          max_tokens=2, temperature=0)
    assert with_image["usage"]["prompt_tokens"] > text_only["usage"]["prompt_tokens"] + 4


# ---- Workers AI route: exact bytes ----------------------------------------------------------------------------
def test_workers_envelope_and_model_paths(http):
    body = {"prompt": "Say something", "max_tokens": 3, "temperature": 0}
    r = http.post(RUN, json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    env = r.json()
    assert env["success"] is True and env["errors"] == [] and env["messages"] == []
    assert set(env) == {"result", "success", "errors", "messages"}
    assert set(env["result"]) == {"response", "usage", "tool_calls"}
    assert set(env["result"]["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    r2 = http.post(RUN_ENCODED, json=body)
    assert r2.status_code == 200 and r2.json()["result"] == env["result"]


@pytest.mark.parametrize("path", [
    "/client/v4/accounts/acct/ai/run/@cf/meta/llama-3.1-8b-instruct",
    "/client/v4/accounts/acct/ai/run/@cf%2Fmeta%2Fllama-3.1-8b-instruct",
])
def test_workers_unknown_model(http, path):
    msg = cf_error(http.post(path, json={"prompt": "hi"}), 400, 5007)
    assert msg == "No such model @cf/meta/llama-3.1-8b-instruct or task"


def test_workers_stream_bytes_match_non_stream(http):
    body = {"prompt": "Tell me a story", "max_tokens": 8, "temperature": 0, "seed": 7}
    plain = http.post(RUN, json=body).json()["result"]
    r = http.post(RUN, json={**body, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    events = [json.loads(p) for p in payloads[:-1]]
    final = events[-1]
    assert final == {"response": "", "usage": plain["usage"]}          # cumulative, equal to non-stream
    tokens = events[:-1]
    assert tokens and all(isinstance(e["response"], str) and e["response"] for e in tokens)
    assert "".join(e["response"] for e in tokens) == plain["response"]
    assert all(re.fullmatch(r"[A-Za-z0-9]+", e["p"]) for e in tokens)
    assert len({len(e["p"]) for e in tokens}) > 1, "padding length must vary"


def test_workers_stream_padding_off(live, http):
    with live.override(stream_padding=False):
        r = http.post(RUN, json={"prompt": "Tell me a story", "max_tokens": 6, "temperature": 0, "stream": True})
    events = [json.loads(p) for p in sse_payloads(r.text)[:-1]]
    assert len(events) > 1 and all("p" not in e for e in events)
    assert events[-1]["usage"]["completion_tokens"] == 6


def test_workers_stream_with_messages_and_usage_is_cumulative(http):
    body = {"messages": [{"role": "system", "content": "Be brief."}, *HELLO], "max_tokens": 6, "temperature": 0}
    plain = http.post(RUN, json=body).json()["result"]
    events = [json.loads(p) for p in sse_payloads(http.post(RUN, json={**body, "stream": True}).text)[:-1]]
    assert events[-1]["usage"] == plain["usage"] and plain["usage"]["completion_tokens"] == 6
    assert "".join(e.get("response", "") for e in events) == plain["response"]


# ---- Workers AI route: validation (400 / 5006 naming the field) ----------------------------------------------
WORKERS_OK = [
    ("temperature", 0), ("temperature", 5), ("top_p", 0), ("top_p", 2), ("top_k", 1), ("top_k", 50),
    ("seed", 1), ("seed", 9_999_999_999), ("repetition_penalty", 0), ("repetition_penalty", 2),
    ("frequency_penalty", 0), ("frequency_penalty", 2), ("presence_penalty", 0), ("presence_penalty", 2),
    ("max_tokens", 1), ("raw", True), ("raw", False), ("stream", False),
]
WORKERS_BAD = [
    ("temperature", -0.01), ("temperature", 5.01), ("top_p", -0.01), ("top_p", 2.01), ("top_k", 0), ("top_k", 51),
    ("seed", 0), ("seed", 10_000_000_000), ("repetition_penalty", -0.01), ("repetition_penalty", 2.01),
    ("frequency_penalty", -0.01), ("frequency_penalty", 2.01), ("presence_penalty", -0.01),
    ("presence_penalty", 2.01), ("max_tokens", 0), ("max_tokens", 2.5), ("top_k", 1.5), ("seed", True),
    ("temperature", "hot"), ("raw", "yes"), ("stream", 1),
]


@pytest.mark.parametrize("field,value", WORKERS_OK)
def test_workers_range_edges_inside(http, field, value):
    body = {"prompt": "hi", "max_tokens": 2, "temperature": 0, field: value}
    r = http.post(RUN, json=body)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["result"]["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("field,value", WORKERS_BAD)
def test_workers_range_edges_outside(http, captured, field, value):
    msg = cf_error(http.post(RUN, json={"prompt": "hi", field: value}), 400, 5006)
    assert msg.startswith("AiError: Bad input: Error: ") and f"/{field}" in msg, msg
    assert captured == []


@pytest.mark.parametrize("raw_body,field", [
    ('{"prompt": "hi", "temperature": NaN}', "temperature"),
    ('{"prompt": "hi", "top_p": Infinity}', "top_p"),
    ('{"prompt": "hi", "top_k": 1' + "0" * 400 + "}", "top_k"),
])
def test_workers_non_finite_numbers_are_bad_input(http, raw_body, field):
    r = http.post(RUN, content=raw_body, headers={"content-type": "application/json"})
    msg = cf_error(r, 400, 5006)
    assert f"/{field}" in msg


IMG_HTTP = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}]
TOOL = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {
    "type": "object", "properties": {"x": {"type": "string", "description": "x"}}}}}


@pytest.mark.parametrize("body,needle", [
    ({}, "oneOf"),
    ({"prompt": "hi", "messages": HELLO}, "oneOf"),
    ({"prompt": ""}, "/prompt"),
    ({"prompt": 5}, "/prompt"),
    ({"messages": []}, "/messages"),
    ({"messages": "hi"}, "/messages"),
    ({"messages": [{"role": "user", "content": None}]}, "/messages/0/content"),
    ({"messages": [*HELLO, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "abcDEF123", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "/messages/1/content"),
    ({"messages": IMG_HTTP}, "data URI"),
    ({"messages": HELLO, "tools": {"name": "f"}}, "'tools' must be an array"),
    ({"prompt": "hi", "tools": [TOOL]}, "'/tools' needs 'messages'"),
    ({"messages": HELLO, "tools": [{"type": "function", "function": {"description": "x"}}]}, "/tools/0"),
    ({"messages": HELLO, "guided_json": [1, 2]}, "/guided_json"),
    ({"messages": HELLO, "guided_json": {"type": "strin"}}, "invalid JSON schema"),
    ({"messages": HELLO, "response_format": {"type": "xml"}}, "response_format type 'xml'"),
    ({"messages": HELLO, "tools": [TOOL], "guided_json": {"type": "object"}}, "cannot be combined"),
    ({"messages": HELLO, "functions": [{"name": "f", "code": "import os; os.system('touch /tmp/pwned')"}]},
     "/functions"),
    ({"prompt": "hi", "lora": "x"}, "/lora"),
])
def test_workers_bad_input_rows(http, captured, body, needle):
    msg = cf_error(http.post(RUN, json=body), 400, 5006)
    assert msg.startswith("AiError: Bad input: Error: ") and needle in msg, msg
    if needle == "/functions":
        assert "never executes" in msg
    if needle == "oneOf":
        assert "prompt" in msg and "messages" in msg
    assert "captured" not in msg and captured == []       # refused before the engine


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"), (b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
])
def test_workers_body_not_an_object(http, content, needle):
    msg = cf_error(http.post(RUN, content=content, headers={"content-type": "application/json"}), 400, 5006)
    assert needle in msg


def test_workers_image_data_uri_accepted(http):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What?"},
                                         {"type": "image_url", "image_url": {"url": data_uri(28, 56, 3)}}]}]
    r = http.post(RUN, json={"messages": msgs, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text


def test_workers_defaults_and_mapping(http, captured):
    http.post(RUN, json={"prompt": "hi"})
    p = captured[-1].params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (256, 0.15, 1.0, 0, None)
    http.post(RUN, json={"prompt": "<s>[INST]hi[/INST]", "raw": True, "max_tokens": 9, "temperature": 1.5,
                         "top_p": 0.5, "top_k": 7, "seed": 9_999_999_999, "repetition_penalty": 1.2,
                         "frequency_penalty": 0.3, "presence_penalty": 0.4})
    c = captured[-1]
    assert c.raw is True and c.prompt == "<s>[INST]hi[/INST]"
    p = c.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed) == (9, 1.5, 0.5, 7, 9_999_999_999)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.2, 0.3, 0.4)
    http.post(RUN, json={"messages": HELLO, "raw": True})
    assert captured[-1].raw is False and captured[-1].prompt == HELLO     # raw applies to prompts only


# ---- OpenAI API: SDK ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["/v1", CF_V1])
def test_openai_chat_and_models(live, base):
    client = openai.OpenAI(api_key="x", base_url=live.url + base, max_retries=0)
    r = client.chat.completions.create(model=CF, messages=HELLO, max_tokens=4, temperature=0)
    assert r.object == "chat.completion" and r.model == CF and r.id.startswith("chatcmpl-")
    c = r.choices[0]
    assert c.message.role == "assistant" and c.message.content and c.finish_reason == "length"
    assert r.usage.completion_tokens == 4 and r.usage.total_tokens == r.usage.prompt_tokens + 4
    assert isinstance(r.usage.prompt_tokens_details.cached_tokens, int)
    ids = [m.id for m in client.models.list().data]
    assert CF in ids


def test_openai_chat_stream_include_usage(oai):
    kw = {"model": CF, "messages": HELLO, "max_tokens": 6, "temperature": 0, "seed": 3}
    plain = oai.chat.completions.create(**kw)
    chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks[:-1])
    assert text == plain.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks[:-1]][-1] == "length"
    without = list(oai.chat.completions.create(**kw, stream=True))
    assert all(ch.usage is None and ch.choices for ch in without)


def test_openai_completions(oai):
    kw = {"model": CF, "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
    plain = oai.completions.create(**kw)
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 5
    chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == plain.choices[0].text
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens


def test_openai_image_part(oai):
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Describe."},
                                         {"type": "image_url", "image_url": {"url": data_uri(56, 28, 2)}}]}]
    r = oai.chat.completions.create(model=CF, messages=msgs, max_tokens=2, temperature=0)
    t = oai.chat.completions.create(model=CF, messages=[{"role": "user", "content": "Describe."}], max_tokens=2,
                                    temperature=0)
    assert r.usage.prompt_tokens > t.usage.prompt_tokens + 2


def test_openai_logprobs(oai):
    r = oai.chat.completions.create(model=CF, messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for lp in content:
        assert len(lp.top_logprobs) == 3 and lp.logprob <= 0
        assert lp.logprob == pytest.approx(max(t.logprob for t in lp.top_logprobs), abs=1e-5)   # greedy
        assert bytes(lp.bytes).decode("utf-8", "replace") == lp.token
    if not any("\ufffd" in lp.token for lp in content):        # tokens that are whole UTF-8 sequences
        assert "".join(lp.token for lp in content) == r.choices[0].message.content
    s = list(oai.chat.completions.create(model=CF, messages=HELLO, max_tokens=4, temperature=0, logprobs=True,
                                         top_logprobs=3, stream=True))
    streamed = [lp for ch in s if ch.choices and ch.choices[0].logprobs for lp in ch.choices[0].logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in content]
    c = oai.completions.create(model=CF, prompt="Hello", max_tokens=3, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 3 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert lp.text_offset[0] == 0


def test_openai_tool_call_history_with_null_content(oai):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "abcDEF123", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "abcDEF123", "content": '{"temp_c": 21}'}]
    r = oai.chat.completions.create(model=CF, messages=msgs, max_tokens=3, temperature=0)
    assert r.choices[0].message.content and r.usage.completion_tokens == 3
    # the history is really encoded: the tool result adds prompt tokens
    short = oai.chat.completions.create(model=CF, messages=msgs[:1], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 10


def test_openai_cached_tokens(oai):
    msgs = [{"role": "system", "content": "You are a helpful assistant. " * 12}, *HELLO]
    oai.chat.completions.create(model=CF, messages=msgs, max_tokens=1, temperature=0)
    r = oai.chat.completions.create(model=CF, messages=msgs, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > 32 and r.usage.prompt_tokens_details.cached_tokens >= 16


def test_openai_stream_bytes(http):
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3, "temperature": 0,
                                                "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(r.text)
    assert payloads[-1] == "[DONE]" and payloads.count("[DONE]") == 1
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert "prompt_tokens_details" in chunks[-1]["usage"]


def test_openai_defaults_and_mapping(http, captured):
    http.post("/v1/chat/completions", json={"messages": HELLO})
    p = captured[-1].params
    assert (p.max_tokens, p.temperature) == (256, 0.15)
    http.post("/v1/completions", json={"prompt": "hi"})
    assert (captured[-1].params.max_tokens, captured[-1].params.temperature) == (256, 0.15)
    http.post("/v1/chat/completions", json={
        "messages": HELLO, "max_completion_tokens": 7, "stop": "END", "seed": -5, "min_tokens": 2,
        "ignore_eos": True, "frequency_penalty": -1.5, "presence_penalty": -2, "logprobs": True, "top_logprobs": 3,
        "n": 1, "top_k": 4, "top_p": 0.9, "temperature": 0.7})
    p = captured[-1].params
    assert (p.max_tokens, p.stop, p.min_tokens, p.ignore_eos, p.logprobs) == (7, ("END",), 2, True, 3)
    assert (p.frequency_penalty, p.presence_penalty, p.top_k, p.top_p, p.temperature) == (-1.5, -2.0, 4, 0.9, 0.7)
    assert p.seed is not None
    http.post("/v1/completions", json={"prompt": "hi", "stop": ["a", "b"], "logprobs": 2})
    assert captured[-1].params.stop == ("a", "b") and captured[-1].params.logprobs == 2
    assert captured[-1].raw is True and captured[-1].prompt == "<s>hi"


# ---- OpenAI API: validation -----------------------------------------------------------------------------------
OPENAI_OK = [
    ("temperature", 0), ("temperature", 2), ("top_p", 0), ("top_p", 1), ("frequency_penalty", -2),
    ("frequency_penalty", 2), ("presence_penalty", -2), ("presence_penalty", 2), ("repetition_penalty", 0),
    ("repetition_penalty", 2), ("top_k", -1), ("top_k", 1), ("max_tokens", 1), ("max_completion_tokens", 1),
    ("n", 1), ("seed", -(2**63)), ("seed", 2**63 - 1), ("min_tokens", 0), ("min_tokens", 2), ("stop", "x"),
    ("stop", ["s"] * 16), ("ignore_eos", True), ("logprobs", False), ("top_logprobs", 0), ("top_logprobs", 20),
]
OPENAI_BAD = [
    ("temperature", -0.01), ("temperature", 2.01), ("top_p", -0.01), ("top_p", 1.01), ("frequency_penalty", -2.01),
    ("frequency_penalty", 2.01), ("presence_penalty", -2.01), ("presence_penalty", 2.01),
    ("repetition_penalty", -0.01), ("repetition_penalty", 2.01), ("top_k", -2), ("top_k", 1.5), ("max_tokens", 0),
    ("max_completion_tokens", 0), ("n", 0), ("n", 17), ("seed", 2**63), ("seed", -(2**63) - 1), ("min_tokens", -1),
    ("min_tokens", 3), ("stop", ""), ("stop", ["s"] * 17), ("stop", 5), ("ignore_eos", "yes"),
    ("logprobs", "yes"), ("top_logprobs", 21), ("top_logprobs", -1), ("stream", "yes"), ("temperature", "hot"),
]


@pytest.mark.parametrize("field,value", OPENAI_OK)
def test_openai_range_edges_inside(http, field, value):
    body = {"messages": HELLO, "max_tokens": 2, "temperature": 0, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert 1 <= r.json()["usage"]["completion_tokens"] <= 2


@pytest.mark.parametrize("field,value", OPENAI_BAD)
def test_openai_range_edges_outside(http, captured, field, value):
    body = {"messages": HELLO, "max_tokens": 2, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    err = oai_error(http.post("/v1/chat/completions", json=body), 400)
    assert err["type"] == "invalid_request_error" and err["param"] == field and field in err["message"], err
    assert captured == []


@pytest.mark.parametrize("value,ok", [(0, True), (5, True), (6, False), (-1, False)])
def test_openai_completions_logprobs_range(http, value, ok):
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "temperature": 0, "logprobs": value})
    if ok:
        assert r.status_code == 200, r.text
    else:
        err = oai_error(r, 400)
        assert err["param"] == "logprobs" and "logprobs" in err["message"]


def test_openai_big_integer_is_bad_input(http):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "top_k": 1' + "0" * 400 + "}"
    err = oai_error(http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}),
                    400)
    assert err["param"] == "top_k"


@pytest.mark.parametrize("body,status,param,needle", [
    ({}, 400, "messages", "messages"),
    ({"messages": HELLO, "tool_choice": "required"}, 400, "tool_choice", "needs tools"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
     400, "tool_choice", "'g', which is not among the tools"),
    ({"messages": HELLO, "tools": [TOOL], "tool_choice": "sometimes"}, 400, "tool_choice", "sometimes"),
    ({"messages": HELLO, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
      "schema": {"type": "object", "required": "a"}}}}, 400, "response_format", "invalid JSON schema"),
    ({"messages": HELLO, "parallel_tool_calls": "yes", "tools": [TOOL]}, 400, "parallel_tool_calls", "boolean"),
    ({"messages": HELLO, "model": "gpt-4o"}, 404, "model", "gpt-4o"),
    ({"messages": [{"role": "user", "content": None}]}, 400, None, "null"),
    ({"messages": IMG_HTTP}, 400, None, ""),
])
def test_openai_bad_input_rows(http, body, status, param, needle):
    err = oai_error(http.post("/v1/chat/completions", json=body), status)
    assert err["param"] == param and needle in err["message"], err
    if status == 404:
        assert err["code"] == "model_not_found"


def test_openai_sdk_raises_on_bad_request(oai):
    with pytest.raises(openai.BadRequestError) as ei:
        oai.chat.completions.create(model=CF, messages=HELLO, temperature=3)
    assert ei.value.status_code == 400 and "temperature" in ei.value.message


# ---- context window -------------------------------------------------------------------------------------------
def test_context_window_workers_413(small):
    with httpx.Client(base_url=small.url, timeout=30) as c:
        n = c.post(RUN, json={"prompt": "hi", "max_tokens": 1, "temperature": 0}).json()["result"]["usage"][
            "prompt_tokens"]
        fits = c.post(RUN, json={"prompt": "hi", "max_tokens": 64 - n, "temperature": 0})
        assert fits.status_code == 200, fits.text
        msg = cf_error(c.post(RUN, json={"prompt": "hi", "max_tokens": 65 - n}), 413, 5021)
        assert msg.startswith("AiError: ") and "(65)" in msg and "(64)" in msg, msg
        assert "context window" in msg
        # the default max_tokens (256) counts against the window
        msg = cf_error(c.post(RUN, json={"prompt": "hi"}), 413, 5021)
        assert f"({n + 256})" in msg
    assert small.wait_idle(5)


def test_context_window_openai_400(small):
    base = small.url + "/v1"
    with httpx.Client(base_url=base, timeout=30) as c:
        n = c.post("/chat/completions", json={"messages": HELLO, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
        err = oai_error(c.post("/chat/completions", json={"messages": HELLO, "max_tokens": 70}), 400)
        assert err["message"].startswith(
            f"This model's maximum context length is 64 tokens. However, you requested {n + 70} tokens "
            f"({n} in the messages, 70 in the completion).")
        assert err["code"] == "context_length_exceeded"
        err = oai_error(c.post("/completions", json={"prompt": "hi"}), 400)
        assert "maximum context length is 64 tokens" in err["message"] and "in the prompt" in err["message"]
    client = openai.OpenAI(api_key="x", base_url=base, max_retries=0)
    with pytest.raises(openai.BadRequestError) as ei:
        client.chat.completions.create(model=CF, messages=HELLO)
    assert "maximum context length is 64 tokens" in ei.value.message
    assert small.wait_idle(5)


# ---- auth, queue, routing, internal errors --------------------------------------------------------------------
def test_auth(live, http):
    with live.override(api_key="sekrit"):
        r = http.post(RUN, json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 401
        assert r.json() == {"result": None, "success": False, "errors": [{"code": 10000,
                            "message": "Authentication error"}], "messages": []}
        cf_error(http.post(RUN, json={"prompt": "hi"}, headers={"authorization": "Bearer wrong"}), 401, 10000)
        for path in ("/v1/chat/completions", f"{CF_V1}/chat/completions"):
            err = oai_error(http.post(path, json={"messages": HELLO}), 401)
            assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
        oai_error(http.get("/v1/models"), 401)
        assert http.get("/health").status_code == 200
        ok = http.post(RUN, json={"prompt": "hi", "max_tokens": 1, "temperature": 0},
                       headers={"authorization": "Bearer sekrit"})
        assert ok.status_code == 200
        good = cloudflare.Cloudflare(api_token="sekrit", base_url=f"{live.url}/client/v4", max_retries=0)
        assert good.ai.run(CF, account_id=ACCOUNT, prompt="hi", max_tokens=1)["usage"]["completion_tokens"] == 1
        bad = cloudflare.Cloudflare(api_token="nope", base_url=f"{live.url}/client/v4", max_retries=0)
        with pytest.raises(cloudflare.AuthenticationError):
            bad.ai.run(CF, account_id=ACCOUNT, prompt="hi", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="nope", base_url=f"{live.url}/v1", max_retries=0).models.list()
        assert openai.OpenAI(api_key="sekrit", base_url=f"{live.url}/v1", max_retries=0).models.list().data
    assert http.post(RUN, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unknown_route_and_wrong_method(http):
    r = http.get("/client/v4/accounts/acct/nothing-here")
    assert cf_error(r, 404, 7000) == "No route for that URI" and r.json()["result"] is None
    assert oai_error(http.get("/v1/nothing"), 404)["message"] == "No route for that URI"
    r = http.get(RUN)
    assert cf_error(r, 405, 7001) == "GET not supported for requested URI." and r.json()["result"] is None
    assert oai_error(http.get("/v1/chat/completions"), 405)["message"] == "GET not supported for requested URI."
    assert oai_error(http.put(f"{CF_V1}/completions"), 405)["message"] == "PUT not supported for requested URI."


def test_internal_error_500_with_request_id(live, http, monkeypatch, caplog):
    def boom():
        raise RuntimeError("kaboom secret detail")

    monkeypatch.setattr(live.state, "ready_engine", boom)
    caplog.set_level(logging.ERROR, logger="server.app")
    r = http.post(RUN, json={"prompt": "hi"})
    msg = cf_error(r, 500, 5000)
    rid = re.search(r"request id ([0-9a-f]+)", msg)
    assert rid, msg
    for leak in ("Traceback", "kaboom", "RuntimeError", 'File "'):
        assert leak not in r.text
    assert any(rid.group(1) in rec.getMessage() for rec in caplog.records), "request id not in the server log"
    assert not closes_after_response(live.port, RUN, b'{"prompt": "hi"}'), \
        "the server dropped the keep-alive connection after its 500: a pooled client's next request may fail"
    err = oai_error(http.post("/v1/chat/completions", json={"messages": HELLO}), 500)
    assert "request id" in err["message"] and "kaboom" not in json.dumps(err)


def test_health_loading_and_engine_death(tiny_dir, no_env_key):
    app = create_app(None, ServerSettings())
    with TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert cf_error(c.post(RUN, json={"prompt": "hi"}), 503, 3040)
        oai_error(c.post("/v1/chat/completions", json={"messages": HELLO}), 503)
        assert c.get("/metrics").status_code == 200
        llm = AsyncLLM(engine=tiny_engine(tiny_dir))
        try:
            app.state.server.engine = llm           # loaded
            assert c.get("/health").json()["status"] == "ok"
            assert c.post(RUN, json={"prompt": "hi", "max_tokens": 1}).status_code == 200

            def broken_step():
                raise RuntimeError("device fell over")

            llm.engine.step = broken_step
            r = c.post(RUN, json={"prompt": "hi", "max_tokens": 3})       # in flight when the loop dies
            msg = cf_error(r, 500, 5000)
            assert "the engine stopped" in msg or "engine loop died" in msg, msg
            assert "Traceback" not in r.text and "fell over" not in r.text
            r = c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "dead"
            assert cf_error(c.post(RUN, json={"prompt": "hi"}), 503, 3040)
        finally:
            llm.shutdown()


# ---- metrics and the request log ------------------------------------------------------------------------------
def test_metrics_and_request_log(http, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    before = http.get("/metrics")
    assert before.status_code == 200
    text = before.text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:time_per_output_token_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket"):
        assert name in text, name
    m = {"model_name": CF}
    ok0 = metric(text, "vllm:request_success_total", finished_reason="length", **m) \
        if 'vllm:request_success_total{finished_reason="length"' in text else 0.0
    p0, g0 = metric(text, "vllm:prompt_tokens_total", **m), metric(text, "vllm:generation_tokens_total", **m)
    t0 = metric(text, "vllm:time_to_first_token_seconds_count", **m)
    e0 = metric(text, "vllm:e2e_request_latency_seconds_count", **m)
    tp0 = metric(text, "vllm:time_per_output_token_seconds_count", **m)
    caplog.clear()
    res = http.post(RUN, json={"prompt": "Count to three", "max_tokens": 3, "temperature": 0}).json()["result"]
    after = http.get("/metrics").text
    assert metric(after, "vllm:request_success_total", finished_reason="length", **m) == ok0 + 1
    assert metric(after, "vllm:prompt_tokens_total", **m) == p0 + res["usage"]["prompt_tokens"]
    assert metric(after, "vllm:generation_tokens_total", **m) == g0 + 3
    assert metric(after, "vllm:time_to_first_token_seconds_count", **m) == t0 + 1
    assert metric(after, "vllm:e2e_request_latency_seconds_count", **m) == e0 + 1
    assert metric(after, "vllm:time_per_output_token_seconds_count", **m) == tp0 + 1
    assert metric(after, "vllm:num_requests_running", **m) == 0
    logs = request_logs(caplog)
    assert len(logs) == 1, logs
    line = logs[0]
    assert {"request_id", "model", "route", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_s",
            "e2e_s", "tokens_per_s", "finish_reason", "cancelled"} <= set(line)
    assert line["model"] == CF and line["route"] == "workers" and line["request_id"]
    assert (line["prompt_tokens"], line["completion_tokens"]) == (res["usage"]["prompt_tokens"], 3)
    assert line["finish_reason"] == "length" and line["cancelled"] is False
    assert 0 <= line["ttft_s"] <= line["e2e_s"]


# ---- disconnects ----------------------------------------------------------------------------------------------
LONG = 4000     # tokens a disconnecting request would run for (tens of seconds) if it were not aborted


def test_twenty_streams_five_disconnect(live, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    caplog.clear()
    gone_ids = {0, 3, 6, 9, 12}

    async def one(client: httpx.AsyncClient, i: int):
        leave = i in gone_ids
        if i % 2:
            url = "/v1/chat/completions"
            body = {"messages": [{"role": "user", "content": f"Request number {i}"}], "temperature": 0,
                    "max_tokens": LONG if leave else 10, "stream": True, "stream_options": {"include_usage": True}}
            if leave:
                body["ignore_eos"] = True
        else:
            url = RUN
            body = {"prompt": f"Request number {i}", "temperature": 0, "max_tokens": LONG if leave else 10,
                    "stream": True}
        payloads = []
        async with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    payloads.append(line[6:])
                    if leave and len(payloads) >= 3:
                        return "gone", payloads
        return "done", payloads

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    results = asyncio.run(main())
    for i, (how, payloads) in enumerate(results):
        if i in gone_ids:
            assert how == "gone"
            continue
        assert how == "done" and payloads[-1] == "[DONE]", (i, payloads[-3:])
        last = json.loads(payloads[-2])
        assert last["usage"]["completion_tokens"] == 10, (i, last)
    assert live.wait_idle(5), "aborted streams kept running"
    live.engine.check_integrity()
    assert live.engine.block_manager.num_free_blocks == live.engine.block_manager.num_blocks
    text = httpx.get(live.url + "/metrics").text
    assert metric(text, "vllm:num_requests_running", model_name=CF) == 0
    assert metric(text, "vllm:num_requests_waiting", model_name=CF) == 0
    end = time.monotonic() + 5
    while len(request_logs(caplog)) < 20 and time.monotonic() < end:
        time.sleep(0.02)
    logs = request_logs(caplog)
    assert len(logs) == 20
    assert sum(line["cancelled"] for line in logs) == 5
    assert all(line["completion_tokens"] < 100 for line in logs)


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HELLO, "max_tokens": 20000, "ignore_eos": True, "temperature": 0}),
    (RUN, {"prompt": "Write a long essay", "max_tokens": 20000, "temperature": 0}),
])
def test_non_stream_client_timeout_aborts(live, caplog, path, body):
    caplog.set_level(logging.INFO, logger="server.requests")
    caplog.clear()
    start = time.monotonic()
    with pytest.raises(httpx.TimeoutException):
        httpx.post(live.url + path, json=body, timeout=httpx.Timeout(0.7))
    assert live.wait_idle(3), "the request kept running after its client left"
    assert time.monotonic() - start < 5
    live.engine.check_integrity()
    end = time.monotonic() + 3
    while not request_logs(caplog) and time.monotonic() < end:
        time.sleep(0.02)
    (line,) = request_logs(caplog)
    assert line["cancelled"] is True and line["completion_tokens"] < 2000


# ---- python -m server -----------------------------------------------------------------------------------------
def test_python_m_server(tiny_dir, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "server", "--model", str(tiny_dir), "--host", "127.0.0.1",
                                 "--port", str(port), "--kv-cache-gib", "0.0625", "--log-level", "warning"],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited: {log_path.read_text()[-2000:]}"
            assert time.monotonic() < end, f"no /health 200 within 60 s: {log_path.read_text()[-2000:]}"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        r = httpx.post(base + RUN, json={"prompt": "hi", "max_tokens": 3, "temperature": 0}, timeout=30)
        assert r.status_code == 200 and r.json()["result"]["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
