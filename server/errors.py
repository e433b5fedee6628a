"""Error bodies of the two public shapes: the Cloudflare v4 envelope and OpenAI's error object.

Handlers raise ApiError; the app renders it in the shape of the route it happened on, so a client of either
API always gets an error it can parse, never a stack trace.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# Workers AI internal codes (contract.md §1.3)
BAD_INPUT = 5006
NO_SUCH_MODEL = 5007
CONTEXT_WINDOW = 5021
AUTH = 10000
OUT_OF_CAPACITY = 3040
NO_ROUTE = 7000
BAD_METHOD = 7001
INTERNAL = 5000


class ApiError(Exception):
    def __init__(self, status: int, code: int, message: str, *, openai_type: str | None = None,
                 param: str | None = None, openai_code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.openai_type = openai_type or _OPENAI_TYPES.get(status, "server_error")
        self.param, self.openai_code, self.headers = param, openai_code, headers


_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def bad_input(message: str, param: str | None = None) -> ApiError:
    """400 / 5006; the hosted service prefixes its schema errors with 'AiError: Bad input: Error: '."""
    return ApiError(400, BAD_INPUT, message, param=param)


def cloudflare_body(err: ApiError) -> dict:
    message = err.message
    if err.code == BAD_INPUT and not message.startswith("AiError"):
        message = f"AiError: Bad input: Error: {message}"
    elif err.code == CONTEXT_WINDOW and not message.startswith("AiError"):
        message = f"AiError: {message}"
    return {"errors": [{"message": message, "code": err.code}], "success": False, "result": None if
            err.status in (401, 404, 405) else {}, "messages": []}


def openai_body(err: ApiError) -> dict:
    return {"error": {"message": err.message, "type": err.openai_type, "param": err.param,
                      "code": err.openai_code if err.openai_code is not None else err.code}}


def render(err: ApiError, openai: bool) -> JSONResponse:
    return JSONResponse(openai_body(err) if openai else cloudflare_body(err), status_code=err.status,
                        headers=err.headers)
