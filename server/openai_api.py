"""OpenAI-compatible routes under /v1 and /client/v4/accounts/{account_id}/ai/v1: chat/completions,
completions, models. Parse (server/protocol.py: OpenAI's ranges and fields plus vLLM's min_tokens / ignore_eos
/ top_k / repetition_penalty), hand the request to the pipeline, render OpenAI's objects
(server/render_openai.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server import openapi
from server.errors import ApiError
from server.pipeline import GenerationRequest, sampling_params, start
from server.protocol import ChatCompletionRequest, CompletionRequest, parse
from server.render import respond
from server.render_openai import OpenAIRenderer
from server.structured import parse_tools, response_schema, tool_choice

router = APIRouter()
PREFIXES = ("/v1", "/client/v4/accounts/{account_id}/ai/v1")


def check_model(state, model: str | None) -> str:
    if model is None:
        return state.settings.model_names[0]
    if model not in state.settings.model_names:
        raise ApiError(404, 5007, f"The model `{model}` does not exist. Available: "
                       f"{', '.join(state.settings.model_names)}", param="model", openai_code="model_not_found")
    return model


def _params(body, logprobs: int | None):
    return sampling_params(
        max_tokens=body.max_tokens_value, temperature=body.temperature, top_p=body.top_p,
        top_k=None if body.top_k in (None, 0) else body.top_k, seed=None if body.seed is None else body.seed % 2**63,
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty, stop=body.stop, min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos, logprobs=logprobs)


async def chat_completions(request: Request):
    state = request.app.state.server
    body, raw = await parse(request, ChatCompletionRequest, openai=True)
    model = check_model(state, body.model)
    tools = parse_tools(raw.get("tools"))
    req = GenerationRequest(
        route="openai-chat", openai=True, prompt=raw["messages"],
        params=_params(body, (body.top_logprobs or 0) if body.logprobs else None),
        tools=tools, tool_choice=tool_choice(raw.get("tool_choice"), tools),
        parallel_tool_calls=body.parallel_tool_calls is not False,
        schema=response_schema(raw.get("response_format"), raw.get("guided_json")),
        reject_if_busy=bool((body.options or {}).get("rejectIfBusy")))
    return await _serve(state, request, req, body, chat=True, model=model)


async def completions(request: Request):
    state = request.app.state.server
    body, raw = await parse(request, CompletionRequest, openai=True)
    model = check_model(state, body.model)
    prompt = body.prompt[0] if isinstance(body.prompt, list) else body.prompt
    if not prompt.startswith("<s>"):
        prompt = "<s>" + prompt       # like vLLM's completions: the tokenizer's BOS comes first
    req = GenerationRequest(
        route="openai-completions", openai=True, prompt=prompt, raw=True, what="prompt",
        params=_params(body, body.logprobs), schema=response_schema(raw.get("response_format"),
                                                                    raw.get("guided_json")),
        reject_if_busy=bool((body.options or {}).get("rejectIfBusy")))
    return await _serve(state, request, req, body, chat=False, model=model)


async def _serve(state, request: Request, req: GenerationRequest, body, chat: bool, model: str):
    gen = await start(state, req)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    renderer = OpenAIRenderer(chat, model, include_usage, state.engine.engine.tokenizer)
    return await respond(gen, request, renderer, body.stream)


async def models(request: Request):
    state = request.app.state.server
    s = state.settings
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "demo-random-weights" if s.demo else "mistralai",
         "root": s.model_path, "demo": s.demo,
         "max_model_len": state.engine.engine.config.max_model_len if state.engine else None,
         **({"note": "DEMO: answers come from random weights, not Mistral Small 3.1"} if s.demo else {})}
        for name in s.model_names]}


for _prefix in PREFIXES:
    router.add_api_route(_prefix + "/chat/completions", chat_completions, methods=["POST"],
                         **openapi.route("OpenAI: chat completion", ChatCompletionRequest,
                                         openapi.chat_responses(), _prefix))
    router.add_api_route(_prefix + "/completions", completions, methods=["POST"],
                         **openapi.route("OpenAI: text completion", CompletionRequest,
                                         openapi.completion_responses(), _prefix))
    router.add_api_route(_prefix + "/models", models, methods=["GET"],
                         **openapi.route("OpenAI: the served models", None, openapi.models_responses(), _prefix))
