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
import uuid
from dataclasses import dataclass, field, replace
from typing import AsyncIterator

from fastapi import Request

from engine.async_llm import AsyncLLM, EngineDeadError, RequestFailed, RequestStream
from engine.guided import GrammarError
from engine.image_processor import ImageError
from engine.llm_engine import ContextWindowError
from engine.outputs import RequestOutput, TokenLogprob, Usage
from engine.sampling_params import SamplingParams
from engine.tokenizer import PromptError
from engine.tool_calls import ToolCallDelta
from server.admission import CLIENT_DISCONNECTED, ERROR, Ticket
from server.errors import INTERNAL, ApiError, bad_input, context_window, unavailable
from server.input_limits import check_prompts
from server.limits import Limits
from server.metrics import RequestTimer
from server.structured import OutputSplitter, compile_grammar

log = logging.getLogger(__name__)
# A request's id, as the server logs it, the OpenAI `id` and the `x-request-id` header on every route say it: a
# client (mistral-small bench) matches its own timings to the server's log line with it.
_ID_PREFIX = {"openai-chat": "chatcmpl-", "openai-completions": "cmpl-"}


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
    anything reaches the engine. The request holds its admission ticket from here until Generation.close()."""
    llm: AsyncLLM = state.ready_engine()
    ticket = state.admission.admit(state.settings.limits, llm.engine.config.max_num_seqs, llm.num_waiting,
                                   req.reject_if_busy, len(req.prompts) * req.n)
    try:
        streams = await _prepare(llm, ticket, state.settings.limits, req)
    except BaseException:
        ticket.release()
        raise
    return Generation(state, req, streams, ticket)


async def _prepare(llm: AsyncLLM, ticket: Ticket, limits: Limits, req: GenerationRequest) -> list[RequestStream]:
    await check_prompts(list(req.prompts), req.tools, limits, ticket.run)
    params = _with_prompt_logprobs(req)
    if req.schema is not None or req.tools is not None:
        try:    # the first grammar builds llguidance's tokenizer (seconds): never on the event loop
            grammar = await ticket.run(asyncio.to_thread(compile_grammar, llm.engine, req.schema, req.tools,
                                                         req.tool_choice or "auto", req.parallel_tool_calls))
        except GrammarError as e:
            raise bad_input(str(e), "response_format" if req.schema is not None else "tools") from None
        if grammar is not None:
            params = replace(params, grammar=grammar)
    request_id = _ID_PREFIX.get(req.route, "run-") + uuid.uuid4().hex
    streams: list[RequestStream] = []
    try:
        for p, prompt in enumerate(req.prompts):
            streams += await ticket.run(_submit(llm, req, prompt, params, request_id if p == 0 else
                                                f"{request_id}-p{p}"))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


def with_bos(prompt: str) -> str:
    """A raw text prompt with the tokenizer's BOS first, unless it is there (vLLM's completions)."""
    return prompt if prompt.startswith("<s>") else "<s>" + prompt


def _with_prompt_logprobs(req: GenerationRequest) -> SamplingParams:
    """The prompt logprobs the engine computes: those shown (prompt_logprobs) and those an echo with logprobs
    puts in front of the completion's."""
    wanted = [k for k in (req.prompt_logprobs, req.params.logprobs if req.echo else None) if k is not None]
    return replace(req.params, prompt_logprobs=max(wanted)) if wanted else req.params


async def _submit(llm: AsyncLLM, req: GenerationRequest, prompt, params: SamplingParams,
                  request_id: str) -> list[RequestStream]:
    """One prompt's n choices, queued together (they share its prefill)."""
    try:
        if req.add_bos and isinstance(prompt, str):
            prompt = with_bos(prompt)
        return await llm.submit_choices(prompt, params, req.n, request_id=request_id, raw=req.raw,
                                        tools=req.tools)
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
    called) aborts whatever is unfinished, gives the admission ticket back and records the metrics and log line,
    once."""

    def __init__(self, state, req: GenerationRequest, streams: list[RequestStream], ticket: Ticket):
        self.state, self.req, self.streams, self.ticket = state, req, streams, ticket
        self.request_id = streams[0].request_id
        self.timer = RequestTimer(self.request_id, req.route)
        self.splitters = [OutputSplitter(req.calls_tools) for _ in streams]
        self._last: list[RequestOutput | None] = [None] * len(streams)
        self._prompt_lps: list = [None] * len(req.prompts)     # computed by each prompt's first choice
        self._closed = False
        # a timeout, shutdown, a stalled client: abort every choice, and end its stream with the error
        ticket.attach(lambda err: [s.fail(err) for s in streams])

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every choice's deltas, interleaved as the engine produces them."""
        try:
            async for k, out in _merged(self.streams):
                first = self._last[k] is None
                self._last[k] = out
                if out.prompt_logprobs is not None:
                    self._prompt_lps[k // self.req.n] = out.prompt_logprobs
                if out.delta_token_ids:
                    self.timer.token()
                content, calls, done = self.splitters[k].update(out)
                d = Delta(k, content, calls, done, list(out.delta_logprobs))
                if first:
                    self._start(d, out)
                if out.finished:
                    d.finished = self._finished(k, out)
                    d.usage = self.usage if self.finished else None
                if d.text or d.tool_calls or d.logprobs or d.prompt_logprobs or d.finished:
                    yield d
        except (EngineDeadError, RequestFailed) as e:
            # this request's own failure is said; the engine's death is the server log's (never its exception)
            why = str(e) if isinstance(e, RequestFailed) else "the engine stopped after an internal error"
            self.ticket.interrupt(ApiError(500, INTERNAL, f"internal error while generating (request id "
                                                          f"{self.request_id}): {why}"), ERROR)
            raise self.ticket.error from None

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
            self.close(CLIENT_DISCONNECTED)
            raise ClientGone()
        return task.result()

    @property
    def finished(self) -> bool:
        return all(o is not None and o.finished for o in self._last)

    def close(self, ended_by: str | None = None) -> None:
        """`ended_by`: why the response ends before the request's end, when the caller knows (a ticket's
        interruption says it first); an unfinished request with no reason was left by its client."""
        if self._closed:
            return
        self._closed = True
        for s in self.streams:
            s.close()
        self.ticket.release()
        ended_by = None if self.finished else self.ticket.reason or ended_by or CLIENT_DISCONNECTED
        # what the engine generated, read by the client or not: each prompt counted once, completions summed
        usages = [s.usage for s in self.streams if s.usage is not None]
        leaders = [s.usage for s in self.streams[::self.req.n] if s.usage is not None]
        ends = [s.finish_reason for s in self.streams]      # the request's: "length" when any choice was cut
        reason = None if None in ends else "length" if "length" in ends else ends[0]
        self.timer.finish(self.state.metrics, sum(s.num_prompt_tokens for s in self.streams[::self.req.n]),
                          sum(u.completion_tokens for u in usages), sum(u.cached_tokens for u in leaders), reason,
                          ended_by, max((u.completion_tokens for u in usages), default=0))


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from several engine streams as they arrive. A stream is read again only after
    its last output was consumed: each stream updates one output object in place, and while the reader lags,
    each stream's own bounded buffer merges what waits."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    reads = {asyncio.ensure_future(anext(s)): k for k, s in enumerate(streams)}
    try:
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=reads.get):
                k = reads.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield k, out
                reads[asyncio.ensure_future(anext(streams[k]))] = k
    finally:
        for task in reads:
            task.cancel()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
