"""Driving the playground page (GET /) in headless Chromium: a page that records what it requests and what it
logs, so that every test also proves no request leaves the server's origin and no error reaches the console;
the server the page talks to, and the request schemas it reads."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import pytest
from PIL import Image
from server_fixture import start_server, tiny_engine

from server.config import API_KEY_ENV, CLOUDFLARE_MODEL, ServerSettings

API_PATHS = ("/client/v4/", "/v1/")
RUN = f"/client/v4/accounts/local/ai/run/{CLOUDFLARE_MODEL}"
WORKERS_SPEC_PATH = "/client/v4/accounts/{account_id}/ai/run/{model}"


@contextlib.contextmanager
def demo_server(tiny_dir):
    """The server on the tiny checkpoint, as `serve` runs it without --model (the demo banner shows)."""
    mp = pytest.MonkeyPatch()
    mp.delenv(API_KEY_ENV, raising=False)
    srv = start_server(tiny_engine(tiny_dir), ServerSettings(demo=True))
    try:
        yield srv
    finally:
        srv.stop()
        mp.undo()


def body_props(spec: dict, route: str) -> dict:
    """The request body's properties of a route of the page ("workers" or "openai"), as the spec has them."""
    path = WORKERS_SPEC_PATH if route == "workers" else "/v1/chat/completions"
    ref = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    return spec["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]


def bounds(prop: dict) -> tuple:
    """(minimum, maximum, default) of an optional numeric property."""
    f = next(b for b in prop.get("anyOf", [prop]) if b.get("type") != "null")
    return f.get("minimum"), f.get("maximum"), prop.get("default")


def png(w: int, h: int, color=(200, 80, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@dataclass
class Session:
    page: object
    origin: str
    requests: list = field(default_factory=list)        # every URL the page asked for
    api: list = field(default_factory=list)             # (url, headers, body) of the API POSTs
    console_errors: list = field(default_factory=list)
    page_errors: list = field(default_factory=list)
    dialogs: list = field(default_factory=list)

    def on_request(self, req) -> None:
        self.requests.append(req.url)
        if req.method == "POST" and urlsplit(req.url).path.startswith(API_PATHS):
            self.api.append((req.url, req.headers, json.loads(req.post_data)))

    def check(self, allowed_console=()) -> None:
        """Nothing outside the server's origin was requested; no console error but those `allowed` (regexes)."""
        outside = [u for u in self.requests if not u.startswith(self.origin + "/") and urlsplit(u).scheme not in
                   ("data", "blob")]
        assert outside == [], outside
        errors = [e for e in self.console_errors if not any(re.search(a, e) for a in allowed_console)]
        assert errors == [], errors
        assert self.page_errors == [], self.page_errors
        assert self.dialogs == [], self.dialogs

    # ---- actions ------------------------------------------------------------------------------------------
    def set(self, name: str, value) -> None:
        """Set a control the way a user does: a slider when the control has one, else its field."""
        p = self.page
        if value is True:
            p.check(f"#ctl-{name}-on")
        elif isinstance(value, list):
            p.fill(f"#ctl-{name}", "\n".join(value))
        elif p.locator(f"#ctl-{name}-slider").count():
            p.fill(f"#ctl-{name}-slider", str(value))
        else:
            p.fill(f"#ctl-{name}", str(value))

    def route(self, key: str) -> None:
        self.page.check(f"input[name=route][value={key}]")

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_replies(self, n: int, timeout: float = 120_000) -> None:
        """Until n replies have finished (done, stopped or failed)."""
        self.page.wait_for_function(
            "n => document.querySelectorAll('.msg-assistant:not(.streaming) .stats').length >= n", arg=n,
            timeout=timeout)

    def reply(self, index: int = -1):
        return self.page.locator(".msg-assistant").nth(index)

    def reply_source(self, index: int = -1) -> str:
        return self.reply(index).locator("pre.source").text_content()

    def stat(self, name: str, index: int = -1) -> str:
        return self.reply(index).locator(f"dd[data-stat='{name}']").text_content()

    def last_body(self) -> dict:
        return self.api[-1][2]


def open_page(browser, url: str, viewport=(1280, 900), before=None) -> Session:
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
    s = Session(page, url)
    page.on("request", s.on_request)
    page.on("console", lambda m: m.type == "error" and s.console_errors.append(m.text))
    page.on("pageerror", lambda e: s.page_errors.append(str(e)))
    page.on("dialog", lambda d: (s.dialogs.append(d.message), d.dismiss()))
    if before is not None:
        before(page)
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready=true]", timeout=30_000)
    return s
