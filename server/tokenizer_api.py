"""vLLM's tokenizer routes: POST /tokenize, POST /detokenize, GET /tokenizer_info (always on).

They tokenize exactly as the generation routes do: a `prompt` as /v1/completions encodes it (control-token
strings such as `<s>` and `</s>` become their ids; with add_special_tokens, `<s>` first unless it is there),
`messages` as /v1/chat/completions does (mistral-common's template, which starts with `<s>` itself). lm-eval's
remote tokenizer and others use them to count and cut prompts. Errors are OpenAI's shape, as vLLM's.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from engine.image_processor import ImageError
from engine.tokenizer import PromptError
from server import openapi
from server.errors import bad_input
from server.input_limits import check_prompts
from server.openai_api import check_model
from server.pipeline import with_bos
from server.protocol import Bool, Message, Str, TokenIds, Tool, parse
from server.render_openai import token_text
from server.structured import parse_tools

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", title="TokenizeRequest",
                              json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    model: Str | None = Field(None, description="A served model name (GET /v1/models)")
    prompt: Str | None = Field(None, description="Text, encoded as /v1/completions encodes a prompt")
    messages: list[Message] | None = Field(None, min_length=1, description="A chat, encoded as "
                                                                           "/v1/chat/completions encodes it")
    tools: list[Tool] | None = Field(None, description="Tools of the chat (messages only)")
    add_special_tokens: Bool | None = Field(None, description="prompt: put `<s>` first (default true); messages: "
                                                              "the template has it already (only false)")
    add_generation_prompt: Bool | None = Field(None, description="messages: the template always ends ready for "
                                                                 "the answer (only true)")
    return_token_strs: Bool | None = Field(None, description="Also return each token as text")

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data):
        if isinstance(data, dict) and (data.get("prompt") is None) == (data.get("messages") is None):
            raise PydanticCustomError("one_of", "send exactly one of 'prompt' or 'messages'")
        if isinstance(data, dict) and data.get("messages") is not None:
            if data.get("add_special_tokens") is True:
                raise PydanticCustomError("refused", "add_special_tokens: the chat template starts with <s> itself; "
                                                     "a second one is never what the model was trained on",
                                          {"name": "add_special_tokens"})
            if data.get("add_generation_prompt") is False:
                raise PydanticCustomError("refused", "add_generation_prompt: Mistral's template always ends "
                                                     "ready for the answer", {"name": "add_generation_prompt"})
        elif isinstance(data, dict) and data.get("tools") is not None:
            raise PydanticCustomError("refused", "tools need 'messages'", {"name": "tools"})
        return data


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", title="DetokenizeRequest")
    model: Str | None = Field(None, description="A served model name (GET /v1/models)")
    tokens: TokenIds = Field(description="Token ids; control tokens come out as their names (`<s>`)")


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokenizer_class: str
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    model_max_length: int
    vocab_size: int


async def tokenize(request: Request):
    state = request.app.state.server
    body, raw = await parse(request, TokenizeRequest, openai=True)
    check_model(state, body.model)
    engine = state.ready_engine().engine
    if body.prompt is not None:
        prompt, is_raw, tools = body.prompt if body.add_special_tokens is False else with_bos(body.prompt), True, None
    else:
        prompt, is_raw, tools = raw["messages"], False, parse_tools(raw.get("tools"))
    await check_prompts([prompt], tools, state.settings.limits)    # what generation refuses, refused first
    try:        # tokenizing (and decoding images) is a worker thread's job, never the event loop's
        ids = (await asyncio.to_thread(engine.encode, prompt, is_raw, tools)).token_ids
    except (PromptError, ImageError, ValueError) as e:
        raise bad_input(str(e), "messages" if body.messages is not None else "prompt") from None
    strs = [token_text(engine.tokenizer, t)[0] for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.config.max_model_len, "tokens": ids, "token_strs": strs}


async def detokenize(request: Request):
    state = request.app.state.server
    body, _ = await parse(request, DetokenizeRequest, openai=True)
    check_model(state, body.model)
    tok = state.ready_engine().engine.tokenizer
    bad = [t for t in body.tokens if t >= tok.vocab_size]
    if bad:
        raise bad_input(f"tokens: {bad[0]} is not a token id (the vocabulary has {tok.vocab_size})", "tokens")
    return {"prompt": await asyncio.to_thread(tok.decode, body.tokens, False)}


async def tokenizer_info(request: Request) -> dict[str, Any]:
    engine = request.app.state.server.ready_engine().engine
    tk = engine.tokenizer.tekken
    info = {"tokenizer_class": "MistralTokenizer (Tekken v7, mistral-common)", "chat_template": None,
            "model_max_length": engine.config.max_model_len, "vocab_size": engine.tokenizer.vocab_size,
            "num_special_tokens": tk.num_special_tokens, "add_bos_token": True, "add_eos_token": False}
    for kind, i in (("bos", tk.bos_id), ("eos", tk.eos_id), ("pad", tk.pad_id), ("unk", tk.unk_id)):
        info[f"{kind}_token"], info[f"{kind}_token_id"] = tk.id_to_piece(i), i
    return info


router.add_api_route("/tokenize", tokenize, methods=["POST"], **openapi.route(
    "vLLM: tokenize a prompt or a chat", TokenizeRequest, openapi.tokenizer_responses(TokenizeResponse)))
router.add_api_route("/detokenize", detokenize, methods=["POST"], **openapi.route(
    "vLLM: token ids to text", DetokenizeRequest, openapi.tokenizer_responses(DetokenizeResponse)))
router.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"], **openapi.route(
    "vLLM: the tokenizer's special tokens and limits", None, openapi.tokenizer_responses(TokenizerInfo)))
