"""A Generation as an HTTP response, whatever the protocol: the SSE loop with its in-band error tail, whole
answers (499 when the client left first), usage objects.

A Renderer (render_workers.py, render_openai.py) decides only what bytes a delta becomes; everything about
the request's life — errors after the stream started, aborting on disconnect, the metrics and log line —
happens here, once for every route.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Iterable, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.outputs import Usage
from server.admission import CLIENT_STALLED, ERROR
from server.errors import ABORTED, INTERNAL, ApiError
from server.pipeline import ClientGone, Delta, Finished, Generation

log = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Renderer(Protocol):
    def start(self) -> Iterable[str]:
        """Frames before the first delta."""

    def delta(self, d: Delta) -> Iterable[str]:
        """Frames for one step of one choice."""

    def end(self) -> Iterable[str]:
        """Frames after the last delta (raising ApiError when the answer cannot be delivered as asked)."""

    def error(self, err: ApiError) -> str:
        """The one frame that ends a stream with an error."""

    def whole(self, answers: list[Finished], usage: Usage) -> Response | dict:
        """The non-streamed response: every choice's answer, and the request's usage (a dict is sent as JSON)."""


async def respond(gen: Generation, request: Request, renderer: Renderer, stream: bool) -> Response:
    """Every response of a started request carries the id the server logs it under (`x-request-id`)."""
    ids = {"x-request-id": gen.request_id}
    if stream:
        return EventStream(gen, renderer, request.app.state.server.settings.limits.stall_timeout,
                           request.scope.get(CONNECTION) or Connection(None), headers=ids)
    try:
        response = renderer.whole(await gen.collect(request), gen.usage)
    except ClientGone:
        return JSONResponse({}, status_code=499, headers=ids)
    except ApiError:    # interrupted (timeout, shutdown, the engine died), or not deliverable as asked
        raise
    except Exception:
        gen.close(ERROR)
        raise
    finally:
        gen.close()
    if not isinstance(response, Response):
        response = JSONResponse(response)
    response.headers.update(ids)
    return response


class ClientStalled(Exception):
    """The client read nothing while the server waited to send it one event, for stall_timeout seconds."""


class EventStream(StreamingResponse):
    """The SSE response. A client that leaves the server unable to send (it reads nothing; its socket buffer and
    ours are full) for `stall_timeout` seconds is cut: its request is aborted, its blocks freed, its connection
    dropped, and the log says so. Meanwhile the engine's deltas wait in the request's bounded buffer
    (engine/async_llm.py)."""

    def __init__(self, gen: Generation, renderer: Renderer, stall_timeout: float, connection: Connection,
                 headers: dict[str, str]):
        super().__init__(_sse(gen, renderer), media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self.gen, self.stall_timeout, self.connection = gen, stall_timeout, connection

    async def stream_response(self, send) -> None:
        self.connection.limit_send_buffer(SSE_SEND_BUFFER)

        async def send_unless_stalled(message):
            try:
                async with asyncio.timeout(self.stall_timeout or None):
                    await send(message)
            except TimeoutError:
                raise ClientStalled() from None

        try:
            await super().stream_response(send_unless_stalled)
        except ClientStalled:
            log.warning("request %s: the client read nothing for %g s (--stall-timeout): aborted, connection cut",
                        self.gen.request_id, self.stall_timeout)
            self.gen.ticket.interrupt(ApiError(408, ABORTED, "Request was aborted: the client stopped reading"),
                                      CLIENT_STALLED)
            await self.body_iterator.aclose()
            self.connection.cut()
        finally:    # the SSE loop closes it once started; a client gone before the first byte never starts it
            self.gen.close()


async def _sse(gen: Generation, renderer: Renderer):
    ended_by = None
    try:
        for frame in renderer.start():
            yield frame
        async for d in gen.deltas():
            for frame in renderer.delta(d):
                yield frame
        for frame in renderer.end():
            yield frame
    except ApiError as err:             # cannot be completed as asked, or interrupted: say so in-band
        yield renderer.error(err)
    except Exception as e:      # noqa: BLE001 - the stream has started: say so in-band, never cut silently
        ended_by = ERROR
        log.exception("stream %s failed", gen.request_id)
        yield renderer.error(ApiError(500, INTERNAL, f"internal error while generating (request id "
                                                     f"{gen.request_id}): {e}"))
    finally:
        gen.close(ended_by)


# the ASGI scope key under which the app keeps the request's Connection (server/app.py)
CONNECTION = "mistral_small.connection"
# kernel send buffer of a streaming response's socket (Linux doubles it). Autotuned, it grows to megabytes
# that a client which stopped reading pins, and the stall is noticed only once they are full; tokens arrive
# at kilobytes per second, so this never slows a reader down.
SSE_SEND_BUFFER = 64 * 1024


class Connection:
    """The client's TCP connection under uvicorn (whose send is a method of the connection's request cycle,
    which holds the transport); does nothing under other servers."""

    def __init__(self, send):
        self.transport = getattr(getattr(send, "__self__", None), "transport", None)

    def cut(self) -> None:
        """Drop the connection at once, unsent data and all (close() would wait for a stalled client to read)."""
        if self.transport is not None:
            self.transport.abort()

    def limit_send_buffer(self, size: int) -> None:
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            except (OSError, ValueError):   # the client has gone already: the first send says so
                pass


def usage_dict(u: Usage, details: bool = False) -> dict:
    """Workers AI's usage object; OpenAI's adds prompt_tokens_details."""
    d = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
    if details:
        d["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    return d
