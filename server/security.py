"""The gate every HTTP request passes first (a pure ASGI middleware, so streams are never buffered):

- Host: only names this server answers to, against DNS rebinding (a page on evil.example that re-resolves to
  127.0.0.1 still sends `Host: evil.example`): loopback names by default; any host when --host binds every
  interface; --allowed-hosts says otherwise.
- Origin (browsers): pages on loopback origins (any port) and the server's own origin may call it, and those
  in --allowed-origins ('*' = any). Others get 403 before anything runs; allowed ones get CORS headers, and
  their preflights (OPTIONS) pass without the API key, as browsers send none.
- The API key (--api-key): every route but a few open ones needs it.
- Exceptions nobody handled become a 500 in the route's error shape with a request id for the log, answered
  here rather than by Starlette's outer handler, which would re-raise and make uvicorn drop a keep-alive
  connection.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders

from server.config import LOOPBACK_HOSTS, ServerSettings
from server.errors import AUTH, FORBIDDEN, INTERNAL, ApiError, is_openai_path, render

log = logging.getLogger("server.app")
OPEN_PATHS = frozenset({"/health", "/metrics", "/version", "/openapi.json", "/docs"})
OPEN_PREFIXES = ("/docs/assets/",)
WILDCARD_BINDS = ("0.0.0.0", "::", "")
_EXPOSED = "retry-after, x-request-id"


def _hostname(netloc: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    return (urlsplit(f"//{netloc}").hostname or "").lower()


def host_allowed(host: str | None, s: ServerSettings) -> bool:
    if host is None:                # HTTP/1.0 without Host: not a browser
        return True
    allowed = s.allowed_hosts
    if allowed is None:
        if s.host in WILDCARD_BINDS:
            return True
        allowed = (*LOOPBACK_HOSTS, s.host)
    return "*" in allowed or _hostname(host) in {a.strip("[]").lower() for a in allowed}


def origin_allowed(origin: str, host: str | None, s: ServerSettings) -> bool:
    origin = origin.rstrip("/").lower()
    if "*" in s.allowed_origins or origin in {o.rstrip("/").lower() for o in s.allowed_origins}:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https"):
        return False                # "null" (file://, sandboxed frames) and the like
    return parts.hostname in LOOPBACK_HOSTS or (host is not None and parts.netloc == host.lower())


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def authorized(headers: Headers, key: str) -> bool:
    given = headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else headers.get("x-auth-key", "")
    return hmac.compare_digest(token.encode(), key.encode())


class Gate:
    def __init__(self, app, get_settings):
        self.app, self.get_settings = app, get_settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        s: ServerSettings = self.get_settings()
        path, headers = scope["path"], Headers(scope=scope)
        openai = is_openai_path(path)
        host, origin = headers.get("host"), headers.get("origin")
        if not host_allowed(host, s):
            return await _reply(ApiError(403, FORBIDDEN, f"Host {host!r} is not allowed (see --allowed-hosts)",
                                         openai_type="permission_error"), openai, scope, receive, send)
        if origin is not None and not origin_allowed(origin, host, s):
            return await _reply(ApiError(403, FORBIDDEN, f"Origin {origin!r} is not allowed (see --allowed-origins)",
                                         openai_type="permission_error"), openai, scope, receive, send)
        cors = {} if origin is None else {"access-control-allow-origin": origin, "vary": "Origin",
                                          "access-control-expose-headers": _EXPOSED}
        if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            return await _preflight(cors, headers, send)
        if s.api_key and not is_open(path) and not authorized(headers, s.api_key):
            return await _reply(ApiError(401, AUTH, "Authentication error", openai_code="invalid_api_key"),
                                openai, scope, receive, send, cors)
        started = False

        async def send_with_cors(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if cors:
                    MutableHeaders(scope=message).update(cors)
            await send(message)

        try:
            await self.app(scope, receive, send_with_cors)
        except Exception as err:    # noqa: BLE001 - the last word: a 500 the client can parse
            rid = uuid.uuid4().hex[:12]
            log.error("internal error, request id %s", rid, exc_info=err)
            if started:             # the response is under way: nothing more can be said in HTTP
                return
            await _reply(ApiError(500, INTERNAL, f"Internal server error (request id {rid}); see the server log"),
                         openai, scope, receive, send, cors)


async def _reply(err: ApiError, openai: bool, scope, receive, send, extra: dict | None = None) -> None:
    response = render(err, openai)
    response.headers.update(extra or {})
    await response(scope, receive, send)


async def _preflight(cors: dict, headers: Headers, send) -> None:
    allow = {"access-control-allow-methods": "GET, POST, OPTIONS", "access-control-max-age": "600",
             "access-control-allow-headers": headers.get("access-control-request-headers", "")}
    await send({"type": "http.response.start", "status": 204,
                "headers": [(k.encode(), v.encode()) for k, v in {**cors, **allow}.items()]})
    await send({"type": "http.response.body", "body": b""})
