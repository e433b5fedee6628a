"""Counting a prompt's tokens as the endpoint will count them (its `usage.prompt_tokens`, chat template and
images included), so a workload's planned input lengths are the lengths the server sees.

The endpoint's own `POST /tokenize` (vLLM's, which our server serves too) is the authority when it has one;
otherwise mistral-common counts locally with the Tekken v7 tokenizer (`--tokenizer` names a tekken.json or a
model directory; by default the vocabulary that ships with mistral-common is rebuilt as Small 3.1's v7 file, the
same ids as the real one). The local tokenizer is always needed too: random prompts are decoded from random
token ids.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import httpx

from engine.tokenizer import Tokenizer, write_tekken_v7

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mistral-small-engine" / "tekken-v7"
BOS = "<s>"
# Ids below this are control tokens (model.md §4): random prompts never draw them.
FIRST_TEXT_ID = 1000


class TokenizeError(ValueError):
    """The endpoint's /tokenize refused a prompt it should count."""


@functools.lru_cache(maxsize=4)
def local_tokenizer(path: str | None = None) -> Tokenizer:
    """Loaded once per process (seconds: mistral-common builds the BPE table)."""
    if path:
        p = Path(path)
        return Tokenizer.from_model_dir(p) if p.is_dir() else Tokenizer.from_file(p)
    file = CACHE / "tekken.json"
    if not file.is_file():      # written aside and renamed: a stopped write never leaves half a file
        part = write_tekken_v7(CACHE / f"tekken.{os.getpid()}.json")
        os.replace(part, file)
    return Tokenizer.from_file(file)


class RemoteTokenize:
    """The endpoint's vLLM-style `POST /tokenize`: `{"model", "messages" | "prompt"}` -> `{"count", ...}`."""

    def __init__(self, client: httpx.Client, url: str, model: str):
        self.client, self.url, self.model = client, url, model

    @classmethod
    def detect(cls, base_url: str, headers: dict, model: str, timeout: float = 30.0) -> RemoteTokenize | None:
        """The endpoint's /tokenize, or None when it has none (any answer but a count: 404 on servers without
        it). The result JSON records which counter planned the workload."""
        client = httpx.Client(headers=headers, timeout=timeout)
        url = base_url.rstrip("/") + "/tokenize"
        try:
            r = client.post(url, json={"model": model, "prompt": "Hello"})
            if r.status_code == 200 and isinstance(_json(r).get("count"), int):
                return cls(client, url, model)
        except httpx.HTTPError:
            pass                    # unreachable: the run's first request says so clearly
        client.close()
        return None

    def count(self, body: dict) -> int:
        r = self.client.post(self.url, json={"model": self.model, **body})
        if r.status_code != 200:
            raise TokenizeError(f"{self.url} refused a workload prompt ({r.status_code}): {r.text[:300]}")
        return int(r.json()["count"])

    def close(self) -> None:
        self.client.close()


def _json(r: httpx.Response) -> dict:
    try:
        body = r.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


class PromptCounter:
    """`chat(messages, tools)` / `completion(text)`: usage.prompt_tokens of a chat route / a completions route
    (where BOS comes first, as vLLM's and our /v1/completions add it)."""

    def __init__(self, tokenizer: Tokenizer, remote: RemoteTokenize | None = None):
        self.tokenizer, self.remote = tokenizer, remote
        self.source = "endpoint /tokenize" if remote is not None else "mistral-common (local)"

    def chat(self, messages: list[dict], tools: list[dict] | None = None) -> int:
        if self.remote is not None:
            return self.remote.count({"messages": messages, **({"tools": tools} if tools else {})})
        return len(self.tokenizer.encode_chat(messages, tools).token_ids)

    def completion(self, text: str) -> int:
        if self.remote is not None:
            return self.remote.count({"prompt": text})
        return len(self.tokenizer.encode_raw(text if text.startswith(BOS) else BOS + text))

    def text_tokens(self, text: str) -> int:
        """Plain text, no template (ShareGPT answers' lengths, output counts without usage)."""
        return len(self.tokenizer.encode_text(text))

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()
