"""The playground (GET /) as a user drives it: Debian's headless Chromium, driven by Playwright, against the real
server on the tiny checkpoint. A message streams in; every control, an image, raw mode, a JSON schema and tools
reach the request body; stop aborts on the server; the route switch changes ranges and payload; edit,
regenerate and tool results continue the conversation. Every test also checks that the page requested nothing
outside the server's origin and logged no console error (tests/playground_page.py)."""

from __future__ import annotations

import base64
import json
import logging
import time

import httpx
import pytest
from playground_page import RUN, body_props, bounds, demo_server, open_page, png, png_data_uri
from prometheus_client.parser import text_string_to_metric_families

from server.config import CLOUDFLARE_MODEL


@pytest.fixture(scope="module")
def live(tiny_dir):
    with demo_server(tiny_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def spec(live):
    return httpx.get(live.url + "/openapi.json", timeout=30).json()


def metric(url: str, name: str, **labels) -> float:
    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_a_message_streams_in_and_matches_the_servers_answer(live, chromium):
    s = open_page(chromium, live.url)
    assert s.page.locator("#banner").is_visible()          # the demo checkpoint is said
    s.set("temperature", 0)
    s.set("max_tokens", 24)
    s.page.evaluate("""() => { window.__lengths = [];
        new MutationObserver(() => { const b = document.querySelector('.msg-assistant .body');
            if (b) window.__lengths.push(b.textContent.length); })
          .observe(document.getElementById('messages'), {childList: true, subtree: true}); }""")
    s.send("Hello there")
    s.wait_replies(1)
    lengths = s.page.evaluate("window.__lengths")
    assert len(set(lengths)) >= 3, lengths                   # it grew event by event
    body = s.last_body()
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 24
    assert body["messages"] == [{"role": "user", "content": "Hello there"}]
    whole = httpx.post(live.url + RUN, json={**body, "stream": False}, timeout=120).json()["result"]
    assert s.reply_source() == whole["response"]
    assert s.stat("completion") == str(whole["usage"]["completion_tokens"])
    assert s.stat("prompt") == str(whole["usage"]["prompt_tokens"])
    assert s.stat("TTFT").endswith("ms") and s.stat("tokens/s") != "–"
    s.check()


VALUES = {"max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 16, "seed": 1234, "repetition_penalty": 1.1,
          "frequency_penalty": 0.3, "presence_penalty": 0.2, "min_tokens": 2, "ignore_eos": True, "stop": ["zz"]}


@pytest.mark.parametrize("route", ["workers", "openai"])
def test_every_control_and_an_image_reach_the_request_body(live, chromium, spec, route):
    props = body_props(spec, route)
    s = open_page(chromium, live.url)
    s.route(route)
    shown = set(s.page.eval_on_selector_all("#controls .control", "els => els.map(e => e.dataset.name)"))
    assert shown == {n for n in VALUES if n in props}
    for name in shown:
        lo, hi, _ = bounds(props[name]) if name not in ("ignore_eos", "stop") else (None, None, None)
        assert (lo is None or VALUES[name] >= lo) and (hi is None or VALUES[name] <= hi), name
        s.set(name, VALUES[name])
    image = png(24, 16)
    s.page.set_input_files("#file", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": image}])
    s.page.wait_for_selector(".attachment img")
    s.send("What is this?")
    s.wait_replies(1)
    body = s.last_body()
    assert {n: body[n] for n in shown} == {n: VALUES[n] for n in shown}
    assert body["messages"][-1]["content"] == [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": png_data_uri(image)}}]
    assert s.reply().locator(".error").count() == 0 and s.stat("completion") == "4"
    s.check()


def test_images_by_paste_and_drop_and_refusals_past_the_limits(live, chromium):
    small = base64.b64encode(png(20, 20)).decode()
    js = """([b64, name, how]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        if (how === 'paste') document.getElementById('input').dispatchEvent(
            new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        else document.getElementById('composer').dispatchEvent(
            new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true})); }"""
    s = open_page(chromium, live.url)
    s.page.evaluate(js, [small, "pasted.png", "paste"])
    s.page.evaluate(js, [small, "dropped.png", "drop"])
    s.page.wait_for_function("() => document.querySelectorAll('.attachment img').length === 2")
    assert s.page.locator("#notice").is_hidden()
    s.check()

    def small_limits(page):     # the page must follow whatever /limits says
        page.route("**/limits", lambda r: r.fulfill(json={
            "max_body_bytes": None, "max_images": 1, "max_image_bytes": 4096, "max_image_pixels": 300,
            "max_request_pixels": None, "image_formats": ["PNG"]}))

    s = open_page(chromium, live.url, before=small_limits)
    s.page.evaluate(js, [small, "big.png", "paste"])                    # 400 pixels
    s.page.wait_for_selector("#notice:not([hidden])")
    assert "20×20 is 400 pixels, over the server's limit of 300 pixels" in s.page.text_content("#notice")
    s.page.evaluate(js, [base64.b64encode(png(10, 10)).decode(), "ok.png", "drop"])
    s.page.wait_for_selector(".attachment img")
    s.page.evaluate(js, [base64.b64encode(png(10, 10)).decode(), "second.png", "drop"])
    s.page.wait_for_function("() => document.getElementById('notice').textContent.includes('at most 1 images')")
    s.page.set_input_files("#file", files=[{"name": "a.gif", "mimeType": "image/gif", "buffer": b"GIF89a"}])
    s.page.wait_for_function("() => document.getElementById('notice').textContent.includes('image/gif is not accepted')")
    assert s.page.locator(".attachment img").count() == 1
    s.check()


def test_stop_aborts_the_request_on_the_server(live, chromium, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    s = open_page(chromium, live.url)
    s.set("max_tokens", 4000)
    s.set("ignore_eos", True)
    s.send("Tell me everything")
    s.page.wait_for_function("() => document.querySelector('.msg-assistant .body').textContent.length > 20")
    assert metric(live.url, "vllm:num_requests_running") == 1
    aborted = metric(live.url, "vllm:request_success_total", finished_reason="abort")
    s.page.click("#stop")
    s.wait_replies(1)
    assert s.stat("finish") == "stopped (you)"
    end = time.monotonic() + 10
    while metric(live.url, "vllm:num_requests_running") and time.monotonic() < end:
        time.sleep(0.05)
    assert metric(live.url, "vllm:num_requests_running") == 0
    assert metric(live.url, "vllm:request_success_total", finished_reason="abort") == aborted + 1
    live.assert_drained()
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "server.requests"]
    assert lines and lines[-1]["cancelled"] is True and lines[-1]["completion_tokens"] < 4000
    s.check()


def test_the_route_switch_changes_ranges_and_payload(live, chromium, spec):
    s = open_page(chromium, live.url)
    routes = {key: body_props(spec, key) for key in ("workers", "openai")}

    def slider(name):
        return s.page.eval_on_selector(f"#ctl-{name}-slider", "e => [Number(e.min), Number(e.max)]")

    for key in ("workers", "openai", "workers"):
        s.route(key)
        for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "repetition_penalty"):
            lo, hi, default = bounds(routes[key][name])
            assert slider(name) == [lo, hi], (key, name)
            assert s.page.input_value(f"#ctl-{name}") == ("" if default is None else str(default))
        assert s.page.locator("#ctl-stop").count() == (key == "openai")
        assert s.page.locator("#raw").is_visible() == (key == "workers")
    assert slider("temperature") == [0, 5] and slider("frequency_penalty") == [0, 2]
    s.set("temperature", 4)
    s.set("max_tokens", 3)
    s.route("openai")
    assert slider("temperature") == [0, 2] and slider("frequency_penalty") == [-2, 2]
    assert "temperature 4 reset to the default" in s.page.text_content("#notice")
    s.send("Hi")
    s.wait_replies(1)
    url, _, body = s.api[-1]
    assert url.endswith("/v1/chat/completions") and "temperature" not in body and body["max_tokens"] == 3
    assert body["model"] == CLOUDFLARE_MODEL and body["stream_options"] == {"include_usage": True}
    assert s.stat("finish") in ("length", "stop") and s.stat("cached") != "–"
    s.route("workers")
    s.send("Again")
    s.wait_replies(2)
    url, _, body = s.api[-1]
    assert url == live.url + RUN and "model" not in body and "stream_options" not in body
    assert "temperature" not in body and body["max_tokens"] == 3      # reset, as the notice said
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    s.check()


def test_history_edit_and_regenerate(live, chromium):
    s = open_page(chromium, live.url)
    s.page.fill("#system", "Be brief.")
    s.set("max_tokens", 4)
    s.send("first")
    s.wait_replies(1)
    first = s.last_body()["messages"]
    assert first == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "first"}]
    s.reply().get_by_role("button", name="Regenerate").click()
    s.page.wait_for_function("n => document.querySelectorAll('.msg-assistant').length === 1 && "
                             "document.querySelectorAll('.msg-assistant .stats').length === 1 && "
                             "!document.querySelector('.msg-assistant.streaming')", arg=1)
    assert len(s.api) == 2 and s.last_body()["messages"] == first
    s.page.locator(".msg-user").get_by_role("button", name="Edit").click()
    s.page.fill(".edit-box", "first, edited")
    s.page.get_by_role("button", name="Save & send").click()
    s.wait_replies(1)
    s.page.wait_for_function("() => !document.querySelector('.msg-assistant.streaming')")
    assert len(s.api) == 3 and s.last_body()["messages"][1:] == [{"role": "user", "content": "first, edited"}]
    assert s.page.locator(".msg").count() == 2
    reply = s.reply_source()
    s.send("second")
    s.wait_replies(2)
    assert s.last_body()["messages"][1:] == [{"role": "user", "content": "first, edited"},
                                             {"role": "assistant", "content": reply},
                                             {"role": "user", "content": "second"}]
    s.check()


def test_raw_mode_and_the_json_schema_box(live, chromium):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    s = open_page(chromium, live.url)
    s.set("max_tokens", 3)
    s.page.check("#raw")
    s.send("<s>[INST]Hi[/INST]")
    s.wait_replies(1)
    assert s.last_body() == {"prompt": "<s>[INST]Hi[/INST]", "raw": True, "max_tokens": 3, "stream": True}
    s.page.uncheck("#raw")
    s.page.click("#schema-section summary")
    s.page.fill("#schema", "{not json")
    s.send("Answer in JSON")
    s.page.wait_for_function("() => document.getElementById('notice').textContent.includes('Not sent')")
    assert len(s.api) == 1 and s.page.locator("#schema-error").is_visible()
    s.page.fill("#schema", json.dumps(schema))
    s.set("max_tokens", 32)
    s.page.click("#send")
    s.wait_replies(2)
    body = s.last_body()
    assert body["response_format"] == {"type": "json_schema", "json_schema": schema}
    assert "raw" not in body and [m["role"] for m in body["messages"]] == ["user"]      # raw turns stay out
    assert isinstance(json.loads(s.reply_source())["ok"], bool)
    s.route("openai")
    s.page.fill("#input", "Again")
    s.page.click("#send")
    s.wait_replies(3)
    assert s.last_body()["response_format"] == {"type": "json_schema",
                                                "json_schema": {"name": "answer", "schema": schema}}
    assert isinstance(json.loads(s.reply_source())["ok"], bool)
    s.check()



@pytest.mark.parametrize("route", ["workers", "openai"])
def test_tool_calls_are_cards_and_results_go_back(live, chromium, route):
    s = open_page(chromium, live.url)
    s.route(route)
    s.page.click("#tools-section summary")
    s.page.click("#tools-example")
    s.page.select_option("#tool-choice", "required")
    for name, value in (("temperature", 1), ("seed", 10), ("max_tokens", 400)):
        s.set(name, value)
    s.send("Weather in Paris?")
    s.wait_replies(1)
    assert s.reply().locator(".error").count() == 0, s.reply().text_content()
    cards = s.reply().locator(".call-card")
    n = cards.count()
    assert n >= 1 and s.page.locator(".call-name").all_text_contents() == ["get_weather"] * n
    for k in range(n):
        assert json.loads(cards.nth(k).locator(".call-args").text_content())["city"] in ("Paris", "London", "Tokyo")
        cards.nth(k).locator(".call-result").fill(f"18 C, result {k}")
    s.reply().get_by_role("button", name="Send result").click()
    s.wait_replies(2)
    body = s.last_body()
    assistant, results = body["messages"][1], body["messages"][2:]
    assert len(assistant["tool_calls"]) == n and [r["content"] for r in results] == [f"18 C, result {k}"
                                                                                     for k in range(n)]
    if route == "openai":   # ids as the server gave them; Workers AI's calls have none and answer in order
        assert [r["tool_call_id"] for r in results] == [c["id"] for c in assistant["tool_calls"]]
    assert s.page.locator(".msg-tool").count() == n and s.reply().locator(".error").count() == 0
    s.check()
