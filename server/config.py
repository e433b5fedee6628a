"""The server's settings: one frozen dataclass whose fields are also `serve`'s flags (server/flags.py)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import option

CLOUDFLARE_MODEL = "@cf/mistralai/mistral-small-3.1-24b-instruct"
HF_MODEL = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"
API_KEY_ENV = "MISTRAL_SMALL_API_KEY"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerSettings:
    model_names: tuple[str, ...] = option((CLOUDFLARE_MODEL, HF_MODEL), "model names the routes answer to; the "
                                          "first is reported in metrics", flag="--served-model-name", nargs="+")
    api_key: str | None = option(None, f"bearer token every API route requires (or env {API_KEY_ENV})")
    max_queue: int = option(512, "waiting requests beyond this get 429 / 3040")
    stream_padding: bool = option(True, "the random 'p' field of Workers AI stream events")
    host: str = option("127.0.0.1", "address to bind (browsers' Host headers are limited to loopback names "
                       "unless this binds wider)")
    port: int = option(8000, "port to listen on")
    allowed_origins: tuple[str, ...] = option((), "browser origins allowed besides loopback pages and the "
                                              "server's own; '*' allows any", nargs="*")
    allowed_hosts: tuple[str, ...] | None = option(None, "Host header values accepted (default: loopback names, "
                                                   "or any when --host binds every interface); '*' = any",
                                                   nargs="*")
    demo: bool = False              # serving random weights: said in /v1/models, /health and the log
    model_path: str = ""

    def __post_init__(self):
        if self.api_key == "":
            raise ValueError("api_key must not be empty: an empty key would turn authentication off silently; "
                             "omit --api-key to serve without one")
        if not self.model_names:
            raise ValueError("at least one served model name is needed")
        if self.max_queue < 0:
            raise ValueError("max_queue must be >= 0")
