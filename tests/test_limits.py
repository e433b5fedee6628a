"""Admission limits (server/limits.py) against huge or hostile inputs, each checked before the work it protects:
the body's bytes as they stream in, JSON nesting, prompt characters before tokenizing, images from their
headers before any decoding. And inputs that once made 500s: they are 400s now."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import select
import socket

import httpx
import pytest
from PIL import Image, ImageFile
from server_fixture import start_server, tiny_engine
from test_server import CF, HELLO, RUN, cf_error, oai_error
from util import data_uri

from server.config import ServerSettings
from server.limits import Limits

pytestmark = pytest.mark.usefixtures("drained")   # after each test using `live`: idle engine, whole pool

MiB = 2**20
SLACK = 64 * 1024        # what uvicorn may have read beyond what the app took (its read-pause threshold)


class BodyCounter:
    """ASGI layer between uvicorn and the app: the body bytes the app has taken, per request."""

    def __init__(self, app):
        self.app, self.taken = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.taken.append(0)
        k = len(self.taken) - 1

        async def counted():
            message = await receive()
            self.taken[k] += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


@pytest.fixture(scope="module")
def live(tiny_dir):
    counter = []

    def wrap(app):
        counter.append(BodyCounter(app))
        return counter[0]

    srv = start_server(tiny_engine(tiny_dir), ServerSettings(limits=Limits(max_body_bytes=1 * MiB)), wrap=wrap)
    srv.counter = counter[0]
    yield srv
    srv.stop()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c


# ---- the body ---------------------------------------------------------------------------------------------------
def send_chunked(port: int, path: str, total: int, piece: int = 16 * 1024) -> tuple[bytes, int]:
    """POST a body of `total` bytes with transfer-encoding: chunked (as wrangler sends), `piece` bytes at a
    time, stopping when the server answers or hangs up. Returns (the response, bytes sent)."""
    sent, response = 0, b""
    body = b'{"prompt": "' + b"x" * total
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  f"Transfer-Encoding: chunked\r\n\r\n".encode())
        try:
            while sent < len(body):
                chunk = body[sent:sent + piece]
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                if select.select([s], [], [], 0.002)[0]:
                    break
            else:
                s.sendall(b"0\r\n\r\n")
            while True:
                data = s.recv(65536)
                if not data:
                    break
                response += data
        except (BrokenPipeError, ConnectionResetError):
            pass
    return response, sent


@pytest.mark.parametrize("path,openai", [(RUN, False), ("/v1/completions", True)])
def test_a_body_over_the_limit_is_refused_after_reading_at_most_the_limit_and_64k(live, path, openai):
    response, sent = send_chunked(live.port, path, 6 * MiB)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), response[:300]
    assert b"connection: close" in head.lower()          # the rest is not read and thrown away
    if b"transfer-encoding: chunked" in head.lower():
        body = body.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    err = json.loads(body)
    if openai:
        assert err["error"]["code"] == "request_too_large" and "1048576 bytes" in err["error"]["message"]
    else:
        assert err["errors"][0]["code"] == 3006 and err["errors"][0]["message"].startswith("Request is too large")
    assert live.counter.taken[-1] <= 1 * MiB + SLACK, live.counter.taken[-1]
    assert sent < 6 * MiB


def test_a_declared_length_over_the_limit_is_refused_before_reading(live):
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
        s.sendall(f"POST {RUN} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {100 * MiB}\r\n\r\n".encode())
        s.sendall(b"{" * 1000)
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and live.counter.taken[-1] == 0


def test_a_body_at_the_limit_passes(live, http):
    pad = 1 * MiB - len(json.dumps({"prompt": "Hi", "max_tokens": 1, "x_pad": ""}))
    r = http.post(RUN, content=json.dumps({"prompt": "Hi", "max_tokens": 1, "x_pad": "y" * pad}))
    assert r.status_code == 200, r.text


# ---- JSON nesting, surrogates: once 500s ------------------------------------------------------------------------
def test_a_body_nested_10000_levels_is_a_400(http):
    for path in (RUN, "/v1/chat/completions"):
        r = http.post(path, content=b'{"prompt": ' + b"[" * 10_000 + b"]" * 10_000 + b"}")
        assert r.status_code == 400, r.text
        assert "deeper than 64 levels" in r.text


def test_tool_parameters_nested_900_levels_are_a_400(http):
    schema = '{"type": "object", "properties": {"a": ' * 900 + '{"type": "string"}' + "}}" * 900
    body = '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "tools": [{"type": "function", ' \
           '"function": {"name": "f", "description": "d", "parameters": ' + schema + "}}]}"
    for path in (RUN, "/v1/chat/completions"):
        r = http.post(path, content=body.encode())
        assert r.status_code == 400 and "--max-json-depth" in r.text, r.text


def test_nesting_within_the_limit_still_works(http):
    schema = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"a": schema}}
    r = http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2, "temperature": 0,
                                                "response_format": {"type": "json_schema", "json_schema": {
                                                    "name": "deep", "schema": schema}}})
    assert r.status_code == 200, r.text


def test_a_lone_surrogate_in_the_model_field_is_a_400(http):
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = '{"model": "\\ud800", "max_tokens": 1, ' + (
            '"messages": [{"role": "user", "content": "hi"}]}' if "chat" in path else '"prompt": "hi"}')
        err = oai_error(http.post(path, content=body.encode()), 400)
        assert err["param"] == "model" and "lone surrogate" in err["message"], err
    r = http.post(RUN, content=b'{"prompt": "a\\udfff b"}')
    assert "lone surrogate" in cf_error(r, 400, 5006)


def test_an_error_quoting_a_lone_surrogate_is_still_rendered():
    from server.errors import ApiError, render
    response = render(ApiError(404, 5007, "The model `\ud800` does not exist"), openai=True)
    assert json.loads(response.body)["error"]["message"] == "The model `\ufffd` does not exist"


# ---- prompt characters ------------------------------------------------------------------------------------------
def test_prompt_characters_are_limited_before_tokenizing(live, http, monkeypatch):
    encoded = []
    tok = live.engine.tokenizer
    monkeypatch.setattr(tok, "encode_chat", lambda *a, **k: encoded.append(1))
    monkeypatch.setattr(tok, "encode_raw", lambda *a, **k: encoded.append(1))
    with live.override(limits={"max_prompt_chars": 1000}):
        r = http.post(RUN, json={"messages": [{"role": "system", "content": "s" * 600},
                                              {"role": "user", "content": "u" * 600}]})
        assert "--max-prompt-chars" in cf_error(r, 413, 3006)
        for path in ("/v1/completions", "/tokenize"):
            err = oai_error(http.post(path, json={"prompt": "p" * 1001}), 413)
            assert err["code"] == "request_too_large"
        tool = {"name": "f", "description": "d" * 1000, "parameters": {"type": "object"}}
        cf_error(http.post(RUN, json={"messages": HELLO, "tools": [tool]}), 413, 3006)
        hidden = {"name": "f", "parameters": {"type": "object", "properties": {         # not an image part
            "image_url": {"type": "string", "description": "d" * 1000}}}}
        cf_error(http.post(RUN, json={"messages": HELLO, "tools": [hidden]}), 413, 3006)
    assert encoded == []


# ---- images -----------------------------------------------------------------------------------------------------
def png_uri(w: int, h: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")      # one colour: a small file
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(*uris) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in uris)]}]


def test_no_image_is_decoded_past_its_header_when_its_pixels_exceed_the_limit(live, http, monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    big = png_uri(8192, 8192)                  # 8192² compresses to a few hundred KB
    assert len(big) < 1 * MiB
    for path in (RUN, "/v1/chat/completions", "/tokenize"):
        r = http.post(path, json={"messages": image_message(big), "max_tokens": 1} if path != "/tokenize" else
                      {"messages": image_message(big)})
        assert r.status_code == 400 and "--max-image-pixels" in r.text, (path, r.text)
    assert decoded == []
    ok = http.post(RUN, json={"messages": image_message(data_uri(56, 56, 1)), "max_tokens": 1})
    assert ok.status_code == 200 and decoded and set(decoded) == {(56, 56)}     # the check does not stop decoding


def test_images_per_request_and_pixels_per_request(live, http, monkeypatch):
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or load(self))
    small = data_uri(28, 28, 2)
    with live.override(limits={"max_images": 2}):
        err = oai_error(http.post("/v1/chat/completions", json={"messages": image_message(small, small, small)}),
                        400)
        assert "3 images; at most 2" in err["message"] and "--max-images" in err["message"]
        err = oai_error(http.post("/tokenize", json={"messages": image_message(small, small, small)}), 400)
        assert "--max-images" in err["message"]
    with live.override(limits={"max_request_pixels": 3000, "max_image_pixels": 2000}):
        r = http.post(RUN, json={"messages": image_message(png_uri(40, 40), png_uri(40, 40))})
        assert "--max-request-pixels" in cf_error(r, 400, 5006)
    assert decoded == []


def test_a_jpeg_header_behind_big_metadata_is_found(live, http):
    """The header is read from a prefix of the base64 payload when it lies there, else from all of it."""
    from engine.image_processor import image_size
    buf = io.BytesIO()
    Image.new("RGB", (640, 480)).save(buf, format="JPEG", exif=b"Exif\x00\x00" + bytes(60_000),
                                       icc_profile=bytes(200_000))
    uri = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    assert len(uri) > 256 * 1024 and image_size(uri) == (640, 480)
    assert image_size(png_uri(3000, 20)) == (3000, 20)


# ---- what the limits are, and where they are told -----------------------------------------------------------------
def test_limits_are_served_read_only_without_a_key(live, http):
    with live.override(api_key="sekrit", limits={"max_images": 3}):
        r = http.get("/limits")
        assert r.status_code == 200
        assert r.json()["max_images"] == 3 and r.json()["max_body_bytes"] == 1 * MiB
        assert http.post("/limits").status_code == 405
    spec = http.get("/openapi.json").json()
    props = spec["components"]["schemas"]["Limits"]["properties"]
    assert set(props) == set(Limits().public()) and all(p["description"] for p in props.values())


def test_readme_limits_table_is_the_dataclass():
    import dataclasses
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("<!-- limits:start -->")[1].split("<!-- limits:end -->")[0]
    rows = dict(re.findall(r"^\| `(--[a-z-]+)` \| ([0-9.]+)", table, re.MULTILINE))
    fields = {"--" + f.name.replace("_", "-"): str(f.default) for f in dataclasses.fields(Limits)}
    assert rows == fields


def test_limit_flags_and_defaults():
    from server.cli import build_parser
    args = build_parser().parse_args(["serve", "--max-body-bytes", "1000", "--max-images", "2",
                                      "--request-timeout", "5", "--drain-timeout", "1"])
    from server.flags import from_args
    limits = from_args(Limits, args)
    assert (limits.max_body_bytes, limits.max_images, limits.request_timeout, limits.drain_timeout) == \
        (1000, 2, 5.0, 1.0)
    assert limits.max_prompt_chars == Limits().max_prompt_chars
    with pytest.raises(ValueError, match="max_image_pixels"):
        Limits(max_image_pixels=10**9)


def test_empty_api_key_is_refused(capsys):
    with pytest.raises(ValueError, match="must not be empty"):
        ServerSettings(api_key="")
    from server.cli import main
    assert main(["serve", "--api-key", "", "--model", "/nonexistent"]) == 2
    assert "must not be empty" in capsys.readouterr().err


def test_max_tokens_is_checked_when_max_completion_tokens_is_present(http):
    err = oai_error(http.post("/v1/chat/completions", json={"messages": HELLO, "max_completion_tokens": 5,
                                                           "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"
    err = oai_error(http.post("/v1/chat/completions", json={"messages": HELLO, "max_completion_tokens": 5,
                                                           "max_tokens": "many"}), 400)
    assert err["param"] == "max_tokens"


def test_the_model_name_is_still_checked(http):
    err = oai_error(http.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": HELLO}), 404)
    assert err["code"] == "model_not_found" and CF in err["message"]


def test_admission_weighs_a_request_by_its_sequences():
    """`--max-queue` bounds sequences: an n=16 request takes sixteen places (a larger one than the bound is
    admitted only alone), and rejectIfBusy needs slots free for all of a request's sequences."""
    from server.admission import Admission
    from server.errors import ApiError
    limits = Limits(max_queue=4)

    async def main():
        adm = Admission()
        big = adm.admit(limits, 4, 0, False, 6)
        small = adm.admit(limits, 4, 0, False, 2)               # 8 = slots + queue
        with pytest.raises(ApiError) as e:
            adm.admit(limits, 4, 0, False, 1)
        assert e.value.status == 429
        big.release()
        with pytest.raises(ApiError):
            adm.admit(limits, 4, 0, True, 3)                    # 2 + 3 sequences > 4 slots: busy
        busy_ok = adm.admit(limits, 4, 0, True, 2)
        small.release()
        busy_ok.release()
        assert adm.held == 0 and not adm.tickets
        alone = adm.admit(limits, 4, 0, False, 20)              # more than the bound, but alone
        with pytest.raises(ApiError):
            adm.admit(limits, 4, 0, False, 1)
        alone.release()
        alone.release()                                         # releasing twice changes nothing
        assert adm.held == 0

    asyncio.run(main())
