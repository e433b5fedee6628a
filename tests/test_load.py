"""Many clients at once, careless or hostile ones among them: readers that stall (a 4 KiB receive buffer, never
read), bursts past the queue bound, requests past their timeout, faults in one request's rendering — and a
soak of 64 streams on both routes. Mechanisms are asserted (who was cut, what was logged and counted, what
the KV pool holds), never wall times."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time

import cloudflare
import httpx
import psutil
import pytest
from server_fixture import start_server, tiny_engine
from test_server import ACCOUNT, CF, HELLO, RUN, cf_error, metric, oai_error, request_logs

from server.config import ServerSettings
from server.render_workers import WorkersRenderer

pytestmark = pytest.mark.usefixtures("drained")   # after each test using `live`: idle engine, whole pool

MiB = 2**20
SLOTS = 4           # the engine's running slots (--max-num-seqs) in this module
# a chat stream with 20 alternatives per token: ~1.5 KB per event, so a stalled reader's buffers fill fast
BIG_EVENTS = {"max_tokens": 20000, "ignore_eos": True, "temperature": 0, "stream": True, "logprobs": True,
              "top_logprobs": 20}


@pytest.fixture(scope="module")
def live(tiny_dir):
    srv = start_server(tiny_engine(tiny_dir, max_num_seqs=SLOTS), ServerSettings())
    yield srv
    srv.stop()


def wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"not within {timeout} s: {what}"
        time.sleep(0.05)


def metrics(live) -> str:
    return httpx.get(live.url + "/metrics").text


def counted(text: str, sample: str, **labels) -> float:
    try:
        return metric(text, sample, model_name=CF, **labels)
    except AssertionError:          # not incremented yet: prometheus shows no sample
        return 0.0


# ---- stalled readers --------------------------------------------------------------------------------------------
def stalled_stream(port: int, path: str, body: dict, rcvbuf: int | None = 4096) -> socket.socket:
    """A streaming request from a client with a 4 KiB receive buffer (that the caller never reads)."""
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def ends(s: socket.socket, timeout: float) -> bool:
    """Whether the connection ends (reset, or EOF once what was buffered is read) within `timeout`."""
    s.settimeout(timeout)
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            if not s.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False


def test_stalled_readers_are_cut_logged_and_counted_and_memory_stays_bounded(live, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    before = metrics(live)
    rss, rounds, per_round = [], 3, 4
    body = {"messages": HELLO, **BIG_EVENTS}
    with live.override(limits={"stall_timeout": 1.0}):
        for _ in range(rounds):
            caplog.clear()
            socks = [stalled_stream(live.port, "/v1/chat/completions", body) for _ in range(per_round)]
            try:
                wait_for(lambda: len(request_logs(caplog)) == per_round, 300, "every stalled reader cut")
                assert all(ends(s, 30) for s in socks), "a stalled reader's connection was left open"
            finally:
                for s in socks:
                    s.close()
            for line in request_logs(caplog):
                assert line["ended_by"] == "client_stalled" and line["cancelled"] is True, line
                assert line["finish_reason"] is None and 0 < line["completion_tokens"] < 20000, line
            live.assert_drained(15)
            rss.append(psutil.Process().memory_info().rss)
    assert rss[-1] <= rss[0] + 256 * MiB, [r // MiB for r in rss]
    after = metrics(live)
    n = rounds * per_round
    assert counted(after, "vllm:request_success_total", finished_reason="abort") == \
        counted(before, "vllm:request_success_total", finished_reason="abort") + n
    assert counted(after, "mistral_small:requests_ended_early_total", reason="client_stalled") == \
        counted(before, "mistral_small:requests_ended_early_total", reason="client_stalled") + n


def test_a_slow_reader_that_keeps_reading_is_not_cut(live):
    body = {"messages": HELLO, "max_tokens": 150, "ignore_eos": True, "temperature": 0, "stream": True,
            "logprobs": True, "top_logprobs": 20}
    with live.override(limits={"stall_timeout": 1.0}):
        s = stalled_stream(live.port, "/v1/chat/completions", body, rcvbuf=None)
        data = b""
        with s:
            s.settimeout(60)
            while not data.endswith(b"data: [DONE]\n\n") and not data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):
                time.sleep(0.2)             # reads now and then, enough never to block the server for 1 s
                chunk = s.recv(1 << 16)
                assert chunk, "cut"
                data += chunk
    assert data.count(b'"finish_reason": "length"') == 1


# ---- admission ---------------------------------------------------------------------------------------------------
def burst(live, requests: list[tuple[str, dict]], while_held=None) -> list[tuple[int, str | None, bytes | None]]:
    """Send streaming requests all at once; each admitted one is held open until every request has its status
    (so none ends and frees its place meanwhile). Returns (status, Retry-After, body unless 200) in order;
    `while_held()` runs (in a thread) while they are held."""
    async def one(client, url, body, release):
        async with client.stream("POST", url, json=body) as r:
            status = (r.status_code, r.headers.get("retry-after"), None if r.status_code == 200 else await r.aread())
            results.append(status)
            if r.status_code == 200:
                await release.wait()
            return status

    async def main():
        release = asyncio.Event()
        async with httpx.AsyncClient(base_url=live.url, timeout=120,
                                     limits=httpx.Limits(max_connections=64)) as client:
            tasks = [asyncio.create_task(one(client, url, body, release)) for url, body in requests]
            while len(results) < len(tasks):
                await asyncio.sleep(0.05)
                assert not any(t.done() and t.exception() for t in tasks), [t.exception() for t in tasks]
            if while_held is not None:
                await asyncio.to_thread(while_held)
            release.set()
            return await asyncio.gather(*tasks)

    results = []
    return asyncio.run(main())


WORKERS_LONG = {k: v for k, v in BIG_EVENTS.items() if "logprobs" not in k}


def test_a_burst_never_admits_more_than_slots_plus_queue(live):
    """30 requests at once against 4 slots and a queue of 2: exactly 6 are admitted (each held open until all
    have their answer), the rest get 429 / 3040 — on both routes, with Retry-After."""
    def sdk_says_rate_limited():
        cf = cloudflare.Cloudflare(api_token="x", base_url=f"{live.url}/client/v4", max_retries=0)
        with pytest.raises(cloudflare.RateLimitError):
            cf.ai.run(CF, account_id=ACCOUNT, prompt="hi", max_tokens=1)

    requests = [(RUN, {"prompt": f"burst {i}", **WORKERS_LONG}) if i % 2 else
                ("/v1/chat/completions", {"messages": HELLO, **BIG_EVENTS}) for i in range(30)]
    with live.override(limits={"max_queue": 2}):
        statuses = burst(live, requests, sdk_says_rate_limited)
    assert sum(status == 200 for status, _, _ in statuses) == SLOTS + 2, statuses
    for i, (status, retry, body) in enumerate(statuses):
        if status == 200:
            continue
        assert status == 429 and retry == "1", (i, status, body)
        err = json.loads(body)
        if i % 2:
            assert err["errors"][0] == {"code": 3040, "message": "Capacity temporarily exceeded, please try again."}
        else:
            assert err["error"]["type"] == "rate_limit_error"


def test_reject_if_busy_admits_only_what_can_run_at_the_next_step(live):
    requests = [(RUN, {"prompt": "busy?", **WORKERS_LONG, "options": {"rejectIfBusy": True}})] * 12
    statuses = burst(live, requests)
    assert 1 <= sum(status == 200 for status, _, _ in statuses) <= SLOTS, statuses
    assert {status for status, _, _ in statuses} == {200, 429}


# ---- timeouts ----------------------------------------------------------------------------------------------------
def test_request_timeout_408_or_an_error_event(live, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    caplog.clear()
    long = {"max_tokens": 20000, "ignore_eos": True, "temperature": 0}
    with live.override(limits={"request_timeout": 1.0}), httpx.Client(base_url=live.url, timeout=60) as http:
        msg = cf_error(http.post(RUN, json={"prompt": "Tell me everything", **long}), 408, 3007)
        assert msg == "Request timeout: the request took longer than 1 s (--request-timeout)"
        err = oai_error(http.post("/v1/chat/completions", json={"messages": HELLO, **long}), 408)
        assert err["code"] == "request_timeout"
        for url, body, tail in ((RUN, {"prompt": "go", "stream": True}, '"code": 3007'),
                                ("/v1/chat/completions", {"messages": HELLO, "stream": True}, '"request_timeout"')):
            r = http.post(url, json={**body, **long})
            assert r.status_code == 200
            events = [e for e in r.text.split("\n\n") if e]
            assert events[-1].startswith("data: {") and tail in events[-1] and "[DONE]" not in r.text, events[-2:]
    live.assert_drained(15)
    logs = request_logs(caplog)
    assert len(logs) == 4 and all(line["ended_by"] == "timeout" for line in logs), logs


def test_the_timeout_covers_preparation(live, monkeypatch):
    async def slow_submit(*args, **kwargs):
        await asyncio.sleep(30)

    monkeypatch.setattr(live.llm, "submit_choices", slow_submit)
    with live.override(limits={"request_timeout": 0.5}):
        start = time.monotonic()
        r = httpx.post(live.url + RUN, json={"prompt": "hi"}, timeout=60)
        cf_error(r, 408, 3007)
    assert time.monotonic() - start < 20
    assert not live.state.admission.tickets


# ---- a fault while rendering one request ---------------------------------------------------------------------------
def test_a_render_fault_ends_that_stream_with_5000_and_the_others_finish(live, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    caplog.clear()
    delta = WorkersRenderer.delta

    def faulty(self, d):
        if "FAULT" in getattr(self, "_prompt", ""):
            raise RuntimeError("renderer bug")
        return delta(self, d)

    init = WorkersRenderer.__init__

    def remember(self, req, pad):
        init(self, req, pad)
        self._prompt = req.prompts[0] if isinstance(req.prompts[0], str) else ""

    monkeypatch.setattr(WorkersRenderer, "delta", faulty)
    monkeypatch.setattr(WorkersRenderer, "__init__", remember)

    async def main():
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as client:
            bodies = [{"prompt": p, "max_tokens": 8, "temperature": 0, "stream": True, "ignore_eos": True}
                      for p in ("one", "FAULT", "three")]
            return await asyncio.gather(*(client.post(RUN, json=b) for b in bodies))

    ok1, bad, ok3 = asyncio.run(main())
    for r in (ok1, ok3):
        assert r.text.endswith("data: [DONE]\n\n") and '"completion_tokens": 8' in r.text
    last = [e for e in bad.text.split("\n\n") if e][-1]
    err = json.loads(last[len("data: "):])
    assert err["success"] is False and err["errors"][0]["code"] == 5000 and "request id" in \
        err["errors"][0]["message"]
    live.assert_drained(15)
    assert sorted(str(line["ended_by"]) for line in request_logs(caplog)) == ["None", "None", "error"]


# ---- a client gone before the first byte -----------------------------------------------------------------------------
def test_a_stream_whose_client_left_before_its_first_byte_releases_everything(live):
    """The client closes its socket right after sending (before, while or after the stream starts): the
    request's admission ticket, every choice's engine stream and its KV blocks are released all the same."""
    host, port = live.url.removeprefix("http://").split(":")
    body = json.dumps({"messages": HELLO, "n": 2, "max_tokens": 50, "stream": True}).encode()
    for delay in (0.0, 0.01, 0.02, 0.05, 0.2):
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            time.sleep(delay)
    live.assert_drained(30)
    end = time.monotonic() + 10
    while (live.state.admission.tickets or live.llm._sinks) and time.monotonic() < end:
        time.sleep(0.05)
    assert not live.state.admission.tickets and not live.llm._sinks


# ---- the soak ------------------------------------------------------------------------------------------------------
def test_soak_64_streams_both_routes_disconnects_and_stalls(tiny_dir, caplog):
    """Fixed rounds of 64 concurrent streams on both routes: 25% disconnect at a random point, 10% stall (4 KiB
    receive buffer, never read). Every other stream completes fully, the stalled ones are cut, the KV pool
    returns to empty after each round, and memory after the last round is within 256 MiB of the first's."""
    caplog.set_level(logging.INFO, logger="server.requests")
    srv = start_server(tiny_engine(tiny_dir, max_num_seqs=64), ServerSettings())
    rng = random.Random(7)
    rounds, n, tokens = 3, 64, 12
    rss = []

    async def normal(client, i, leave_after):
        if i % 2:
            url, body = RUN, {"prompt": f"soak {i}", "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                              "stream": True}
        else:
            url, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"soak {i}"}],
                                                 "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                                                 "stream": True, "stream_options": {"include_usage": True}}
        if leave_after is not None:
            body.update(max_tokens=4000)
        events = []
        async with client.stream("POST", url, json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if leave_after is not None and len(events) >= leave_after:
                        return None
        return events

    async def one_round(kinds):
        async with httpx.AsyncClient(base_url=srv.url, timeout=300, limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(normal(c, i, rng.randint(1, 6) if k == "leave" else None)
                                          for i, k in enumerate(kinds) if k != "stall"))

    try:
        with srv.override(limits={"stall_timeout": 1.0}):
            for _ in range(rounds):
                caplog.clear()
                kinds = ["leave"] * 16 + ["stall"] * 6 + ["stay"] * (n - 22)
                rng.shuffle(kinds)
                # stalled readers on the chat route, with the largest events: their buffers fill in ~100 tokens
                stalled = [stalled_stream(srv.port, "/v1/chat/completions", {"messages": HELLO, **BIG_EVENTS})
                           for k in kinds if k == "stall"]
                try:
                    results = asyncio.run(one_round(kinds))
                    stays = [k for k in kinds if k != "stall"]
                    for kind, events in zip(stays, results):
                        if kind == "stay":
                            assert events[-1] == "[DONE]", events[-3:]
                            usage = json.loads(events[-2])["usage"]
                            assert usage["completion_tokens"] == tokens
                    n_stalled = len(stalled)
                    wait_for(lambda: sum(line["ended_by"] == "client_stalled" for line in request_logs(caplog))
                             == n_stalled, 300, "every stalled reader cut")   # noqa: B023 - read at once
                finally:
                    for s in stalled:
                        s.close()
                srv.assert_drained(30)
                rss.append(psutil.Process().memory_info().rss)
                logs = request_logs(caplog)
                assert len(logs) == n, len(logs)
                assert sum(line["ended_by"] is None for line in logs) == kinds.count("stay")
    finally:
        srv.stop()
    assert rss[-1] <= rss[0] + 256 * MiB, [r // MiB for r in rss]
