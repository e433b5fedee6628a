"""Where requests go: the base URL, the route (`--backend`), the model name, credentials, and whether it is the
hosted Workers AI service (contract.md §1, §5, §6).

Hosted: `--hosted` or a base URL on cloudflare.com (the default base URL with `--hosted`). The account id and
token come from CLOUDFLARE_ACCOUNT_ID and CLOUDFLARE_API_TOKEN, as Cloudflare's own tools read them; the hosted
service takes at most 300 text-generation requests a minute, so hosted runs are capped there by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from server.config import API_KEY_ENV, CLOUDFLARE_MODEL

BACKENDS = ("workers", "openai-chat", "openai")
HOSTED_BASE_URL = "https://api.cloudflare.com"
HOSTED_REQUESTS_PER_MINUTE = 300        # Workers AI text generation (contract.md §6)
ACCOUNT_ENV, TOKEN_ENV = "CLOUDFLARE_ACCOUNT_ID", "CLOUDFLARE_API_TOKEN"
_PATHS = {
    "workers": "/client/v4/accounts/{account}/ai/run/{model}",
    "openai-chat": "/v1/chat/completions",
    "openai": "/v1/completions",
}
_HOSTED_PATHS = {**_PATHS, "openai-chat": "/client/v4/accounts/{account}/ai/v1/chat/completions",
                 "openai": "/client/v4/accounts/{account}/ai/v1/completions"}


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    backend: str                      # workers | openai-chat | openai
    model: str
    path: str
    hosted: bool = False
    headers: dict = field(default_factory=dict, compare=False)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.path

    @property
    def chat(self) -> bool:
        """Chat-templated prompts (workers, openai-chat) rather than completions' raw text."""
        return self.backend != "openai"

    def describe(self) -> dict:
        """For the result JSON: never the credentials."""
        return {"base_url": self.base_url, "backend": self.backend, "model": self.model, "url": self.url,
                "hosted": self.hosted}


def make_endpoint(base_url: str | None, backend: str, model: str | None = None, endpoint: str | None = None,
                  hosted: bool = False, api_key: str | None = None, env=None) -> Endpoint:
    env = os.environ if env is None else env
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)}")
    hosted = hosted or (base_url is not None and _on_cloudflare(base_url))
    base_url = base_url or (HOSTED_BASE_URL if hosted else "http://127.0.0.1:8000")
    if urlsplit(base_url).scheme not in ("http", "https"):
        raise ValueError(f"--base-url {base_url!r}: expected http://HOST:PORT or https://...")
    model = model or CLOUDFLARE_MODEL
    headers = {}
    account = "local"
    if hosted:
        account, token = env.get(ACCOUNT_ENV), api_key or env.get(TOKEN_ENV)
        if not account or not token:
            raise ValueError(f"the hosted endpoint needs {ACCOUNT_ENV} and {TOKEN_ENV} in the environment "
                             "(a token with Workers AI Read and Edit)")
        headers["Authorization"] = f"Bearer {token}"
    else:
        key = api_key or env.get(API_KEY_ENV)
        if key:
            headers["Authorization"] = f"Bearer {key}"
    path = endpoint or (_HOSTED_PATHS if hosted else _PATHS)[backend]
    return Endpoint(base_url, backend, model, path.format(account=account, model=model), hosted, headers)


def _on_cloudflare(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return host == "cloudflare.com" or host.endswith(".cloudflare.com")
