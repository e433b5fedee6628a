"""The request body's size, bounded as it streams in (a pure ASGI middleware: nothing is buffered here).

A declared Content-Length over the limit is refused before a byte of the body is read. Otherwise the bytes
are counted as the route reads them — chunked bodies (wrangler sends `transfer-encoding: chunked`) included —
and the read that passes the limit raises 413 (Cloudflare's 3006, or OpenAI's shape under /v1). uvicorn stops
reading the socket while 64 KiB it has read wait unconsumed, so the server reads at most the limit plus that.

A response sent before its request's body was read to the end closes the connection: keeping it alive
would make the server read, and throw away, whatever the client still sends.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders

from server.errors import is_openai_path, render, too_large


class BodyLimit:
    def __init__(self, app, get_limit):
        self.app, self.get_limit = app, get_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit: int = self.get_limit()
        headers = Headers(scope=scope)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            response = render(_error(limit), is_openai_path(scope["path"]))
            return await response(scope, receive, send)
        has_body = (length.isdigit() and int(length) > 0) or "chunked" in headers.get("transfer-encoding", "")
        received, complete = 0, not has_body

        async def counting_receive():
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    raise _error(limit)
            return message

        async def closing_send(message):
            if message["type"] == "http.response.start" and not complete:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        await self.app(scope, counting_receive, closing_send)


def _error(limit: int):
    return too_large(f"the body exceeds {limit} bytes (--max-body-bytes)", close=True)
