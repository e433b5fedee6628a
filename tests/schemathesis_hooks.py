"""Schemathesis hooks for tests/test_schemathesis.py: generated requests keep answers short on the CPU."""

import schemathesis

MAX_TOKENS = 4


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v > MAX_TOKENS:
                body[key] = MAX_TOKENS
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
