"""A real uvicorn server on a loopback port, in a background thread, around a tiny random-weight engine."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from engine.async_llm import AsyncLLM
from engine.llm_engine import LLMEngine
from server.app import create_app
from server.config import ServerSettings

KV_BYTES = 64 * 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_engine(model_dir, **kwargs) -> LLMEngine:
    kwargs.setdefault("kv_cache_memory", KV_BYTES)
    return LLMEngine(model_dir, device="cpu", dtype="float32", progress=False, **kwargs)


@dataclass(repr=False)
class LiveServer:
    url: str
    port: int
    app: object
    llm: AsyncLLM
    server: uvicorn.Server
    thread: threading.Thread

    def __repr__(self) -> str:
        return f"LiveServer({self.url})"

    @property
    def engine(self) -> LLMEngine:
        return self.llm.engine

    @property
    def state(self):
        return self.app.state.server

    @property
    def settings(self) -> ServerSettings:
        return self.app.state.server.settings

    @contextlib.contextmanager
    def override(self, **changes):
        """Other ServerSettings for the duration of a block (the app reads them per request)."""
        old = self.state.settings
        self.state.settings = dataclasses.replace(old, **changes)
        try:
            yield self.state.settings
        finally:
            self.state.settings = old

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """True once the engine has nothing left to run (polled from the test thread)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.engine.has_unfinished() and not self.llm._commands:
                return True
            time.sleep(0.02)
        return False

    def assert_drained(self, timeout: float = 5.0) -> None:
        """The engine finished everything it was given and its KV pool is whole again (no leaked blocks)."""
        assert self.wait_idle(timeout), "requests still running on the engine after the test"
        self.engine.check_integrity()
        bm = self.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks, f"{bm.num_blocks - bm.num_free_blocks} blocks still held"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.llm.shutdown()
        assert not self.thread.is_alive(), "uvicorn did not shut down"


def start_server(engine: LLMEngine, settings: ServerSettings | None = None, timeout: float = 30.0) -> LiveServer:
    llm = AsyncLLM(engine=engine)
    app = create_app(llm, settings or ServerSettings())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    end = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            llm.shutdown()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", port, app, llm, server, thread)
