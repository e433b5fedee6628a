"""One serving pipeline below every route: a typed request in, typed deltas out.

Each route parses its body (server/protocol.py), turns it into a GenerationRequest — defaults applied once, in
SamplingParams — and hands it here. The pipeline admits it (the engine is up, the waiting queue has room),
compiles its grammar and prepares its prompt off the event loop, follows the engine's outputs and turns them
into Deltas: content text, tool-call fragments, logprobs and, on the last one, a Finished with usage and the
complete tool calls. Every delta carries its choice index. A renderer per protocol (render_workers.py,
render_openai.py) only turns deltas into bytes; the SSE loop, the disconnect handling and the request's
metrics and log line live here and in render.py, once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from fastapi import Request

from engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from engine.guided import GrammarError
from engine.image_processor import ImageError
from engine.llm_engine import ContextWindowError
from engine.outputs import RequestOutput, TokenLogprob, Usage
from engine.sampling_params import SamplingParams
from engine.tokenizer import PromptError
from engine.tool_calls import ToolCallDelta
from server.errors import OUT_OF_CAPACITY, ApiError, bad_input, context_window, unavailable
from server.metrics import RequestTimer
from server.structured import OutputSplitter, compile_grammar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationRequest:
    """What every route asks of the engine, normalized."""
    route: str                              # "workers" | "openai-chat" | "openai-completions": metrics and log
    openai: bool                            # which error wording the route speaks
    prompt: str | list[dict]                # text (chat template applied unless raw) or chat messages
    params: SamplingParams                  # defaults applied; the grammar is added here
    raw: bool = False
    tools: list[dict] | None = None         # [{name, description, parameters}]
    tool_choice: str | None = None          # "auto" | "none" | "required" | a tool's name; None without tools
    parallel_tool_calls: bool = True
    schema: dict | None = None              # JSON schema the answer must match
    reject_if_busy: bool = False
    what: str = "messages"                  # how context-window errors name the prompt

    @property
    def calls_tools(self) -> bool:
        return self.tools is not None and self.tool_choice != "none"


@dataclass
class Finished:
    """How a choice ended, with everything a whole (non-streamed) answer needs."""
    reason: str                             # "stop" | "length" | "cancelled"
    usage: Usage
    text: str                               # the whole output text (a JSON-mode answer is this)
    content: str                            # the text before any tool call
    tool_calls: list[dict] | None           # complete calls [{id, name, arguments, arguments_text}]; None: none
    calls_cut: bool                         # a call began but max_tokens ended it before it was complete
    logprobs: list[TokenLogprob] | None


@dataclass
class Delta:
    """What one engine step added to one choice."""
    index: int
    text: str = ""                                          # content (never tool-call JSON)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: Finished | None = None                        # set on the choice's last delta


def sampling_params(**fields) -> SamplingParams:
    """SamplingParams from a route's fields; None means "not sent": the default (SamplingParams') applies."""
    try:
        return SamplingParams(**{k: v for k, v in fields.items() if v is not None})
    except ValueError as e:
        raise bad_input(str(e), str(e).split(":")[0]) from None


class ClientGone(Exception):
    """The client disconnected before a whole answer was complete."""


async def start(state, req: GenerationRequest) -> Generation:
    """Admit, prepare and queue a request. Every error a client can cause is an ApiError raised here, before
    anything reaches the engine."""
    llm: AsyncLLM = state.ready_engine()
    waiting = llm.num_waiting
    if waiting >= state.settings.max_queue or (req.reject_if_busy and waiting > 0):
        raise ApiError(429, OUT_OF_CAPACITY, "Capacity temporarily exceeded, please try again.",
                       headers={"Retry-After": "1"})
    params = req.params
    if req.schema is not None or req.tools is not None:
        try:    # the first grammar builds llguidance's tokenizer (seconds): never on the event loop
            grammar = await asyncio.to_thread(compile_grammar, llm.engine, req.schema, req.tools,
                                              req.tool_choice or "auto", req.parallel_tool_calls)
        except GrammarError as e:
            raise bad_input(str(e), "response_format" if req.schema is not None else "tools") from None
        if grammar is not None:
            params = replace(params, grammar=grammar)
    try:
        stream = await llm.submit(req.prompt, params, raw=req.raw, tools=req.tools)
    except (PromptError, ImageError) as e:
        raise bad_input(str(e)) from None
    except EngineDeadError:
        raise unavailable("the engine has stopped after an internal error; restart the server") from None
    except ContextWindowError as e:
        raise context_window(e, req.openai, req.what) from None
    except (ValueError, TypeError) as e:
        raise bad_input(str(e)) from None
    return Generation(state, req, stream)


class Generation:
    """A request in the engine, followed to its end. `close()` (always called) aborts it if unfinished and
    records its metrics and log line, once."""

    def __init__(self, state, req: GenerationRequest, stream: RequestStream):
        self.state, self.req, self.stream = state, req, stream
        self.request_id = stream.request_id
        self.num_prompt_tokens = stream.num_prompt_tokens
        self.timer = RequestTimer(stream.request_id, req.route)
        self.splitter = OutputSplitter(req.calls_tools)
        self._last: RequestOutput | None = None
        self._closed = False

    async def deltas(self) -> AsyncIterator[Delta]:
        async for out in self.stream:
            self._last = out
            if out.delta_token_ids:
                self.timer.token()
            content, calls = self.splitter.update(out)
            finished = self._finished(out) if out.finished else None
            if content or calls or out.delta_logprobs or finished:
                yield Delta(0, content, calls, list(out.delta_logprobs), finished)

    def _finished(self, out: RequestOutput) -> Finished:
        calls, cut = None, False
        if self.splitter.has_calls or (self.splitter.tools and out.tool_calls_offset is not None):
            try:
                calls = self.splitter.calls()
            except ValueError:
                cut = True
        offset = out.tool_calls_offset if self.splitter.tools else None
        content = out.text if offset is None else out.text[:offset]
        return Finished(out.finish_reason, out.usage, out.text, content, calls or None, cut, out.logprobs)

    async def collect(self, request: Request) -> list[Finished]:
        """Run to the end, racing the client's disconnect (ClientGone)."""
        async def consume():
            done = []
            async for d in self.deltas():
                if d.finished is not None:
                    done.append(d.finished)
            return done

        task = asyncio.create_task(consume())
        gone = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not task.done():
            task.cancel()
            self.close()
            raise ClientGone()
        return task.result()

    @property
    def finished(self) -> bool:
        return self._last is not None and self._last.finished

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.stream.close()
        out, cancelled = self._last, not self.finished
        u = out.usage if out is not None else None
        self.timer.finish(self.state.metrics, self.num_prompt_tokens, u.completion_tokens if u else 0,
                          u.cached_tokens if u else 0, None if cancelled else out.finish_reason, cancelled)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
