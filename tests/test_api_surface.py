"""The server's surface as one piece: what the spec says (/openapi.json) against what the routes, the CLI and the
README do; each route's policy on unknown fields and content types; browser access (CORS, Origin, Host); the
offline doc page in a real headless Chromium; CPU work kept off the event loop."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from server_fixture import start_server, tiny_engine

from engine.guided import GrammarCompiler
from server.config import CLOUDFLARE_MODEL, ServerSettings
from server.errors import VLLM_PATHS, is_openai_path

REPO = Path(__file__).resolve().parents[1]
RUN = f"/client/v4/accounts/acct/ai/run/{CLOUDFLARE_MODEL}"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def live(tiny_dir):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    yield srv
    srv.stop()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def spec(live):
    return httpx.get(live.url + "/openapi.json", timeout=30).json()


def body_schema(spec: dict, path: str) -> dict:
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]


def number_field(schema: dict) -> dict:
    """The non-null branch of an optional field."""
    return next(s for s in schema.get("anyOf", [schema]) if s.get("type") != "null")


# ---- the spec ---------------------------------------------------------------------------------------------------
def routes(container) -> list:
    """Every route of an app, through included routers."""
    out = []
    for r in container.routes:
        inner = getattr(r, "original_router", None)
        out += routes(inner) if inner is not None else [r]
    return out


def test_spec_describes_every_route_with_bodies_and_both_error_shapes(live, spec):
    api_routes = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    served = {(m, r.path_format) for r in routes(live.app) if getattr(r, "include_in_schema", False)
              for m in r.methods - {"HEAD"}}
    assert served == api_routes
    for path, item in spec["paths"].items():
        for method, op in item.items():
            statuses = set(op["responses"])
            assert "200" in statuses, (method, path)
            if method == "post":
                assert op["requestBody"]["required"] is True
                assert {"400", "401", "500", "503"} <= statuses, (path, statuses)
                shape = "OpenAIError" if is_openai_path(path) else "CloudflareError"
                for status in ("400", "401", "500"):
                    ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
                    assert ref.endswith("/" + shape), (path, status, ref)
                if path not in VLLM_PATHS:      # the generation routes queue and stream
                    assert "429" in statuses, (path, statuses)
                    assert "text/event-stream" in op["responses"]["200"]["content"]
    workers = body_schema(spec, "/client/v4/accounts/{account_id}/ai/run/{model}")
    assert workers["additionalProperties"] is True
    assert body_schema(spec, "/v1/chat/completions")["additionalProperties"] is False


def test_spec_ranges_and_defaults_are_the_contracts(spec):
    workers = body_schema(spec, "/client/v4/accounts/{account_id}/ai/run/{model}")["properties"]
    chat = body_schema(spec, "/v1/chat/completions")["properties"]
    expect = {"temperature": (0, 5, 0.15), "top_p": (0, 2, None), "top_k": (1, 50, None),
              "seed": (1, 9_999_999_999, None), "repetition_penalty": (0, 2, None),
              "frequency_penalty": (0, 2, None), "presence_penalty": (0, 2, None)}
    for name, (lo, hi, default) in expect.items():
        f = number_field(workers[name])
        assert (f["minimum"], f["maximum"], workers[name]["default"]) == (lo, hi, default), name
    assert workers["max_tokens"]["default"] == 256 and number_field(workers["max_tokens"])["minimum"] == 1
    assert (number_field(chat["temperature"])["maximum"], chat["temperature"]["default"]) == (2, 0.15)
    assert number_field(chat["frequency_penalty"])["minimum"] == -2 and chat["max_tokens"]["default"] == 256


def test_cli_help_has_the_specs_defaults_and_ranges(spec):
    """One source for defaults and ranges: `run --help` shows what /openapi.json says of the Workers route."""
    out = subprocess.run([sys.executable, "-m", "server", "run", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120, check=True).stdout
    help_text = " ".join(out.split())
    workers = body_schema(spec, "/client/v4/accounts/{account_id}/ai/run/{model}")["properties"]

    def num(x) -> str:
        return str(int(x)) if float(x).is_integer() else str(x)

    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed"):
        m = re.search(rf"--{name.replace('_', '-')} {name.upper()} (\S+?)(?:, default (\S+?))?(?= --|$)", help_text)
        assert m, (name, help_text)
        f, default = number_field(workers[name]), workers[name].get("default")
        span = f"{num(f['minimum'])}-{num(f['maximum'])}" if "maximum" in f else f">={num(f['minimum'])}"
        assert m.group(1) == span, (name, m.group(1), span)
        assert m.group(2) == (None if default is None else num(default)), (name, m.group(2), default)


def test_readme_route_table_matches_the_spec(spec):
    """README's route table is checked against the spec: every operation listed, nothing invented."""
    text = (REPO / "README.md").read_text()
    table = text.split("<!-- routes:start -->")[1].split("<!-- routes:end -->")[0]
    listed = set(re.findall(r"^\| `(GET|POST)` \| `([^`]+)` \|", table, re.M))
    in_spec = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    assert listed == in_spec


# ---- bodies: content types and unknown fields -------------------------------------------------------------------
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_json_bodies_whatever_the_content_type(http, content_type):
    """The README's own `curl -d` sends form-urlencoded: the body is JSON all the same."""
    headers = {"content-type": content_type} if content_type else {}
    r = http.post(RUN, content=b'{"prompt": "Hi", "max_tokens": 2, "temperature": 0}', headers=headers)
    assert r.status_code == 200, r.text
    r = http.post("/v1/chat/completions", headers=headers,
                  content=b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}')
    assert r.status_code == 200, r.text


def test_workers_accepts_unknown_fields_but_refuses_ones_it_would_ignore(http):
    r = http.post(RUN, json={"prompt": "Hi", "max_tokens": 1, "temperature": 0, "x_trace": "abc"})
    assert r.status_code == 200, r.text                     # the hosted schema allows additional properties
    for name, value in (("stop", ["x"]), ("n", 2), ("logprobs", True), ("logit_bias", {"5": 1})):
        r = http.post(RUN, json={"prompt": "Hi", name: value})
        assert r.status_code == 400 and f"'/{name}'" in r.json()["errors"][0]["message"], r.text


def test_openai_refuses_unknown_fields_by_name(http):
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "x_trace": "abc"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "x_trace"
    assert err["message"] == "Unrecognized request argument supplied: x_trace"
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "suffix": "x"})
    assert r.status_code == 400 and "suffix is not supported" in r.json()["error"]["message"]
    ok = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 1, "user": "u-1", "store": False,
                                                 "metadata": {"a": "b"}, "best_of": 1, "echo": False})
    assert ok.status_code == 200, ok.text                   # fields that change nothing


def test_workers_tool_choice_is_honoured(live, http, monkeypatch):
    """Cloudflare's AI SDK provider sends tool_choice: it shapes the grammar the engine decodes under."""
    seen = []

    async def spy(prompt, params, n, request_id=None, raw=False, tools=None):
        seen.append(params.grammar)
        raise ValueError("captured by the test")

    monkeypatch.setattr(live.llm, "submit_choices", spy)
    tool = {"name": "get_weather", "description": "Weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    for choice in ("auto", "required", "none", {"type": "function", "function": {"name": "get_weather"}}):
        http.post(RUN, json={"messages": HELLO, "tools": [tool], "tool_choice": choice})
    auto, required, none, named = seen
    assert auto.startswith("start: TEXT | calls") and required.startswith("start: calls")
    assert "calls" not in none and named.startswith("start: calls") and "get_weather" in named
    r = http.post(RUN, json={"messages": HELLO, "tools": [tool], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and "not among the tools" in r.json()["errors"][0]["message"]


# ---- browser access ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("origin", ["http://localhost:5173", "http://127.0.0.1:3000", "https://[::1]:8443"])
def test_loopback_pages_may_call(http, origin):
    r = http.post(RUN, json={"prompt": "Hi", "max_tokens": 1}, headers={"origin": origin})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    assert "origin" in r.headers["vary"].lower()


@pytest.mark.parametrize("path", [RUN, "/v1/chat/completions", "/v1/models"])
def test_other_origins_get_403_in_the_routes_shape(http, live, path):
    r = http.post(path, json={"prompt": "Hi"}, headers={"origin": "http://evil.example"}) if "models" not in path \
        else http.get(path, headers={"origin": "http://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    body = r.json()
    assert ("error" in body) == ("/v1/" in path), body
    assert live.wait_idle(2)


def test_preflight_passes_without_the_key_and_the_key_still_guards(live, http):
    with live.override(api_key="sekrit"):
        pre = http.options(RUN, headers={"origin": "http://localhost:8080", "access-control-request-method": "POST",
                                         "access-control-request-headers": "authorization, content-type"})
        assert pre.status_code == 204
        assert pre.headers["access-control-allow-origin"] == "http://localhost:8080"
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert pre.headers["access-control-allow-headers"] == "authorization, content-type"
        denied = http.post(RUN, json={"prompt": "Hi"}, headers={"origin": "http://localhost:8080"})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "http://localhost:8080"
        bad = http.options(RUN, headers={"origin": "http://evil.example", "access-control-request-method": "POST"})
        assert bad.status_code == 403


def test_allowed_origins_widen_and_wildcard_only_when_asked(live, http):
    with live.override(allowed_origins=("https://app.example",)):
        assert http.post(RUN, json={"prompt": "Hi", "max_tokens": 1},
                         headers={"origin": "https://app.example"}).status_code == 200
        assert http.post(RUN, json={"prompt": "Hi"}, headers={"origin": "https://other.example"}).status_code == 403
    with live.override(allowed_origins=("*",)):
        r = http.post(RUN, json={"prompt": "Hi", "max_tokens": 1}, headers={"origin": "https://other.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://other.example"


def test_host_header_limited_to_loopback_names(live, http):
    """DNS rebinding: a page on evil.example re-resolved to 127.0.0.1 still sends its own Host."""
    for host in ("localhost", f"127.0.0.1:{live.port}", f"[::1]:{live.port}"):
        assert http.get("/v1/models", headers={"host": host}).status_code == 200, host
    r = http.post(RUN, json={"prompt": "Hi"}, headers={"host": f"evil.example:{live.port}"})
    assert r.status_code == 403 and "Host" in r.json()["errors"][0]["message"]
    assert http.get("/health", headers={"host": "evil.example"}).status_code == 403
    with live.override(allowed_hosts=("evil.example",)):
        assert http.get("/health", headers={"host": "evil.example"}).status_code == 200
    with live.override(host="0.0.0.0"):     # bound to every interface: any name may reach it
        assert http.get("/health", headers={"host": "my-box.lan:8000"}).status_code == 200
        # ... and a page served from that name is the server's own origin
        r = http.post(RUN, json={"prompt": "Hi", "max_tokens": 1},
                      headers={"host": "my-box.lan:8000", "origin": "http://my-box.lan:8000"})
        assert r.status_code == 200, r.text


def test_405_says_which_methods_are_allowed(http):
    r = http.get(RUN)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


# ---- CPU work off the event loop --------------------------------------------------------------------------------
def test_a_stream_keeps_flowing_while_another_requests_first_grammar_compiles(tiny_dir, monkeypatch):
    """The first grammar builds llguidance's tokenizer for the whole vocabulary: it runs in a worker thread, and
    a stream that is already running goes on. (llguidance's native LLTokenizer constructor holds the GIL, about
    0.6 s for the 131,072-token vocabulary on the CI machine, so no thread runs Python meanwhile; that is why
    `serve` builds it at start, engine.warm_grammars(), and no request pays for it.)"""
    srv = start_server(tiny_engine(tiny_dir))        # a fresh engine: no grammar compiler yet
    window, threads = [], []
    build = GrammarCompiler.__init__

    def timed_build(self, tokenizer):
        threads.append(threading.get_ident())
        window.append(time.monotonic())
        build(self, tokenizer)
        window.append(time.monotonic())

    monkeypatch.setattr(GrammarCompiler, "__init__", timed_build)

    async def main():
        arrivals = []
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            async def streaming():
                body = {"messages": HELLO, "max_tokens": 3000, "ignore_eos": True, "temperature": 0, "stream": True}
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: "):
                            arrivals.append(time.monotonic())
                        if window and len(window) == 2 and arrivals[-1] > window[1] + 0.2:
                            return

            task = asyncio.create_task(streaming())
            while len(arrivals) < 3:
                await asyncio.sleep(0.01)
            loop_thread = threading.get_ident()
            r = await client.post(RUN, json={"messages": HELLO, "max_tokens": 8, "temperature": 0,
                                             "guided_json": {"type": "object"}})
            assert r.status_code == 200, r.text
            await asyncio.wait_for(task, 60)
        return arrivals, loop_thread

    try:
        arrivals, loop_thread = asyncio.run(main())
    finally:
        srv.stop()
    assert len(window) == 2 and threads and threads[0] != loop_thread     # built on a worker thread
    assert arrivals[-1] > window[1] + 0.2               # and the stream went on past it, never cut


# ---- the doc page, offline, in a real browser -------------------------------------------------------------------
def test_docs_render_offline_in_chromium(live, chromium):
    page = chromium.new_page()
    requests, errors = [], []
    page.on("request", lambda req: requests.append(req.url))
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.goto(live.url + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)
    paths = set(page.locator(".opblock-summary-path").all_inner_texts())
    assert {"/v1/chat/completions", "/client/v4/accounts/{account_id}/ai/run/{model}"} <= {
        p.replace("\u200b", "") for p in paths}
    assert requests and all(u.startswith(live.url) for u in requests), requests
    assert errors == []
    page.close()
