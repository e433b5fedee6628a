"""The FastAPI app: the Workers AI route, the OpenAI-compatible API, health, metrics, the OpenAPI spec.

One engine per process (an AsyncLLM). Errors are rendered in the shape of the route they happen on:
OpenAI's error object under /v1 and /client/v4/accounts/*/ai/v1, the Cloudflare v4 envelope elsewhere.
"""

from __future__ import annotations

import dataclasses
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_llm import AsyncLLM
from server import openai_api, openapi, workers
from server.config import API_KEY_ENV, ServerSettings
from server.errors import BAD_METHOD, INTERNAL, NO_ROUTE, ApiError, bad_input, is_openai_path, render
from server.metrics import Metrics
from server.security import Gate
from server.state import ServerState
from server.version import version_info

DESCRIPTION = ("Mistral Small 3.1 24B Instruct (2503) served locally with the hosted Workers AI contract "
               "(`@cf/mistralai/mistral-small-3.1-24b-instruct`) and an OpenAI-compatible API.")


def create_app(engine: AsyncLLM | None, settings: ServerSettings | None = None) -> FastAPI:
    """`engine` may be None while the model loads (health answers 503); set `app.state.server.engine` later."""
    settings = settings or ServerSettings()
    if settings.api_key is None and os.environ.get(API_KEY_ENV):
        settings = dataclasses.replace(settings, api_key=os.environ[API_KEY_ENV])
    state = ServerState(settings, engine)
    state.metrics = Metrics(lambda: state.engine, settings.model_names[0])
    running = version_info()        # probed here, once, not on the event loop
    app = FastAPI(title="Mistral Small 3.1 local engine", description=DESCRIPTION,
                  version=running["version"] or "0+unknown",
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.server = state
    app.include_router(workers.router)
    app.include_router(openai_api.router)
    openapi.install(app)
    app.add_middleware(Gate, get_settings=lambda: state.settings)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return render(err, is_openai_path(request.url.path))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        path, method = request.url.path, request.method
        if err.status_code == 405:
            e = ApiError(405, BAD_METHOD, f"{method} not supported for requested URI.", headers=err.headers)
        elif err.status_code == 404:
            e = ApiError(404, NO_ROUTE, "No route for that URI")
        else:
            e = ApiError(err.status_code, INTERNAL, str(err.detail), headers=err.headers)
        return render(e, is_openai_path(path))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        return render(bad_input(str(err)), is_openai_path(request.url.path))

    @app.get("/health", summary="Ready (200), loading or stopped (503)",
             responses={503: {"description": "Loading, or the engine stopped"}})
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if state.engine.is_dead:
            return JSONResponse({"status": "dead", "error": repr(state.engine.error)}, status_code=503)
        return {"status": "ok", "model": state.settings.model_names[0], "demo": state.settings.demo}

    @app.get("/version", summary="Package version, git commit, torch, CUDA (as `mistral-small --version`)")
    async def version():
        return running

    @app.get("/metrics", summary="Prometheus metrics (vLLM's names)",
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
