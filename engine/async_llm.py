"""AsyncLLM: one engine thread, many asyncio callers.

The engine loop owns LLMEngine and runs on its own thread; callers never block it. They talk to it through
a command queue (add, abort) that the loop drains before every step, and receive what each step added to
their request on that request's RequestStream (filled with `call_soon_threadsafe`). Input processing
(tokenization, images, grammar matchers) runs in a worker thread, never on the engine thread nor on the
event loop.

Memory per request stays bounded whatever its reader does: the engine hands over only what a step added
(never a copy of everything so far), and a stream whose reader falls behind merges new steps into its last
waiting one, so at most MAX_PENDING of them wait. A reader that never reads is the server's to cut
(server/render.py): its request is then aborted and its blocks freed.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput, TokenLogprob, Usage
from engine.request import Request
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)
MAX_PENDING = 64        # steps waiting unread per request before new ones are merged into the last


class EngineDeadError(RuntimeError):
    """The engine loop failed; no request can run until the process restarts."""


class RequestFailed(RuntimeError):
    """Processing this one request failed inside a step (its grammar, say); the engine serves the others."""


class AsyncLLM:
    def __init__(self, model=None, engine: LLMEngine | None = None, **kwargs):
        self.engine = engine or LLMEngine(model, **kwargs)
        self._commands: deque = deque()
        self._wake = threading.Event()
        self._sinks: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._lock = threading.Lock()           # sinks are registered and the death is declared under it
        self._death_callbacks: list[Callable[[BaseException], None]] = []
        self._stopped = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def is_dead(self) -> bool:
        return self.error is not None

    def on_death(self, callback: Callable[[BaseException], None]) -> None:
        """Call `callback(error)` (on the engine thread) if the engine loop dies; at once if it has died."""
        with self._lock:
            if self.error is None:
                self._death_callbacks.append(callback)
                return
        callback(self.error)

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
        stream = RequestStream(self, req.request_id, req.prompt_token_ids)
        with self._lock:        # the engine may have died while this request was being prepared
            self._check_alive()
            self._sinks[req.request_id] = (asyncio.get_running_loop(), stream)
        self._command(("add", req))
        return stream

    async def submit_choices(self, prompt, params: SamplingParams | None, n: int, request_id: str | None = None,
                             raw: bool = False, tools: list[dict] | None = None) -> list[RequestStream]:
        """A prompt's `n` choices (OpenAI's `n`), each its own request, queued together: the prompt is
        prefilled once (the later choices take its blocks from the prefix cache). Their streams, in choice
        order; closing one aborts only its choice."""
        self._check_alive()
        reqs = await asyncio.to_thread(self.engine.process_choices, prompt, params, n,
                                       request_id or uuid.uuid4().hex, raw, tools)
        return [self.submit_request(req) for req in reqs]

    def _check_alive(self) -> None:
        if self.error is not None:
            raise EngineDeadError(f"the engine loop died: {self.error!r}")

    async def stream(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                     raw: bool = False, tools: list[dict] | None = None) -> AsyncIterator[RequestOutput]:
        """Yields the request's output after every step that changed it; the last one has `finished` set.
        Closing the iterator early (client gone) aborts the request: its blocks are free within one step.
        The output is one object updated in place: its delta fields hold what the step added, its cumulative
        fields (text, token_ids, logprobs) grow; copy what you keep."""
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
            loop, stream = sink
            loop.call_soon_threadsafe(stream._push, item)

    def _drain_commands(self) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "add":
                if arg.request_id in self._sinks:       # the caller may have gone before it was added
                    self.engine.submit(arg)
            else:
                out = self.engine.abort(arg)
                if out is not None:
                    self._deliver(arg, StepDelta.of(out))

    def _run(self) -> None:
        try:
            while not self._stopped:
                self._wake.clear()
                self._drain_commands()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                for out in self.engine.step():
                    self._deliver(out.request_id, RequestFailed(out.error) if out.finish_reason == "error" else
                                  StepDelta.of(out))
        except BaseException as e:      # noqa: BLE001 - every waiting caller must hear about it
            log.exception("engine loop died")
            with self._lock:
                self.error = e
                callbacks, self._death_callbacks = self._death_callbacks, []
            dead = EngineDeadError(f"the engine loop died: {e!r}")
            for request_id in list(self._sinks):
                self._deliver(request_id, dead)
            for callback in callbacks:
                try:
                    callback(e)
                except Exception:       # one listener's failure must not silence the others
                    log.exception("engine death callback failed")


@dataclass
class StepDelta:
    """What steps added to one request, handed from the engine thread to its stream."""
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None
    usage: Usage
    tool_calls_offset: int | None
    with_logprobs: bool = False
    prompt_logprobs: list | None = None     # set once, from the request's first output (never changed after)

    @classmethod
    def of(cls, out: RequestOutput) -> StepDelta:
        # the engine reuses out's delta lists: copy them (one step's worth), never the cumulative fields
        return cls(out.delta_text, list(out.delta_token_ids), list(out.delta_logprobs), out.finish_reason,
                   out.usage, out.tool_calls_offset, out.logprobs is not None, out.prompt_logprobs)

    def merge(self, later: StepDelta) -> None:
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.finish_reason, self.usage = later.finish_reason, later.usage
        if self.tool_calls_offset is None:
            self.tool_calls_offset = later.tool_calls_offset
        if self.prompt_logprobs is None:
            self.prompt_logprobs = later.prompt_logprobs


class RequestStream:
    """Async iterator over one request's outputs; `close()` before the end aborts the request.

    `usage` and `finish_reason` follow what the engine has produced, read or not."""

    def __init__(self, llm: AsyncLLM, request_id: str, prompt_token_ids: list[int]):
        self.llm, self.request_id, self.prompt_token_ids = llm, request_id, prompt_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        self._pending: deque[StepDelta | BaseException] = deque()
        self._ready = asyncio.Event()
        self._out: RequestOutput | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.finished = False

    def _push(self, item: StepDelta | BaseException) -> None:
        """On the event loop: one step's delta (or the error that ends the stream) arrives."""
        if isinstance(item, StepDelta):
            self.usage = item.usage
            self.finish_reason = item.finish_reason
            last = self._pending[-1] if self._pending else None
            if len(self._pending) >= MAX_PENDING and isinstance(last, StepDelta):
                last.merge(item)
                return
        self._pending.append(item)
        self._ready.set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while not self._pending:
            self._ready.clear()
            await self._ready.wait()
        item = self._pending.popleft()
        if isinstance(item, BaseException):
            self._end()
            raise item
        out = self._apply(item)
        if out.finished:
            self._end()
        return out

    def _apply(self, d: StepDelta) -> RequestOutput:
        out = self._out
        if out is None:
            out = self._out = RequestOutput(self.request_id, self.prompt_token_ids,
                                            logprobs=[] if d.with_logprobs else None)
        out.delta_text, out.delta_token_ids, out.delta_logprobs = d.text, d.token_ids, d.logprobs
        out.text += d.text
        out.token_ids += d.token_ids
        if out.logprobs is not None:
            out.logprobs += d.logprobs
        out.finish_reason, out.usage = d.finish_reason, d.usage
        if out.tool_calls_offset is None:
            out.tool_calls_offset = d.tool_calls_offset
        if out.prompt_logprobs is None:
            out.prompt_logprobs = d.prompt_logprobs
        return out

    def _end(self) -> None:
        self.finished = True
        self.llm._sinks.pop(self.request_id, None)

    def fail(self, err: BaseException) -> None:
        """End the stream with `err` after what is already waiting, aborting the request in the engine; nothing
        to do if the engine has finished it (its end is waiting to be read) or the stream has ended."""
        if self.finished or self.finish_reason is not None or \
                any(isinstance(p, BaseException) for p in self._pending):
            return
        self.llm._sinks.pop(self.request_id, None)
        self.llm.abort(self.request_id)
        self._pending.append(err)
        self._ready.set()

    def close(self) -> None:
        if not self.finished:
            self._end()
            self.llm.abort(self.request_id)
