"""How a real serving process ends (server/shutdown.py), driven from outside as a supervisor would: SIGTERM
drains within --drain-timeout and closes every stream with [DONE] or an error event, a second SIGTERM exits at
once, and an engine that dies takes every held request down with an error and exits non-zero."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from server_fixture import free_port
from test_server import HELLO, RUN

from server.config import API_KEY_ENV
from server.shutdown import ENGINE_DIED, ERROR_EVENTS_S

REPO = Path(__file__).resolve().parents[1]
LONG = {"max_tokens": 20000, "ignore_eos": True, "temperature": 0, "stream": True}
# a serving process whose engine can be made to fail (max_tokens 777 kills the loop at its next step) and to
# prepare slowly (a prompt with SLOW takes 5 s to encode): faults a test can aim
FAULTY = """
import sys, time
from engine.llm_engine import LLMEngine
submit, step, process = LLMEngine.submit, LLMEngine.step, LLMEngine.process_choices
def submit_(self, req):
    self.boom = getattr(self, "boom", False) or req.params.max_tokens == 777
    submit(self, req)
def step_(self):
    if getattr(self, "boom", False):
        raise RuntimeError("injected: the device fell over")
    return step(self)
def process_(self, prompt, *args, **kwargs):
    if "SLOW" in str(prompt):
        time.sleep(5)
    return process(self, prompt, *args, **kwargs)
LLMEngine.submit, LLMEngine.step, LLMEngine.process_choices = submit_, step_, process_
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""


class Served:
    def __init__(self, tiny_dir, tmp_path, *flags, script: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        cmd = [sys.executable, "-c", script] if script else [sys.executable, "-m", "server.cli"]
        env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd + ["serve", "--model", str(tiny_dir), "--port", str(self.port),
                                                "--kv-cache-gib", "0.0625", "--log-level", "warning", *flags],
                                         cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, f"server exited: {self.log()}"
            assert time.monotonic() < end, f"no /health 200 within 120 s: {self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text()[-3000:]

    def signal(self, sig=signal.SIGTERM) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def events(text: str) -> list[str]:
    return [e[len("data: "):] for e in text.split("\n\n") if e.startswith("data: ")]


async def stream(client, url: str, body: dict, started: asyncio.Event | None, out: list) -> None:
    """Read a whole stream into `out` (its events); `started` is set at the first event."""
    try:
        async with client.stream("POST", url, json=body) as r:
            out.append(r.status_code)
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    if started is not None:
                        started.set()
    except httpx.TransportError as e:
        out.append(f"transport error: {e!r}")


def test_sigterm_drains_then_ends_every_stream_with_done_or_an_error_event(tiny_dir, tmp_path):
    drain = 3.0
    srv = Served(tiny_dir, tmp_path, "--drain-timeout", str(drain))

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            outs = [[] for _ in range(5)]
            bodies = [(RUN, {"prompt": "a long one", **LONG}), (RUN, {"prompt": "another", **LONG}),
                      ("/v1/chat/completions", {"messages": HELLO, **LONG}),
                      ("/v1/completions", {"prompt": "Once upon a time", **LONG}),
                      ("/v1/chat/completions", {"messages": HELLO, **LONG, "max_tokens": 40})]
            started = [asyncio.Event() for _ in bodies]
            tasks = [asyncio.create_task(stream(client, url, body, ev, out))
                     for (url, body), ev, out in zip(bodies, started, outs)]
            await asyncio.wait_for(asyncio.gather(*(ev.wait() for ev in started)), 120)
            t0 = srv.signal()
            health, refused = None, None
            for _ in range(100):                    # intake stops at once; the port stays open meanwhile
                health = await client.get("/health")
                if health.status_code == 503:
                    refused = await client.post(RUN, json={"prompt": "late", "max_tokens": 1})
                    break
                await asyncio.sleep(0.05)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            return t0, outs, health, refused

    try:
        t0, outs, health, refused = asyncio.run(main())
        code = srv.wait(drain + ERROR_EVENTS_S + 30)
        elapsed = time.monotonic() - t0
    finally:
        srv.kill()
    assert code == 0, srv.log()
    assert health.status_code == 503 and health.json()["status"] == "shutting down"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "shutting down" in refused.json()["errors"][0]["message"]
    for i, out in enumerate(outs):
        assert out[0] == 200, out[:2]
        last = out[-1]
        if i == 4 and last == "[DONE]":         # the short one may finish within the drain
            continue
        err = json.loads(last)
        message = err["errors"][0]["message"] if "errors" in err else err["error"]["message"]
        assert "shutting down" in message, (i, out[-3:])
    assert elapsed <= drain + ERROR_EVENTS_S + 30, elapsed


def test_a_second_sigterm_exits_at_once(tiny_dir, tmp_path):
    srv = Served(tiny_dir, tmp_path, "--drain-timeout", "600")

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            out, started = [], asyncio.Event()
            task = asyncio.create_task(stream(client, RUN, {"prompt": "long", **LONG}, started, out))
            await asyncio.wait_for(started.wait(), 120)
            srv.signal()
            for _ in range(100):
                if (await client.get("/health")).status_code == 503:
                    break
                await asyncio.sleep(0.05)
            t = srv.signal()
            await asyncio.wait_for(task, 60)
            return t

    try:
        t = asyncio.run(main())
        code = srv.wait(30)
        elapsed = time.monotonic() - t
    finally:
        srv.kill()
    assert code == 128 + signal.SIGTERM, srv.log()
    assert elapsed < 30 and "second SIGTERM" in srv.log()


def test_an_engine_that_dies_ends_every_held_request_and_the_process_exits_non_zero(tiny_dir, tmp_path):
    srv = Served(tiny_dir, tmp_path, script=FAULTY)

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            ok = await client.post(RUN, json={"prompt": "fine", "max_tokens": 2})
            assert ok.status_code == 200
            out, started = [], asyncio.Event()
            streaming = asyncio.create_task(stream(client, "/v1/chat/completions", {"messages": HELLO, **LONG},
                                                   started, out))
            await asyncio.wait_for(started.wait(), 120)
            preparing = asyncio.create_task(client.post(RUN, json={"prompt": "SLOW to prepare", "max_tokens": 2}))
            await asyncio.sleep(0.5)
            t = time.monotonic()
            fatal = await client.post(RUN, json={"prompt": "fatal", "max_tokens": 777})
            prepared = await preparing
            waited = time.monotonic() - t
            await asyncio.wait_for(streaming, 60)
            return out, fatal, prepared, waited

    try:
        out, fatal, prepared, waited = asyncio.run(main())
        code = srv.wait(ERROR_EVENTS_S + 30)
    finally:
        srv.kill()
    assert code == ENGINE_DIED, srv.log()
    assert fatal.status_code == 500 and fatal.json()["errors"][0]["code"] == 5000
    assert prepared.status_code in (500, 503), prepared.text      # ended at once, not after its 5 s of encoding
    assert waited < 5, waited
    err = json.loads(out[-1])
    assert err["error"]["type"] == "server_error", out[-2:]
    assert "restarts" in srv.log() or "supervisor" in srv.log()


def test_every_limit_is_a_serve_flag():
    r = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True, cwd=REPO,
                       timeout=120, check=True)
    for flag in ("--drain-timeout", "--request-timeout", "--stall-timeout", "--max-body-bytes", "--max-json-depth",
                 "--max-prompt-chars", "--max-images", "--max-image-pixels", "--max-request-pixels", "--max-queue"):
        assert flag in r.stdout, flag
