"""The FastAPI app: the Workers AI route, the OpenAI-compatible API, health, metrics.

One engine per process (an AsyncLLM). Errors are rendered in the shape of the route they happen on:
OpenAI's error object under /v1 and /client/v4/accounts/*/ai/v1, the Cloudflare v4 envelope elsewhere.
"""

from __future__ import annotations

import hmac
import logging
import os
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import AsyncLLM
from server import openai_api, workers
from server.errors import AUTH, BAD_METHOD, INTERNAL, NO_ROUTE, ApiError, bad_input, render
from server.generation import ServerSettings, ServerState
from server.metrics import Metrics
from server.version import version_info

log = logging.getLogger(__name__)
OPEN_PATHS = ("/health", "/metrics", "/version", "/static/", "/playground")
API_KEY_ENV = "MISTRAL_SMALL_API_KEY"


def _is_openai(path: str) -> bool:
    return path.startswith("/v1/") or path == "/v1" or ("/ai/v1/" in path and path.startswith("/client/v4/"))


def create_app(engine: AsyncLLM | None, settings: ServerSettings | None = None) -> FastAPI:
    """`engine` may be None while the model loads (health answers 503); set `app.state.server.engine` later."""
    settings = settings or ServerSettings()
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings.api_key = os.environ[API_KEY_ENV]
    state = ServerState(settings, engine)
    state.metrics = Metrics(lambda: state.engine, settings.model_names[0])
    app = FastAPI(title="Mistral Small 3.1 local engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(workers.router)
    app.include_router(openai_api.router)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        key = settings.api_key
        path = request.url.path
        if key and not path.startswith(OPEN_PATHS):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-auth-key", "")
            if not hmac.compare_digest(token.encode(), key.encode()):
                return render(ApiError(401, AUTH, "Authentication error", openai_code="invalid_api_key"),
                              _is_openai(path))
        try:
            return await call_next(request)
        except Exception as err:    # noqa: BLE001 - answered here: Starlette's ServerErrorMiddleware would
            return _internal(request, err)  # re-raise it and uvicorn would then drop the keep-alive connection

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return render(err, _is_openai(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        path, method = request.url.path, request.method
        if err.status_code == 405:
            e = ApiError(405, BAD_METHOD, f"{method} not supported for requested URI.")
        elif err.status_code == 404:
            e = ApiError(404, NO_ROUTE, "No route for that URI")
        else:
            e = ApiError(err.status_code, INTERNAL, str(err.detail))
        return render(e, _is_openai(path))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return render(bad_input(str(err)), _is_openai(request.url.path))

    def _internal(request: Request, err: Exception):
        rid = uuid.uuid4().hex[:12]
        log.error("internal error, request id %s", rid, exc_info=err)
        return render(ApiError(500, INTERNAL, f"Internal server error (request id {rid}); see the server log"),
                      _is_openai(request.url.path))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return _internal(request, err)

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.engine.is_dead:
            return JSONResponse({"status": "dead", "error": repr(state.engine.error)}, status_code=503)
        return {"status": "ok", "model": settings.model_names[0], "demo": settings.demo}

    running = version_info()        # probed here, once, not on the event loop

    @app.get("/version")
    async def version():
        return running

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
