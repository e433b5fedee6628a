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
    prompts: tuple                          # each a text (chat template applied unless raw), chat messages or
                                            # token ids (used verbatim)
    params: SamplingParams                  # defaults applied; the grammar is added here
    raw: bool = False
    add_bos: bool = False                   # raw text prompts get `<s>` first unless they start with it
    n: int = 1                              # choices per prompt: choice j of prompt p has index p * n + j
    echo: bool = False                      # each choice starts with its prompt (text, and logprobs if asked)
    prompt_logprobs: int | None = None      # vLLM's prompt_logprobs, shown as asked
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
    usage: Usage                            # this choice's
    text: str                               # the whole output text (a JSON-mode answer is this)
    content: str                            # the text before any tool call
    tool_calls: list[dict] | None           # complete calls [{id, name, arguments, arguments_text}]; None: none
    calls_cut: bool                         # the calls were cut off by max_tokens (complete ones are kept)
    logprobs: list[TokenLogprob] | None     # with echo, the prompt's first (the very first one's logprob None)
    prompt_logprobs: list[TokenLogprob | None] | None = None    # vLLM's prompt_logprobs (first None)
    echo: str = ""                          # the prompt text that `text` starts with when echo was asked


@dataclass
class Delta:
    """What one engine step added to one choice."""
    index: int
    text: str = ""                                          # content (never tool-call JSON)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    calls_done: list[dict] = field(default_factory=list)    # calls whose arguments completed in this step
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None    # on a choice's first delta, when asked
    finished: Finished | None = None                        # set on the choice's last delta
    usage: Usage | None = None                              # the request's total, on its very last delta


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
    params = _with_prompt_logprobs(req)
    if req.schema is not None or req.tools is not None:
        try:    # the first grammar builds llguidance's tokenizer (seconds): never on the event loop
            grammar = await asyncio.to_thread(compile_grammar, llm.engine, req.schema, req.tools,
                                              req.tool_choice or "auto", req.parallel_tool_calls)
        except GrammarError as e:
            raise bad_input(str(e), "response_format" if req.schema is not None else "tools") from None
        if grammar is not None:
            params = replace(params, grammar=grammar)
    streams: list[RequestStream] = []
    try:
        for prompt in req.prompts:
            streams += await _submit(llm, req, prompt, params)
    except BaseException:
        for s in streams:
            s.close()
        raise
    return Generation(state, req, streams)


def with_bos(prompt: str) -> str:
    """A raw text prompt with the tokenizer's BOS first, unless it is there (vLLM's completions)."""
    return prompt if prompt.startswith("<s>") else "<s>" + prompt


def _with_prompt_logprobs(req: GenerationRequest) -> SamplingParams:
    """The prompt logprobs the engine computes: those shown (prompt_logprobs) and those an echo with logprobs
    puts in front of the completion's."""
    wanted = [k for k in (req.prompt_logprobs, req.params.logprobs if req.echo else None) if k is not None]
    return replace(req.params, prompt_logprobs=max(wanted)) if wanted else req.params


async def _submit(llm: AsyncLLM, req: GenerationRequest, prompt, params: SamplingParams) -> list[RequestStream]:
    """One prompt's n choices, queued together (they share its prefill)."""
    try:
        if req.add_bos and isinstance(prompt, str):
            prompt = with_bos(prompt)
        return await llm.submit_choices(prompt, params, req.n, raw=req.raw, tools=req.tools)
    except (PromptError, ImageError) as e:
        raise bad_input(str(e)) from None
    except EngineDeadError:
        raise unavailable("the engine has stopped after an internal error; restart the server") from None
    except ContextWindowError as e:
        raise context_window(e, req.openai, req.what) from None
    except (ValueError, TypeError) as e:
        field = str(e).split(":")[0]      # the engine names the field it refuses ("logit_bias: ...")
        raise bad_input(str(e), field if field in (*SamplingParams.__dataclass_fields__, "prompt") else None) \
            from None


class Generation:
    """A request in the engine — one engine sequence per choice — followed to its end. `close()` (always
    called) aborts whatever is unfinished and records the metrics and log line, once."""

    def __init__(self, state, req: GenerationRequest, streams: list[RequestStream]):
        self.state, self.req, self.streams = state, req, streams
        self.request_id = streams[0].request_id
        self.timer = RequestTimer(self.request_id, req.route)
        self.splitters = [OutputSplitter(req.calls_tools) for _ in streams]
        self._last: list[RequestOutput | None] = [None] * len(streams)
        self._prompt_lps: list = [None] * len(req.prompts)     # computed by each prompt's first choice
        self._closed = False

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas, interleaved as the engine produces them."""
        async for k, out in _merged(self.streams):
            first = self._last[k] is None
            self._last[k] = out
            if out.prompt_logprobs is not None:
                self._prompt_lps[k // self.req.n] = out.prompt_logprobs
            if out.delta_token_ids:
                self.timer.token()
            content, calls, done = self.splitters[k].update(out)
            logprobs = list(out.delta_logprobs)
            d = Delta(k, content, calls, done, logprobs)
            if first:
                self._start(d, out)
            if out.finished:
                d.finished = self._finished(k, out)
                d.usage = self.usage if self.finished else None
            if d.text or d.tool_calls or d.logprobs or d.prompt_logprobs or d.finished:
                yield d

    def _start(self, d: Delta, out: RequestOutput) -> None:
        """A choice's first delta: its echo and prompt logprobs."""
        d.prompt_logprobs = self._prompt_logprobs(d.index)
        if self.req.echo:
            d.text = self._echo_text(d.index, out) + d.text
            if self.req.params.logprobs is not None:
                d.logprobs = self._echo_logprobs(d.index, out) + d.logprobs

    def _echo_text(self, k: int, out: RequestOutput) -> str:
        """A text prompt as the client wrote it (without the BOS added to it); token ids detokenized, control
        tokens included."""
        prompt = self.req.prompts[k // self.req.n]
        if isinstance(prompt, str):
            return prompt
        return self.state.engine.engine.tokenizer.decode(out.prompt_token_ids, skip_special=False)

    def _finished(self, k: int, out: RequestOutput) -> Finished:
        calls, cut = None, False
        offset = out.tool_calls_offset if self.req.calls_tools else None
        if offset is not None:
            calls, cut = self.splitters[k].calls()
        content = out.text if offset is None else out.text[:offset]
        logprobs, echo = out.logprobs, ""
        if self.req.echo:
            echo = self._echo_text(k, out)
            if logprobs is not None:
                logprobs = self._echo_logprobs(k, out) + logprobs
        return Finished(out.finish_reason, out.usage, echo + out.text, content, calls or None, cut, logprobs,
                        self._prompt_logprobs(k), echo)

    def _prompt_logprobs(self, k: int) -> list[TokenLogprob | None] | None:
        """Choice k's prompt logprobs as asked (prompt_logprobs alternatives each)."""
        n = self.req.prompt_logprobs
        if n is None:
            return None
        return [None] + [replace(lp, top=lp.top[:n]) for lp in self._prompt_lps[k // self.req.n][1:]]

    def _echo_logprobs(self, k: int, out: RequestOutput) -> list[TokenLogprob]:
        """The prompt's tokens as completion logprobs (`logprobs` alternatives each); the first has none."""
        n = self.req.params.logprobs
        head = TokenLogprob(out.prompt_token_ids[0], None, None)
        return [head] + [replace(lp, top=lp.top[:n], rank=None) for lp in self._prompt_lps[k // self.req.n][1:]]

    @property
    def usage(self) -> Usage:
        """The request's usage: each prompt counted once (its first choice's), the completions summed."""
        outs = [o for o in self._last if o is not None]
        leaders = [o for k, o in enumerate(self._last) if o is not None and k % self.req.n == 0]
        return Usage(sum(o.usage.prompt_tokens for o in leaders), sum(o.usage.completion_tokens for o in outs),
                     sum(o.usage.cached_tokens for o in leaders))

    async def collect(self, request: Request) -> list[Finished]:
        """Run to the end, racing the client's disconnect (ClientGone); the answers in choice order."""
        async def consume():
            done = [None] * len(self.streams)
            async for d in self.deltas():
                if d.finished is not None:
                    done[d.index] = d.finished
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
        return all(o is not None and o.finished for o in self._last)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for s in self.streams:
            s.close()
        cancelled = not self.finished
        u = self.usage
        reasons = {o.finish_reason for o in self._last if o is not None and o.finished}
        reason = None if cancelled else "length" if "length" in reasons else reasons.pop()
        prompt_tokens = u.prompt_tokens or sum(s.num_prompt_tokens for s in self.streams[::self.req.n])
        self.timer.finish(self.state.metrics, prompt_tokens, u.completion_tokens, u.cached_tokens, reason,
                          cancelled)


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from several engine streams as they arrive; one stream needs no tasks."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((k, out))
        except BaseException as e:      # noqa: BLE001 - the consumer raises it
            queue.put_nowait((k, e))
        else:
            queue.put_nowait((k, None))

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield k, item
    finally:
        for t in tasks:
            t.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
