"""The OpenAPI spec (/openapi.json) and its offline doc page (/docs).

Routes read their bodies themselves (JSON whatever the content-type, errors worded per route), so each one
declares its request model here for the spec; responses are declared per status in both error envelopes.
The doc page's Swagger UI assets come from the fastapi-offline package: nothing is fetched from a CDN.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, get_type_hints

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, create_model

from server.limits import DECODER, Limits
from server.protocol import BodySchema

DOCS_ASSETS = "/docs/assets"
_ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
_BODY_MODELS: dict[str, type[BaseModel]] = {}


# ---- response shapes ------------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class WorkersToolCall(BaseModel):
    name: str
    arguments: dict[str, Any]


class WorkersResult(BaseModel):
    response: Any = Field(description="The answer's text; in JSON mode the JSON value itself")
    tool_calls: list[WorkersToolCall]
    usage: Usage


class WorkersEnvelope(BaseModel):
    result: WorkersResult
    success: Literal[True]
    errors: list[Any]
    messages: list[Any]


class CloudflareErrorItem(BaseModel):
    code: int
    message: str


class CloudflareError(BaseModel):
    errors: list[CloudflareErrorItem]
    success: Literal[False]
    result: dict[str, Any] | None
    messages: list[Any]


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | int | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class OpenAIUsage(Usage):
    prompt_tokens_details: PromptTokensDetails


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class ModelCapabilities(BaseModel):
    completion_chat: bool
    function_calling: bool
    vision: bool


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = Field(description="vLLM: the context window")
    type: Literal["base"] = Field(description="Mistral's model card")
    capabilities: ModelCapabilities
    max_context_length: int | None = Field(description="Mistral's name for the context window")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


# GET /limits: the fields of server.limits.Limits, described by their flags' help, and the decoder's bounds
LimitsModel = create_model("Limits", **{
    f.name: (get_type_hints(Limits)[f.name], Field(description=f.metadata["help"])) for f in fields(Limits)},
    **{name: (kind, Field(description=what)) for name, (kind, _, what) in DECODER.items()})


_SSE = {"text/event-stream": {"schema": {"description": "Server-sent events ('stream': true): `data: {json}` frames"}}}


def _errors(model: type[BaseModel], statuses: dict[int, str]) -> dict:
    return {status: {"model": model, "description": what} for status, what in statuses.items()}


_COMMON = {400: "Bad input (the field is named), JSON nested too deeply, too many images or pixels",
           401: "Missing or wrong API key", 403: "Origin or Host not allowed",
           408: "Request timeout (--request-timeout); when streaming, an error event instead",
           413: "Body over --max-body-bytes, or prompt over --max-prompt-chars",
           429: "Engine slots and queue full (--max-num-seqs + --max-queue), or busy with rejectIfBusy",
           500: "Internal error (a request id for the log)",
           503: "Model loading, engine stopped, or the server is shutting down (Retry-After)"}
WORKERS_RESPONSES = {200: {"model": WorkersEnvelope, "content": _SSE, "description": "The answer"},
                     **_errors(CloudflareError, {**_COMMON, 413: f"{_COMMON[413]}, or prompt + max_tokens over "
                                                                  "the context window",
                                                 404: "No route for that URI (a model path that cannot be routed, "
                                                      "e.g. with a line break)"})}


def chat_responses() -> dict:
    return {200: {"model": ChatCompletion, "content": _SSE, "description": "The answer"},
            **_errors(OpenAIError, {**_COMMON, 404: "Unknown model"})}


def completion_responses() -> dict:
    return {200: {"model": Completion, "content": _SSE, "description": "The answer"},
            **_errors(OpenAIError, {**_COMMON, 404: "Unknown model"})}


def models_responses() -> dict:
    return {200: {"model": ModelList, "description": "The served model names"},
            **_errors(OpenAIError, {401: _COMMON[401], 403: _COMMON[403], 500: _COMMON[500]})}


def model_responses() -> dict:
    return {200: {"model": Model, "description": "The served model"},
            **_errors(OpenAIError, {401: _COMMON[401], 403: _COMMON[403], 404: "Unknown model",
                                    500: _COMMON[500]})}


def tokenizer_responses(model: type[BaseModel]) -> dict:
    return {200: {"model": model, "description": "The result"},
            **_errors(OpenAIError, {400: _COMMON[400], 401: _COMMON[401], 403: _COMMON[403],
                                    404: "Unknown model", 413: _COMMON[413], 500: _COMMON[500],
                                    503: _COMMON[503]})}


def route(summary: str, body: type[BaseModel] | None, responses: dict, path: str = "") -> dict:
    """Keyword arguments for a route: its summary, responses and (for the spec only) its request body and the
    path parameters its handler does not take (`{account_id}` of the Cloudflare-style prefix)."""
    kw: dict[str, Any] = {"summary": summary, "responses": responses}
    extra: dict[str, Any] = {}
    if body is not None:
        name = body.model_config.get("title") or body.__name__
        _BODY_MODELS[name] = body
        extra["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{name}"}}}}
    if "{account_id}" in path:
        extra["parameters"] = [{"name": "account_id", "in": "path", "required": True, "schema": {"type": "string"},
                                "description": "Any account id: a local server has one account"}]
    if extra:
        kw["openapi_extra"] = extra
    return kw


def install(app: FastAPI) -> None:
    """/openapi.json with the request bodies' schemas, and /docs rendered from packaged assets."""
    def spec() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description,
                              routes=app.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for item in doc["paths"].values():     # FastAPI's 422 for path parameters: never sent (400 is)
                for op in item.values():
                    op.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            for name, model in _BODY_MODELS.items():
                s = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="validation",
                                            schema_generator=BodySchema)
                schemas.update(s.pop("$defs", {}))
                schemas[name] = s
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = spec
    app.mount(DOCS_ASSETS, StaticFiles(directory=_ASSETS_DIR), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}{app.openapi_url}", title=f"{app.title} - API",
                                   swagger_js_url=f"{root}{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{root}{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{root}{DOCS_ASSETS}/favicon.png")
