"""A Generation as an HTTP response, whatever the protocol: the SSE loop with its in-band error tail, whole
answers (499 when the client left first), usage objects.

A Renderer (render_workers.py, render_openai.py) decides only what bytes a delta becomes; everything about
the request's life — errors after the stream started, aborting on disconnect, the metrics and log line —
happens here, once for every route.
"""

from __future__ import annotations

import logging
from typing import Iterable, Protocol

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.outputs import Usage
from server.errors import INTERNAL, ApiError
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

    def whole(self, answers: list[Finished]) -> Response:
        """The non-streamed response."""


async def respond(gen: Generation, request: Request, renderer: Renderer, stream: bool) -> Response:
    if stream:
        return StreamingResponse(_sse(gen, renderer), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        answers = await gen.collect(request)
    except ClientGone:
        return JSONResponse({}, status_code=499)
    try:
        return renderer.whole(answers)
    finally:
        gen.close()


async def _sse(gen: Generation, renderer: Renderer):
    try:
        for frame in renderer.start():
            yield frame
        async for d in gen.deltas():
            for frame in renderer.delta(d):
                yield frame
        for frame in renderer.end():
            yield frame
    except ApiError as err:             # the answer cannot be completed as asked: say so in-band
        yield renderer.error(err)
    except Exception as e:      # noqa: BLE001 - the stream has started: say so in-band, never cut silently
        log.exception("stream %s failed", gen.request_id)
        yield renderer.error(ApiError(500, INTERNAL, f"internal error while generating (request id "
                                                     f"{gen.request_id}): {e}"))
    finally:
        gen.close()


def usage_dict(u: Usage, details: bool = False) -> dict:
    """Workers AI's usage object; OpenAI's adds prompt_tokens_details."""
    d = {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}
    if details:
        d["prompt_tokens_details"] = {"cached_tokens": u.cached_tokens}
    return d
