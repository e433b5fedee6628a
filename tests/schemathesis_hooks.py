"""Schemathesis hooks for tests/test_schemathesis.py: generated requests keep answers short on the CPU."""

import schemathesis

MAX_TOKENS = 4
MAX_CHOICES = 2         # n: each choice is a sequence of its own


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    if isinstance(body, dict):
        # JSON Schema integers include integral floats (5782.0): the server takes them, so they are capped too
        for key, cap in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("n", MAX_CHOICES)):
            v = body.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v > cap:
                body[key] = cap
        if "max_tokens" not in body and "max_completion_tokens" not in body:
            body["max_tokens"] = MAX_TOKENS
