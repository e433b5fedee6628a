"""AsyncLLM: one engine thread, many asyncio callers.

The engine loop owns LLMEngine and runs on its own thread; callers never block it. They talk to it through
a command queue (add, abort) that the loop drains before every step, and receive outputs on per-request
asyncio queues filled with `call_soon_threadsafe`. Input processing (tokenization, images, grammar matchers)
runs in a worker thread, never on the engine thread nor on the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import threading
import uuid
from collections import deque
from typing import AsyncIterator

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can run until the process restarts."""


class AsyncLLM:
    def __init__(self, model=None, engine: LLMEngine | None = None, **kwargs):
        self.engine = engine or LLMEngine(model, **kwargs)
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    async def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     raw: bool = False, tools: list[dict] | None = None) -> RequestStream:
        """Validate and queue a request; returns its output stream. Bad requests raise here, before anything
        is queued (PromptError, ImageError, ContextWindowError, ValueError, EngineDeadError). All the input
        processing (tokenizing, images, grammar) runs in a worker thread, never on the event loop."""
        self._check_alive()
        req = await asyncio.to_thread(self.engine.process, prompt, params, request_id or uuid.uuid4().hex, raw,
                                      tools)
        return self.submit_request(req)

    def submit_request(self, req: Request) -> RequestStream:
        """Queue a request already built by `engine.process` (e.g. in the caller's own worker pool); returns
        its output stream. Call it on the event loop that will read the stream; it does no CPU-heavy work."""
        self._check_alive()
        stream = RequestStream(self, req.request_id, req.num_prompt_tokens)
        self._sinks[req.request_id] = (asyncio.get_running_loop(), stream.queue)
        self._command(("add", req))
        return stream

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")

    async def stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     raw: bool = False, tools: list[dict] | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step that changed it; the last one has `finished` set.
        Closing the iterator early (client gone) aborts the request: its blocks are free within one step."""
        rs = await self.submit(prompt, params, request_id, raw, tools)
        try:
            async for out in rs:
                yield out
        finally:
            rs.close()

    async def generate(self, prompt, params: SamplingParams | None = None, **kwargs) -> RequestOutput:
        out = None
        async for out in self.stream(prompt, params, **kwargs):
            pass
        return out

    def abort(self, request_id: str) -> None:
        self._command(("abort", request_id))

    @property
    def num_waiting(self) -> int:
        """Requests queued but not yet running (read from another thread: a snapshot, good for limits)."""
        return len(self.engine.scheduler.waiting) + sum(1 for c in list(self._commands) if c[0] == "add")

    @property
    def num_running(self) -> int:
        return len(self.engine.scheduler.running)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ---- engine thread -------------------------------------------------------------------------------------
    def _command(self, cmd) -> None:
        self._commands.append(cmd)
        self._wake.set()

    def _deliver(self, request_id: str, item) -> None:
        sink = self._sinks.get(request_id)
        if sink is not None:
            loop, queue = sink
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _drain_commands(self) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "add":
                if arg.request_id in self._sinks:       # the caller may have gone before it was added
                    self.engine.submit(arg)
            else:
                out = self.engine.abort(arg)
                if out is not None:
                    self._deliver(arg, _snapshot(out))

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._wake.clear()
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, _snapshot(out))
        except BaseException as e:      # noqa: BLE001 - every waiting caller must hear about it
            log.exception("engine loop died")
            self.error = e
            dead = EngineDeadError(f"the engine loop died: {e!r}")
            for request_id in list(self._sinks):
                self._deliver(request_id, dead)


class RequestStream:
    """Async iterator over one request's outputs; `close()` before the end aborts the request."""

    def __init__(self, llm: AsyncLLM, request_id: str, num_prompt_tokens: int):
        self.llm, self.request_id, self.num_prompt_tokens = llm, request_id, num_prompt_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._end()
            raise item
        if item.finished:
            self._end()
        return item

    def _end(self) -> None:
        self.finished = True
        self.llm._sinks.pop(self.request_id, None)

    def close(self) -> None:
        if not self.finished:
            self._end()
            self.llm.abort(self.request_id)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """The engine keeps mutating its RequestOutput; callers get a copy frozen at this step."""
    snap = copy.copy(out)
    snap.token_ids = list(out.token_ids)
    snap.logprobs = None if out.logprobs is None else list(out.logprobs)
    return snap
