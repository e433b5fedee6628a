"""HTTP helpers for the server tests: concurrent requests (so the engine batches them), SSE replies, OpenAI
streams rebuilt into tool calls, and a thumb on the tiny model's scale."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass

import httpx


@dataclass
class Reply:
    status: int
    text: str

    def json(self):
        return json.loads(self.text)

    def events(self) -> list:
        """SSE payloads in order: parsed JSON, or the string "[DONE]"."""
        assert self.text.endswith("\n\n"), self.text[-200:]
        out = []
        for frame in self.text.split("\n\n")[:-1]:
            assert frame.startswith("data: ") and "\n" not in frame, frame
            data = frame[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
        return out


async def _send(client: httpx.AsyncClient, path: str, body: dict) -> Reply:
    if body.get("stream"):
        async with client.stream("POST", path, json=body) as r:
            return Reply(r.status_code, (await r.aread()).decode())
    r = await client.post(path, json=body)
    return Reply(r.status_code, r.text)


def post_all(srv, jobs: list[tuple[str, dict]], token: str | None = None, headers: dict | None = None) -> list[Reply]:
    """All requests at once, so the engine batches them; replies in job order."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})}

    async def go():
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        async with httpx.AsyncClient(base_url=srv.url, headers=headers, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(_send(client, path, body) for path, body in jobs))
    return asyncio.run(go())


def streamed_calls(reply: Reply, index: int = 0) -> tuple[list[dict], str, str]:
    """Rebuild choice `index`'s calls from an OpenAI stream, checking OpenAI's delta shape: a call's first
    delta carries id, type, name and empty arguments, later ones argument fragments only, and no chunk holds
    two entries for one call. -> (calls, content, finish_reason)"""
    events = reply.events()
    assert events[-1] == "[DONE]"
    chunks = [c for e in events[:-1] for c in e["choices"] if c["index"] == index]
    assert chunks[0]["delta"] == {"role": "assistant", "content": ""}
    calls, content = [], ""
    for c in chunks:
        content += c["delta"].get("content", "")
        entries = c["delta"].get("tool_calls", [])
        assert len({d["index"] for d in entries}) == len(entries), entries
        for d in entries:
            if d["index"] == len(calls):          # a call's first delta: id, type, name, empty arguments
                assert set(d) == {"index", "id", "type", "function"} and d["type"] == "function", d
                assert d["function"]["arguments"] == "" and set(d["function"]) == {"name", "arguments"}, d
                calls.append({"id": d["id"], "type": "function",
                              "function": {"name": d["function"]["name"], "arguments": ""}})
            else:                                 # later deltas: index and an arguments fragment only
                assert d["index"] == len(calls) - 1, d
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}, d
                assert d["function"]["arguments"]
                calls[-1]["function"]["arguments"] += d["function"]["arguments"]
    assert all(c["finish_reason"] is None for c in chunks[:-1])
    return calls, content, chunks[-1]["finish_reason"]


@contextlib.contextmanager
def favour_token(srv, token: int | list[int], amount: float = 100.0):
    """Make the model all but certain to sample `token` (one of `token`s) wherever the grammar (if any) allows
    it."""
    model = srv.engine.model
    original = model.compute_logits

    def compute_logits(hidden):
        logits = original(hidden)
        logits[:, token] += amount
        return logits

    model.compute_logits = compute_logits
    try:
        yield
    finally:
        assert srv.wait_idle(30)
        del model.compute_logits
