"""What both public routes share: admitting a request to the engine, following it to the end, disconnects.

A request is admitted only if the engine is up and the waiting queue has room; every error a client can cause
becomes an ApiError before anything reaches the engine. A client that goes away aborts its request.
"""

from __future__ import annotations

import asyncio
import secrets
import string
from dataclasses import dataclass, field

from fastapi import Request

from engine.async_llm import AsyncLLM, EngineDeadError, RequestStream
from engine.image_processor import ImageError
from engine.llm_engine import ContextWindowError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import PromptError
from server.errors import OUT_OF_CAPACITY, ApiError, bad_input
from server.metrics import Metrics, RequestTimer

CLOUDFLARE_MODEL = "@cf/mistralai/mistral-small-3.1-24b-instruct"


@dataclass
class ServerSettings:
    model_names: tuple[str, ...] = (CLOUDFLARE_MODEL, "mistralai/Mistral-Small-3.1-24B-Instruct-2503")
    api_key: str | None = None
    max_queue: int = 512            # waiting requests beyond this get 429 / 3040
    stream_padding: bool = True     # the random "p" field of Workers AI stream events
    demo: bool = False              # serving random weights: said in /v1/models and the log
    model_path: str = ""


@dataclass
class ServerState:
    settings: ServerSettings
    engine: AsyncLLM | None = None
    metrics: Metrics | None = field(default=None)

    def ready_engine(self) -> AsyncLLM:
        if self.engine is None:
            raise ApiError(503, 3040, "the model is still loading", openai_type="server_error")
        if self.engine.is_dead:
            raise ApiError(503, 3040, "the engine has stopped after an internal error; restart the server",
                           openai_type="server_error")
        return self.engine


class ClientGone(Exception):
    """The client disconnected before a non-streaming answer was complete."""


async def admit(state: ServerState, prompt, params: SamplingParams, *, raw: bool = False,
                tools: list[dict] | None = None, route: str, reject_if_busy: bool = False
                ) -> tuple[RequestStream, RequestTimer]:
    """Queue a request; ContextWindowError passes through for the route to word it its own way."""
    llm = state.ready_engine()
    waiting = llm.num_waiting
    if waiting >= state.settings.max_queue or (reject_if_busy and waiting > 0):
        raise ApiError(429, OUT_OF_CAPACITY, "Capacity temporarily exceeded, please try again.",
                       headers={"Retry-After": "1"})
    timer = RequestTimer("", route)
    try:
        stream = await llm.submit(prompt, params, raw=raw, tools=tools)
    except (PromptError, ImageError) as e:
        raise bad_input(str(e)) from None
    except EngineDeadError:
        raise ApiError(503, 3040, "the engine has stopped after an internal error; restart the server",
                       openai_type="server_error") from None
    except ContextWindowError:
        raise
    except (ValueError, TypeError) as e:
        raise bad_input(str(e)) from None
    timer.request_id = stream.request_id
    return stream, timer


def finish(state: ServerState, stream: RequestStream, timer: RequestTimer, out: RequestOutput | None,
           cancelled: bool) -> None:
    u = out.usage if out is not None else None
    timer.finish(state.metrics, stream.num_prompt_tokens, u.completion_tokens if u else 0,
                 u.cached_tokens if u else 0, None if cancelled or out is None else out.finish_reason, cancelled)


async def follow(stream: RequestStream, timer: RequestTimer):
    """The request's outputs as they come; marks the first token for TTFT."""
    async for out in stream:
        if out.delta_token_ids:
            timer.token()
        yield out


async def collect(state: ServerState, stream: RequestStream, timer: RequestTimer,
                  request: Request) -> RequestOutput:
    """Run a non-streaming request to the end, racing it against the client's disconnect."""
    async def consume():
        last = None
        async for last in follow(stream, timer):
            pass
        return last

    task = asyncio.create_task(consume())
    gone = asyncio.create_task(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        stream.close()
        finish(state, stream, timer, None, cancelled=True)
        raise ClientGone()
    out = task.result()
    finish(state, stream, timer, out, cancelled=False)
    return out


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


_PAD = string.ascii_letters + string.digits


def padding() -> str:
    """Random-length filler like the hosted service's `p` field, against token-length side channels."""
    return "".join(secrets.choice(_PAD) for _ in range(secrets.randbelow(48) + 4))
