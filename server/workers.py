"""The Workers AI route: POST /client/v4/accounts/{account_id}/ai/run/{model} (contract.md §1–§4, §9).

Parse (server/protocol.py: the hosted schema's fields and ranges, 400 / 5006 naming the field), hand the
request to the pipeline, render it as Workers AI bytes (server/render_workers.py).
"""

from __future__ import annotations

from urllib.parse import unquote

from fastapi import APIRouter, Request

from server import openapi
from server.errors import NO_SUCH_MODEL, ApiError
from server.pipeline import GenerationRequest, sampling_params, start
from server.protocol import WorkersRun, parse
from server.render import respond
from server.render_workers import WorkersRenderer
from server.structured import parse_tools, response_schema, tool_choice

router = APIRouter()
RUN_PATH = "/client/v4/accounts/{account_id}/ai/run/{model:path}"


@router.post(RUN_PATH, **openapi.route("Workers AI: run the model", WorkersRun, openapi.WORKERS_RESPONSES))
async def run(account_id: str, model: str, request: Request):
    state = request.app.state.server
    model = unquote(model)      # the cloudflare SDK v5 sends @cf%2Fmistralai%2F...: accept it
    if model not in state.settings.model_names:
        raise ApiError(400, NO_SUCH_MODEL, f"No such model {model} or task")
    body, raw = await parse(request, WorkersRun, openai=False)
    tools = parse_tools(raw.get("tools"))
    req = GenerationRequest(
        route="workers", openai=False, prompt=body.prompt if body.prompt is not None else raw["messages"],
        raw=body.raw and body.prompt is not None,
        params=sampling_params(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, seed=body.seed, repetition_penalty=body.repetition_penalty,
                               frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
                               ignore_eos=body.ignore_eos, min_tokens=body.min_tokens),
        tools=tools, tool_choice=tool_choice(raw.get("tool_choice"), tools),
        schema=response_schema(raw.get("response_format"), raw.get("guided_json")),
        reject_if_busy=bool(body.options and body.options.rejectIfBusy))
    gen = await start(state, req)
    return await respond(gen, request, WorkersRenderer(req, state.settings.stream_padding), body.stream)
