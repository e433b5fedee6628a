"""Error bodies of the two public shapes: the Cloudflare v4 envelope and OpenAI's error object, and the wording
of every error a client can cause.

Handlers raise ApiError; the app renders it in the shape of the route it happened on, so a client of either
API always gets an error it can parse, never a stack trace. Validation errors (pydantic) are worded here too:
the Workers route in the hosted service's style ("Type mismatch of '/temperature'", "'/top_k' must be between
1 and 50"), the OpenAI routes in OpenAI's (`param` names the field).
"""

from __future__ import annotations

import json

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from engine.limits import OPENAI, WORKERS

# Workers AI internal codes (contract.md §1.3)
BAD_INPUT = 5006
NO_SUCH_MODEL = 5007
CONTEXT_WINDOW = 5021
AUTH = 10000
OUT_OF_CAPACITY = 3040
NO_ROUTE = 7000
BAD_METHOD = 7001
INTERNAL = 5000
FORBIDDEN = 1003


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, *, openai_type: str | None = None,
                 param: str | None = None, openai_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.openai_type = openai_type or _OPENAI_TYPES.get(status, "server_error")
        self.param, self.openai_code, self.headers = param, openai_code, headers


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                 429: "rate_limit_error"}


def bad_input(message: str, param: str | None = None) -> ApiError:
    """400 / 5006; the hosted service prefixes its schema errors with 'AiError: Bad input: Error: '."""
    return ApiError(400, BAD_INPUT, message, param=param)


def unavailable(message: str) -> ApiError:
    return ApiError(503, OUT_OF_CAPACITY, message, openai_type="server_error", headers={"Retry-After": "1"})


def cloudflare_body(err: ApiError) -> dict:
    message = err.message
    if err.code == BAD_INPUT and not message.startswith("AiError"):
        message = f"AiError: Bad input: Error: {message}"
    elif err.code == CONTEXT_WINDOW and not message.startswith("AiError"):
        message = f"AiError: {message}"
    return {"errors": [{"message": message, "code": err.code}], "success": False, "result": None if
            err.status in (401, 403, 404, 405) else {}, "messages": []}


def openai_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.param,
                      "code": err.openai_code if err.openai_code is not None else err.code}}


def render(err: ApiError, openai: bool) -> JSONResponse:
    return JSONResponse(openai_body(err) if openai else cloudflare_body(err), status_code=err.status,
                        headers=err.headers)


def is_openai_path(path: str) -> bool:
    """Which error shape a path speaks: OpenAI's under /v1 and /client/v4/accounts/*/ai/v1, else Cloudflare's."""
    return path.startswith("/v1/") or path == "/v1" or ("/ai/v1/" in path and path.startswith("/client/v4/"))


# ---- the context window: each route words it as its reference does ----------------------------------------------
def context_window(e, openai: bool, what: str) -> ApiError:
    """`e` is the engine's ContextWindowError. Workers: the hosted service's 413 / 5021; OpenAI: vLLM's 400."""
    if not openai:
        return ApiError(413, CONTEXT_WINDOW, f"{CONTEXT_WINDOW}: {e}")
    return ApiError(400, CONTEXT_WINDOW, f"This model's maximum context length is {e.limit} tokens. However, you "
                    f"requested {e.prompt_tokens + e.max_tokens} tokens ({e.prompt_tokens} in the {what}, "
                    f"{e.max_tokens} in the completion). Please reduce the length of the {what} or completion.",
                    param=what, openai_code="context_length_exceeded")


# ---- validation errors -------------------------------------------------------------------------------------------
_EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number",
             "bool_type": "a boolean", "string_type": "a string", "list_type": "an array", "dict_type": "an object",
             "model_type": "an object", "model_attributes_type": "an object", "type_mismatch": "a string or an array"}
_RANGE = ("greater_than_equal", "less_than_equal", "greater_than", "less_than", "finite_number")


def _loc(loc: tuple) -> list:
    # pydantic names union members in the location ("function-before[...]", "ContentPart"): not the client's
    return [p for p in loc if isinstance(p, int) or (p.isidentifier() and not p[:1].isupper())]


def _first(errors: list[dict]) -> dict:
    """The first problem; when a union's first member only failed on type, the member that took the type and
    failed on its constraints says more ("too many items" rather than "not a string")."""
    err = errors[0]
    if err["type"] in _EXPECTED:
        loc = _loc(err["loc"])
        for other in errors[1:]:
            if _loc(other["loc"])[:len(loc)] == loc and other["type"] not in _EXPECTED:
                return other
    return err


def validation_error(exc: ValidationError, openai: bool) -> ApiError:
    """The first problem of a body, worded for its route."""
    err = _first(exc.errors(include_url=False))
    loc = _loc(err["loc"])
    ctx = err.get("ctx") or {}
    name = ctx.get("name") or (loc[0] if loc and isinstance(loc[0], str) else None)
    field = loc[-1] if loc and isinstance(loc[-1], str) else name
    where = ("/" + "/".join(map(str, loc))) if not openai else ".".join(map(str, loc))
    value = err.get("input")
    kind = err["type"]
    if kind in ("one_of", "refused", "range"):
        message = err["msg"]
    elif kind == "bad_input":
        message = f"'{where}' {err['msg']}" if not openai else f"{where}: {err['msg']}"
    elif kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {where}"
    elif kind == "missing":
        message = f"'{where}' is required" if not openai else f"{where} is required"
    elif kind in _RANGE:
        rng = (OPENAI if openai else WORKERS).get(field) if len(loc) == 1 else None
        bound = rng.describe() if rng is not None else \
            " and ".join(f"{op} {ctx[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                         if k in ctx) or "finite"
        message = f"'{where}' must be {bound}, got {_show(value)}" if not openai else \
            f"{where} must be {bound}, got {_show(value)}"
    elif kind == "literal_error":
        message = f"'{where}' must be one of {ctx.get('expected')}, got {_show(value)}" if not openai else \
            f"{where} must be one of {ctx.get('expected')}, got {_show(value)}"
    elif kind in ("string_too_short", "too_short"):
        what = "string" if isinstance(value, str) else "array"
        message = f"'{where}' must be a non-empty {what}" if not openai else f"{where} must be a non-empty {what}"
    elif kind == "too_long":
        message = f"'{where}' has too many items (at most {ctx.get('max_length')})" if not openai else \
            f"{where} has too many items (at most {ctx.get('max_length')})"
    elif kind in _EXPECTED:
        message = f"Type mismatch of '{where}': expected {_EXPECTED[kind]}, got {_show(value)}" if not openai \
            else f"{where} must be {_EXPECTED[kind]}, got {_show(value)}"
    else:
        message = f"'{where}': {err['msg']}" if not openai else f"{where}: {err['msg']}"
    return bad_input(message, name)


def _show(value) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = "<unprintable value>"
    return text if len(text) <= 80 else text[:77] + "..."
