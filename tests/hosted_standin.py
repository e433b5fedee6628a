"""A local stand-in for the hosted Workers AI run route (contract.md §1, §4), for testing `mistral-small bench
--hosted` without Cloudflare: the v4 envelope, Bearer auth (401 / 10000 on a bad token), 400 / 5007 for an
unknown model, a number of 429s with Retry-After before it serves, and streams shaped like the hosted ones: an
empty `response` event at once, the first text `first_text_delay` seconds later, `p` padding on every event, an
event without `response`, then cumulative usage and [DONE]."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from server_fixture import free_port

MODEL = "@cf/mistralai/mistral-small-3.1-24b-instruct"
WORDS = ["Hello", " from", " the", " stand", "-in", "."]


@dataclass
class StandIn:
    token: str = "good-token"
    account: str = "acct-123"
    first_text_delay: float = 0.4
    rate_limited: int = 0                       # the next N requests get 429
    revoke_after: int | None = None             # the token stops working after N answered requests
    seen: list[dict] = field(default_factory=list)
    url: str = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/client/v4/accounts/{account}/ai/run/{model:path}")
        async def run(account: str, model: str, request: Request):
            revoked = self.revoke_after is not None and len(self.seen) >= self.revoke_after
            if request.headers.get("authorization") != f"Bearer {self.token}" or account != self.account or revoked:
                return _error(401, 10000, "Authentication error", result=None)
            if model != MODEL:
                return _error(400, 5007, f"No such model {model} or task")
            if self.rate_limited > 0:
                self.rate_limited -= 1
                return _error(429, 3040, "Capacity temporarily exceeded, please try again.",
                              headers={"Retry-After": "1"})
            body = await request.json()
            n = min(int(body.get("max_tokens", 256)), len(WORDS))
            prompt_tokens = 7 + sum(len(m["content"]) for m in body.get("messages", [])
                                    if isinstance(m.get("content"), str)) // 4
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            record = {"body": body, "first_text_sent": None}
            self.seen.append(record)
            if not body.get("stream"):
                await asyncio.sleep(self.first_text_delay)
                return JSONResponse({"result": {"response": "".join(WORDS[:n]), "tool_calls": [], "usage": usage},
                                     "success": True, "errors": [], "messages": []})
            return StreamingResponse(self._events(n, usage, record), media_type="text/event-stream")

        return app

    async def _events(self, n: int, usage: dict, record: dict):
        yield _event({"response": "", "tool_calls": [], "p": "abdefghijklmnopr"})
        await asyncio.sleep(self.first_text_delay)
        for i, w in enumerate(WORDS[:n]):
            if i == 0:
                record["first_text_sent"] = time.monotonic()
            yield _event({"response": w, "tool_calls": [], "p": "abdefghijklmnoprstuvxyz"[: 5 + 3 * i]})
            await asyncio.sleep(0.01)
        yield _event({"tool_calls": [], "p": "abdefghijk"})
        yield _event({"response": "", "usage": usage})
        yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _error(status: int, code: int, message: str, result=..., headers=None) -> JSONResponse:
    return JSONResponse({"result": {} if result is ... else result, "success": False,
                         "errors": [{"code": code, "message": message}], "messages": []},
                        status_code=status, headers=headers)


def start_standin(standin: StandIn) -> tuple[StandIn, uvicorn.Server, threading.Thread]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(standin.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"standin-{port}", daemon=True)
    thread.start()
    end = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > end:
            raise RuntimeError("the stand-in did not start")
        time.sleep(0.02)
    standin.url = f"http://127.0.0.1:{port}"
    return standin, server, thread
