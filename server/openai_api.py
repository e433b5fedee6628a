"""OpenAI-compatible routes under /v1 and /client/v4/accounts/{account_id}/ai/v1: chat/completions,
completions, models. Parse (server/protocol.py: OpenAI's ranges and fields plus vLLM's min_tokens / ignore_eos
/ top_k / repetition_penalty / prompt_logprobs and Mistral's random_seed / tool_choice "any"), hand the request
to the pipeline, render OpenAI's objects (server/render_openai.py) in the flavour the client speaks."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server import openapi
from server.errors import ApiError
from server.pipeline import GenerationRequest, sampling_params, start
from server.protocol import ChatCompletionRequest, CompletionRequest, parse
from server.render import respond
from server.render_openai import Flavour, OpenAIRenderer
from server.structured import parse_tools, response_schema, tool_choice

router = APIRouter()
PREFIXES = ("/v1", "/client/v4/accounts/{account_id}/ai/v1")
MISTRAL_AGENT = "mistral-client-"       # the user agent of Mistral's SDKs (mistral-client-python/3.7.0, ...)
MISTRAL_FIELDS = ("random_seed", "safe_prompt", "prompt_mode")


def check_model(state, model: str | None) -> str:
    if model is None:
        return state.settings.model_names[0]
    if model not in state.settings.model_names:
        raise ApiError(404, 5007, f"The model `{model}` does not exist. Available: "
                       f"{', '.join(state.settings.model_names)}", param="model", openai_code="model_not_found")
    return model


def _params(body, logprobs: int | None, seed: int | None):
    return sampling_params(
        max_tokens=body.max_tokens_value, temperature=body.temperature, top_p=body.top_p,
        top_k=None if body.top_k in (None, 0) else body.top_k, seed=None if seed is None else seed % 2**63,
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty, stop=body.stop, min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos, logprobs=logprobs, logit_bias=body.logit_bias)


def flavour(state, request: Request, body, raw: dict) -> Flavour:
    """Mistral's SDK (its user agent, or a field only Mistral's API has) gets Mistral's stream shape."""
    mistral = request.headers.get("user-agent", "").startswith(MISTRAL_AGENT) or \
        any(f in raw for f in MISTRAL_FIELDS) or raw.get("tool_choice") == "any"
    return Flavour(include_usage=bool(body.stream_options and body.stream_options.include_usage),
                   usage_on_finish=mistral or state.settings.force_include_usage, whole_calls=mistral)


async def chat_completions(request: Request):
    state = request.app.state.server
    body, raw = await parse(request, ChatCompletionRequest, openai=True)
    model = check_model(state, body.model)
    tools = parse_tools(raw.get("tools"))
    req = GenerationRequest(
        route="openai-chat", openai=True, prompts=(raw["messages"],), n=body.n or 1,
        params=_params(body, (body.top_logprobs or 0) if body.logprobs else None, body.seed_value),
        prompt_logprobs=body.prompt_logprobs,
        tools=tools, tool_choice=tool_choice(raw.get("tool_choice"), tools),
        parallel_tool_calls=body.parallel_tool_calls is not False,
        schema=response_schema(raw.get("response_format"), raw.get("guided_json")),
        reject_if_busy=bool((body.options or {}).get("rejectIfBusy")))
    return await _serve(state, request, req, body, raw, chat=True, model=model)


async def completions(request: Request):
    state = request.app.state.server
    body, raw = await parse(request, CompletionRequest, openai=True)
    model = check_model(state, body.model)
    req = GenerationRequest(
        route="openai-completions", openai=True, prompts=tuple(body.prompts), raw=True, add_bos=True,
        what="prompt", n=body.n or 1, echo=bool(body.echo), params=_params(body, body.logprobs, body.seed),
        prompt_logprobs=body.prompt_logprobs,
        schema=response_schema(raw.get("response_format"), raw.get("guided_json")),
        reject_if_busy=bool((body.options or {}).get("rejectIfBusy")))
    return await _serve(state, request, req, body, raw, chat=False, model=model)


async def _serve(state, request: Request, req: GenerationRequest, body, raw: dict, chat: bool, model: str):
    gen = await start(state, req)
    renderer = OpenAIRenderer(chat, model, state.engine.engine.tokenizer, gen.request_id, len(gen.streams),
                              flavour(state, request, body, raw))
    return await respond(gen, request, renderer, body.stream)


def model_card(state, name: str) -> dict:
    """OpenAI's model object, with vLLM's max_model_len and Mistral's type / capabilities / max_context_length
    (its SDK validates them)."""
    s = state.settings
    window = state.engine.engine.config.max_model_len if state.engine else None
    return {"id": name, "object": "model", "created": 0, "owned_by": "demo-random-weights" if s.demo else "mistralai",
            "root": s.model_path, "demo": s.demo, "max_model_len": window,
            "type": "base", "max_context_length": window, "aliases": [n for n in s.model_names if n != name],
            "default_model_temperature": sampling_params().temperature,
            "capabilities": {"completion_chat": True, "function_calling": True, "vision": True,
                             "completion_fim": False, "fine_tuning": False, "classification": False},
            **({"note": "DEMO: answers come from random weights, not Mistral Small 3.1"} if s.demo else {})}


async def models(request: Request):
    state = request.app.state.server
    return {"object": "list", "data": [model_card(state, name) for name in state.settings.model_names]}


async def model(request: Request, model_id: str):
    state = request.app.state.server
    return model_card(state, check_model(state, model_id))


for _prefix in PREFIXES:
    router.add_api_route(_prefix + "/chat/completions", chat_completions, methods=["POST"],
                         **openapi.route("OpenAI: chat completion", ChatCompletionRequest,
                                         openapi.chat_responses(), _prefix))
    router.add_api_route(_prefix + "/completions", completions, methods=["POST"],
                         **openapi.route("OpenAI: text completion", CompletionRequest,
                                         openapi.completion_responses(), _prefix))
    router.add_api_route(_prefix + "/models", models, methods=["GET"],
                         **openapi.route("OpenAI: the served models", None, openapi.models_responses(), _prefix))
    router.add_api_route(_prefix + "/models/{model_id:path}", model, methods=["GET"],
                         **openapi.route("OpenAI: one served model", None, openapi.model_responses(), _prefix))
