"""The playground's surface: how it is served (a strict Content-Security-Policy, open paths that open nothing else,
the files in a non-editable install, the limits it reads), model output that stays inert, the API key asked
for and kept in the tab, "view code" snippets that run against the server, keyboard use and a 375 px layout
(screenshots: PLAYGROUND_SCREENSHOTS=DIR keeps them; docs/playground.png is the desktop one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import httpx
import pytest
from playground_page import RUN, demo_server, open_page, png

from server.config import API_KEY_ENV
from server.playground import CSP, STATIC
from server.security import is_open

REPO = Path(__file__).resolve().parents[1]
KEY = "play-sekrit"
UNAUTHORIZED_LOG = r"status of 401"     # what a 401 fetch makes Chromium log by itself (the key tests expect it)


@pytest.fixture(scope="module")
def live(tiny_dir):
    with demo_server(tiny_dir) as srv:
        yield srv


def test_page_and_assets_are_served_with_a_strict_policy(live):
    page = httpx.get(live.url + "/", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and "default-src 'self'" in CSP
    assert "unsafe-inline" not in CSP and "unsafe-eval" not in CSP
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        r = httpx.get(f"{live.url}/playground/{name}", timeout=30)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), name
        assert r.headers["x-content-type-options"] == "nosniff"
    for bad in ("/playground/nope.js", "/playground/index.html", "/playground/%2e%2e%2fplayground.py"):
        assert httpx.get(live.url + bad, timeout=30).status_code == 404, bad


def test_opening_the_page_opens_nothing_else(live):
    assert is_open("/") and is_open("/playground/app.js") and is_open("/limits")
    for path in ("/v1/models", "/v1/chat/completions", RUN, "/client/v4/accounts/x/ai/v1/models", "//v1/models",
                 "/playground", "/playgroundx/app.js", "/x/"):
        assert not is_open(path), path
    with live.override(api_key=KEY):
        for path in ("/", "/playground/app.js", "/limits", "/openapi.json", "/health"):
            assert httpx.get(live.url + path, timeout=30).status_code == 200, path
        assert httpx.get(live.url + "/v1/models", timeout=30).status_code == 401
        assert httpx.post(live.url + RUN, json={"prompt": "Hi"}, timeout=30).status_code == 401


def test_limits_are_the_enforced_ones(live):
    from engine.image_processor import ALLOWED_FORMATS, MAX_IMAGE_BYTES
    from server.limits import Limits
    limits = httpx.get(live.url + "/limits", timeout=30).json()
    assert limits["max_image_bytes"] == MAX_IMAGE_BYTES          # the demo server runs with the default flags
    assert {k: limits[k] for k in ("max_body_bytes", "max_images", "max_image_pixels", "max_request_pixels")} == \
        {k: getattr(Limits(), k) for k in ("max_body_bytes", "max_images", "max_image_pixels", "max_request_pixels")}
    assert limits["image_formats"] == list(ALLOWED_FORMATS)


def test_the_page_never_writes_html_from_strings():
    """Model text reaches the DOM through textContent only: no API that parses a string as HTML or code."""
    for path in STATIC.glob("*.js"):
        code = path.read_text()
        for api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                    "setAttribute(\"style\"", "srcdoc"):
            assert api not in code, (path.name, api)


def test_a_non_editable_install_ships_the_page(tmp_path):
    src = tmp_path / "src"          # a copy: building writes build/ and *.egg-info next to the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("engine", "server"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(src)], check=True, timeout=600, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"server/static/playground/{p.name}" for p in STATIC.iterdir() if p.is_file()}
    assert "server/static/playground/index.html" in shipped and shipped <= names, shipped - names


MARKDOWN = "# Title\n\n- one **bold**\n- two `code`\n\n1. first\n\n```python\nprint(1 < 2)\n```\n\n"
HOSTILE = ["Hello <img src=x onerror=\"window.__pwned=1;alert(1)\"> and <script>window.__pwned=2</script>\n\n",
           "[click me](javascript:window.__pwned=3) [data](data:text/html,<script>alert(4)</script>) ",
           "[ok](https://example.com/x) <a href=\"javascript:alert(5)\">a</a> **<svg onload=alert(6)>**\n\n",
           "```html\n<iframe src=\"javascript:alert(7)\"></iframe>\n```\n", "> <b onmouseover=alert(8)>quote</b>"]


def test_model_output_is_markdown_and_executes_nothing(live, chromium):
    """A mocked Workers AI stream of Markdown, then HTML, scripts and javascript: links: the Markdown is rendered,
    the rest stays text and nothing runs."""
    events = [{"response": t, "tool_calls": []} for t in [MARKDOWN[:17], MARKDOWN[17:50], MARKDOWN[50:], *HOSTILE]]
    events.append({"response": "", "tool_calls": [{"name": "<img src=x onerror=alert(9)>",
                                                   "arguments": {"q": "<script>alert(10)</script>"}}]})
    events.append({"response": "", "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}})
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    s = open_page(chromium, live.url)
    s.page.route("**/ai/run/**", lambda r: r.fulfill(status=200, body=sse, headers={
        "content-type": "text/event-stream"}))
    s.send("Render this")
    s.wait_replies(1)
    reply = s.reply()
    assert reply.locator(".body h3").text_content() == "Title"
    assert reply.locator(".body ul > li").all_text_contents() == ["one bold", "two code"]
    assert reply.locator(".body ul strong").text_content() == "bold" and reply.locator(".body ol > li").count() == 1
    assert reply.locator(".body pre code").nth(0).text_content() == "print(1 < 2)"
    assert reply.locator(".body pre .lang").nth(0).text_content() == "python"
    assert reply.locator(".body pre code").nth(1).text_content() == '<iframe src="javascript:alert(7)"></iframe>'
    for tag in ("img", "script", "iframe", "svg", "b", "object", "embed"):
        assert reply.locator(f".body {tag}, .calls {tag}").count() == 0, tag
    hrefs = reply.locator("a").evaluate_all("els => els.map(a => [a.getAttribute('href'), a.rel, a.target])")
    assert hrefs == [["https://example.com/x", "noopener noreferrer nofollow", "_blank"]]
    text = reply.locator(".body").text_content()
    assert "<script>window.__pwned=2</script>" in text and "[click me](javascript:window.__pwned=3)" in text
    assert "<img src=x onerror=alert(9)>" in reply.locator(".call-name").text_content()
    assert s.page.evaluate("window.__pwned") is None
    s.check()


def test_api_key_is_asked_kept_in_the_tab_and_sent(live, chromium):
    with live.override(api_key=KEY):
        s = open_page(chromium, live.url)
        assert s.page.locator("#key-form").is_visible()       # /v1/models said 401 at load
        s.set("max_tokens", 3)
        s.send("Hi")                                            # 401: asks again, then sends once the key is in
        s.page.wait_for_function("() => document.querySelectorAll('.msg-assistant').length === 0")
        assert s.api[-1][1].get("authorization") is None
        s.page.fill("#key-input", KEY)
        s.page.press("#key-input", "Enter")
        s.wait_replies(1)
        assert s.api[-1][1]["authorization"] == f"Bearer {KEY}" and s.reply().locator(".error").count() == 0
        assert s.page.evaluate("Object.keys(localStorage).length") == 0
        assert KEY in s.page.evaluate("Object.values(sessionStorage)")
        assert s.page.locator("#key-form").is_hidden()
        s.check(allowed_console=[UNAUTHORIZED_LOG])


def test_errors_in_a_stream_and_a_cut_stream_are_shown(live, chromium):
    s = open_page(chromium, live.url)
    bodies = iter(['data: {"response": "partial", "tool_calls": []}\n\ndata: {"errors": [{"message": "AiError: Bad '
                   'input: Error: JSON Mode couldn\'t be met", "code": 5006}], "success": false, "result": {}}\n\n',
                   'data: {"response": "cut", "tool_calls": []}\n\n'])
    s.page.route("**/ai/run/**", lambda r: r.fulfill(status=200, body=next(bodies), headers={
        "content-type": "text/event-stream"}))
    s.send("one")
    s.wait_replies(1)
    assert "JSON Mode couldn't be met" in s.reply().locator(".error").text_content()
    assert s.reply_source() == "partial"
    s.send("two")
    s.wait_replies(2)
    assert "ended before its last event" in s.reply().locator(".error").text_content()
    s.check()


def run_snippet(lang: str, code: str, tmp_path: Path, env: dict) -> subprocess.CompletedProcess:
    if lang == "javascript":
        path = tmp_path / "worker.mjs"
        path.write_text(code)
        return subprocess.run(["node", "--check", str(path)], check=False, capture_output=True, text=True,
                              timeout=60)
    if lang == "bash":
        return subprocess.run(["bash", "-c", code], check=False, capture_output=True, text=True, timeout=120,
                              env=env)
    path = tmp_path / "snippet.py"
    path.write_text(code)
    return subprocess.run([sys.executable, str(path)], check=False, capture_output=True, text=True, timeout=180,
                          env=env)


@pytest.mark.parametrize("route,keyed", [("workers", True), ("openai", False)])
def test_each_view_code_snippet_runs_against_the_server(live, chromium, tmp_path, route, keyed):
    if shutil.which("node") is None or shutil.which("curl") is None:
        pytest.skip("node and curl are needed to run the snippets")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", API_KEY_ENV: KEY}
    with live.override(api_key=KEY if keyed else None):
        s = open_page(chromium, live.url)
        if keyed:
            s.page.fill("#key-input", KEY)
            s.page.press("#key-input", "Enter")
        s.route(route)
        s.page.fill("#system", 'Say "hi" \\ it\'s fine\nsecond line – é 𝄞')
        for name, value in (("temperature", 0), ("max_tokens", 12), ("seed", 7), ("top_k", 5)):
            s.set(name, value)
        s.page.set_input_files("#file", files=[{"name": "i.png", "mimeType": "image/png", "buffer": png(8, 8)}])
        s.page.wait_for_selector(".attachment img")
        s.send("Hi ${HOME} `x` $(echo no)")
        s.wait_replies(1)
        answer = s.reply_source()
        s.page.click("#code-button")
        tabs = s.page.locator("#code-tabs button")
        names = tabs.all_text_contents()
        assert names == (["curl", "Python requests", "cloudflare SDK", "Worker"] if route == "workers"
                         else ["curl", "Python requests", "openai SDK"])
        for k, name in enumerate(names):
            tabs.nth(k).click()
            code = s.page.text_content("#code-text")
            lang = s.page.get_attribute("#code-text", "data-lang")
            assert KEY not in code and (API_KEY_ENV in code or name == "Worker" or not keyed)
            done = run_snippet(lang, code, tmp_path, env)
            assert done.returncode == 0, (name, done.stdout[-2000:], done.stderr[-2000:])
            if name == "curl":
                assert done.stdout.rstrip().endswith("data: [DONE]"), done.stdout[-500:]
            elif name in ("Python requests", "openai SDK"):
                assert done.stdout == answer + "\n", (name, done.stdout, answer)     # the same greedy answer
            elif name == "cloudflare SDK":
                assert "data: [DONE]" in done.stdout, done.stdout[-500:]
        s.check(allowed_console=[UNAUTHORIZED_LOG] if keyed else ())


def test_keyboard_layout_and_screenshots(live, chromium, tmp_path):
    out = Path(os.environ.get("PLAYGROUND_SCREENSHOTS", tmp_path))
    s = open_page(chromium, live.url)
    p = s.page
    p.focus("#input")
    p.keyboard.type("line one")
    p.keyboard.press("Shift+Enter")
    p.keyboard.type("line two")
    assert p.input_value("#input") == "line one\nline two"
    order = []
    for _ in range(4):
        p.keyboard.press("Tab")
        order.append(p.evaluate("document.activeElement.id"))
    assert order == ["file", "new-chat", "send", "system"]      # Stop is disabled while nothing runs
    p.focus("#input")
    s.set("max_tokens", 40)
    p.focus("#input")
    p.keyboard.press("Enter")
    s.wait_replies(1)
    assert s.last_body()["messages"][-1]["content"] == "line one\nline two"
    assert p.input_value("#input") == ""
    p.screenshot(path=str(out / "playground.png"))
    p.set_viewport_size({"width": 375, "height": 812})
    s.send("x" * 400 + " `" + "y" * 200 + "`")
    s.wait_replies(2)
    p.click("#code-button")
    p.click("#settings-button")
    assert p.locator("#ctl-temperature-slider").is_visible()
    assert p.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")
    p.screenshot(path=str(out / "playground-375.png"), full_page=True)
    s.check()
