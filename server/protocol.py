"""Request bodies of every route as pydantic models: the contract's fields, ranges, defaults and descriptions
in one place. They validate each body once and make the OpenAPI spec.

Numbers come from engine/limits.py (ranges) and SamplingParams (defaults). Values are checked strictly: a
string is never a number and a boolean never an integer (JSON's `true` as a temperature is a client bug), an
integral float (2.0) is an integer, NaN and infinities are refused. Validation errors are worded per route in
server/errors.py.

Unknown fields, by route:
- Workers AI accepts them, as the hosted schema does (neither of its branches sets additionalProperties:
  false); but a field with a meaning elsewhere in our API that this route does not act on (`stop`, `n`,
  `logprobs`, ...) is a 400 naming it, never silently dropped.
- OpenAI answers 400 "Unrecognized request argument supplied: X", as OpenAI's API does (vLLM ignores them);
  a known field this server does not implement is a 400 saying so.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    model_validator,
)
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

from engine.limits import ENGINE, MAX_PROMPTS, MAX_STOP, OPENAI, WORKERS, Range
from engine.sampling_params import SamplingParams
from server.errors import bad_input, validation_error

DEFAULTS = SamplingParams()
OPENAI_LOGIT_BIAS = ENGINE["logit_bias"]


# ---- strict scalars ----------------------------------------------------------------------------------------------
def _integer(v):
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PydanticCustomError("int_type", "expected an integer")
    return v


def _number(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PydanticCustomError("float_type", "expected a number")
    return v


def _boolean(v):
    if not isinstance(v, bool):
        raise PydanticCustomError("bool_type", "expected a boolean")
    return v


def _string(v):
    if not isinstance(v, str):
        raise PydanticCustomError("string_type", "expected a string")
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:      # JSON's "\ud800" parses, but is no text any tokenizer or reply can hold
            raise PydanticCustomError("bad_input", "must be valid Unicode text: it holds a lone surrogate "
                                                   "(an unpaired \\uD800-\\uDFFF escape)") from None
    return v


def _tool_array(v):
    if not isinstance(v, list):
        raise PydanticCustomError("refused", "'tools' must be an array", {"name": "tools"})
    return v


class BodySchema(GenerateJsonSchema):
    """JSON schemas of the bodies. pydantic keeps a constraint on a type with its own validator under its Python
    name (`ge`): the JSON Schema keywords are restored here, so clients and fuzzers see the ranges."""
    _KEYWORDS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum", "lt": "exclusiveMaximum"}
    _LENGTHS = {"string": ("minLength", "maxLength"), "array": ("minItems", "maxItems")}

    def generate(self, schema, mode="validation"):
        return self._fix(super().generate(schema, mode))

    def _fix(self, node, names: bool = False):
        """`names`: node maps names to schemas (properties, $defs): its keys are not keywords."""
        if isinstance(node, list):
            return [self._fix(n) for n in node]
        if not isinstance(node, dict):
            return node
        if names:
            return {k: self._fix(v) for k, v in node.items()}
        node = {self._KEYWORDS.get(k, k): self._fix(v, k in ("properties", "$defs", "patternProperties"))
                for k, v in node.items()}
        kind = node.get("type")
        lo, hi = self._LENGTHS.get(kind, (None, None)) if isinstance(kind, str) else (None, None)
        if lo is not None:
            for raw, keyword in (("min_length", lo), ("max_length", hi)):
                if raw in node:
                    node[keyword] = node.pop(raw)
        return node


Int = Annotated[int, BeforeValidator(_integer)]
Num = Annotated[float, BeforeValidator(_number)]
Bool = Annotated[bool, BeforeValidator(_boolean)]
Str = Annotated[str, BeforeValidator(_string)]


DESCRIPTIONS = {
    "max_tokens": "Tokens to generate at most", "max_completion_tokens": "Tokens to generate at most (replaces "
    "max_tokens)", "temperature": "Sampling temperature; 0 = greedy", "top_p": "Nucleus sampling: the smallest "
    "set of most likely tokens whose probability reaches top_p (>= 1 = off)", "top_k": "Keep the k most likely "
    "tokens", "seed": "Random seed: the same seed and request give the same answer", "repetition_penalty":
    "Penalty on tokens of the prompt and the output; 1 = off", "frequency_penalty": "Penalty per occurrence in the "
    "output", "presence_penalty": "Penalty once a token occurred in the output", "top_logprobs": "Alternatives "
    "per token (needs logprobs)", "logprobs": "Logprobs of the chosen token and this many alternatives",
    "min_tokens": "No end-of-sequence before this many tokens", "n": "Choices per prompt, each its own sequence "
    "sharing the prompt's prefill", "prompt_logprobs": "vLLM: each prompt token's logprob and rank, plus this "
    "many alternatives",
}


def knob(table: dict[str, Range], name: str, default=None):
    """A numeric field with its contract's range (JSON schema minimum/maximum), default and description."""
    r = table[name]
    return Field(default, ge=r.lo, le=r.hi, allow_inf_nan=False if not r.integer else None,
                 description=f"{DESCRIPTIONS[name]} ({r.span()}{'' if default is None else f', default {default}'}).")


# ---- messages and tools ------------------------------------------------------------------------------------------
class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: Str = Field(description="A data URI (data:image/png;base64,...). HTTP URLs are not fetched.")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: Str | None = None
    image_url: ImageURL | Str | None = None


class MessageToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Str
    arguments: Str | dict[str, Any] | None = None


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Str | None = Field(None, description="9 alphanumerics; other ids are mapped within the request")
    type: Literal["function"] = "function"
    function: MessageToolCallFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[ContentPart] | ContentPart | None = Field(
        None, description="A string, or text / image_url parts (user messages only carry images)")
    name: Str | None = None
    tool_calls: list[MessageToolCall | MessageToolCallFunction] | None = Field(
        None, description="Assistant messages: the calls it made (OpenAI's shape, or Workers' {name, arguments})")
    tool_call_id: Str | None = Field(None, description="Tool messages: the call this result answers")
    prefix: Bool | None = Field(None, description="Mistral: a last assistant message the model continues")


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: Str
    description: Str | None = None
    parameters: dict[str, Any] | None = Field(None, description="A JSON schema object")


class OpenAITool(BaseModel):
    type: Literal["function"]
    function: FunctionDef


Tool = Union[OpenAITool, FunctionDef]


class NamedFunction(BaseModel):
    name: Str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"      # Mistral's may leave it out
    function: NamedFunction


ToolChoice = Union[Literal["auto", "none", "required", "any"], NamedToolChoice]    # "any": Mistral's "required"


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    # checked (and worded) with the schema it carries, in server/structured.py
    type: Str = Field(json_schema_extra={"enum": ["text", "json_object", "json_schema"]})
    json_schema: dict[str, Any] | None = Field(
        None, description="OpenAI's {name, schema, strict} wrapper, or (Workers AI) the bare JSON schema")


# ---- Workers AI: POST /client/v4/accounts/{account_id}/ai/run/{model} -------------------------------------------
def _workers_content(v):
    """The hosted binding's strict shape: content is never null, images are data URIs only."""
    if v is None:
        raise PydanticCustomError("bad_input", "must be a string or an array of parts, not null (send \"\" for an "
                                               "assistant message that only calls tools)")
    parts = [v] if isinstance(v, dict) else v if isinstance(v, list) else []
    if not isinstance(v, (str, list, dict)):
        raise PydanticCustomError("type_mismatch", "expected a string or an array")
    for part in parts:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise PydanticCustomError("bad_input", "each part must be an object with a 'type'")
        if part["type"] == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url.startswith("data:"):
                raise PydanticCustomError("bad_input", "image_url/url must be a data URI (data:image/...;base64,"
                                                       "...); HTTP URLs are not accepted")
    return v


class WorkersMessage(Message):
    content: Annotated[Str | list[ContentPart] | ContentPart, BeforeValidator(_workers_content)] = Field(
        description="A string, an array of text / image_url parts, or one part; never null")


# Fields that mean something on our /v1 routes but that the Workers route does not implement: refused there.
WORKERS_REFUSED = ("stop", "n", "logprobs", "top_logprobs", "logit_bias", "max_completion_tokens", "echo",
                   "stop_token_ids", "best_of", "suffix", "prompt_logprobs", "min_p")


class WorkersOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    rejectIfBusy: Bool | None = Field(None, description="Answer 429 / 3040 instead of queueing")


SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "frequency_penalty",
            "presence_penalty")


def sampling_fields(table: dict[str, Range], name: str) -> type[BaseModel]:
    """The sampling controls both routes share, with one contract's ranges (and SamplingParams' defaults)."""
    fields = {}
    for f in SAMPLING:
        default = getattr(DEFAULTS, f) if f in ("max_tokens", "temperature") else None
        fields[f] = ((Int if table[f].integer else Num) | None, knob(table, f, default))
    return create_model(name, **fields)


class WorkersRun(sampling_fields(WORKERS, "WorkersSampling")):
    """The hosted schema's two branches (exactly one of `prompt` / `messages`) with its ranges and defaults,
    plus documented extensions: `response_format`, `tool_choice`, `ignore_eos`, `min_tokens`."""
    model_config = ConfigDict(extra="allow", title="WorkersRunRequest", json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    prompt: Str | None = Field(None, min_length=1, description="Text prompt (chat template applied unless raw)")
    messages: list[WorkersMessage] | None = Field(None, min_length=1, description="The conversation")
    raw: Bool = Field(False, description="Use `prompt` verbatim, control-token strings parsed (no template)")
    stream: Bool = Field(False, description="Server-sent events instead of one JSON envelope")
    guided_json: dict[str, Any] | None = Field(None, description="JSON schema the answer must match")
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema (bare schema)")
    tools: Annotated[list[Tool], BeforeValidator(_tool_array)] | None = Field(
        None, description="Functions the model may call (messages only)")
    tool_choice: ToolChoice | None = Field(None, description="auto, none, required or a named function")
    ignore_eos: Bool | None = Field(None, description="Extension: keep generating after the end-of-sequence token")
    min_tokens: Int | None = Field(None, ge=0, description="Extension: no end-of-sequence before this many tokens")
    options: WorkersOptions | None = None
    functions: Any = Field(None, description="Refused: this server never runs code; use `tools`")
    lora: Any = Field(None, description="Refused: no LoRA adapters for this model")

    @model_validator(mode="before")
    @classmethod
    def _one_of(cls, data):
        if not isinstance(data, dict):
            return data
        if (data.get("prompt") is None) == (data.get("messages") is None):
            raise PydanticCustomError("one_of", "oneOf at '/' not met: send exactly one of 'prompt' or 'messages'")
        for name in WORKERS_REFUSED:
            if data.get(name) is not None:
                raise PydanticCustomError("refused", "'/{name}' is not supported on the Workers AI route; the "
                                                     "OpenAI-compatible /v1 routes take it", {"name": name})
        if data.get("functions") is not None:
            raise PydanticCustomError("refused", "'/functions' (code run by the hosted platform) is not supported: "
                                                 "this server never executes code; use 'tools'", {"name": "functions"})
        if data.get("lora") is not None:
            raise PydanticCustomError("refused", "'/lora': LoRA adapters are not supported for this model",
                                      {"name": "lora"})
        if data.get("tools") is not None and data.get("prompt") is not None:
            raise PydanticCustomError("refused", "'/tools' needs 'messages' (the chat format), not 'prompt'",
                                      {"name": "tools"})
        return data


# ---- OpenAI: POST /v1/chat/completions, /v1/completions --------------------------------------------------------
# Known OpenAI / vLLM fields this server does not act on: a 400 that says so (not "unrecognized"), unless the
# value is the one that changes nothing.
OPENAI_UNSUPPORTED = {
    "functions": ("functions (use tools)", None), "function_call": ("function_call (use tool_choice)", None),
    "audio": ("audio output", None), "modalities": ("modalities", ["text"]), "prediction": ("predicted outputs", None),
    "web_search_options": ("web search", None), "suffix": ("suffix", None), "best_of": ("best_of", 1),
    "echo": ("echo on chat completions (/v1/completions takes it)", False),
    "min_p": ("min_p", 0), "guided_regex": ("guided_regex", None), "guided_choice": ("guided_choice", None),
    "guided_grammar": ("guided_grammar", None), "use_beam_search": ("beam search", False),
    "safe_prompt": ("safe_prompt (Mistral's safety system prompt)", False),
    "prompt_mode": ("prompt_mode (Mistral's reasoning mode)", None),
}


def _logit_bias(v):
    """OpenAI's map of token ids (JSON keys, so strings) to biases; the range is SamplingParams' to check."""
    if not isinstance(v, dict):
        raise PydanticCustomError("refused", "logit_bias must be an object mapping token ids to biases",
                                  {"name": "logit_bias"})
    out = {}
    for key, value in v.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise PydanticCustomError("refused", "logit_bias keys must be token ids (strings of digits), got "
                                                 "{key}", {"name": "logit_bias", "key": repr(key)})
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PydanticCustomError("refused", "logit_bias values must be numbers, got {value}",
                                      {"name": "logit_bias", "value": repr(value)})
        out[int(key)] = value
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: Bool | None = Field(None, description="A last chunk with the usage and no choices")


Stop = Union[Annotated[Str, Field(min_length=1)], Annotated[list[Annotated[Str, Field(min_length=1)]],
                                                            Field(max_length=MAX_STOP)]]


class _OpenAIBase(sampling_fields(OPENAI, "OpenAISampling")):
    model_config = ConfigDict(extra="forbid")
    model: Str | None = Field(None, description="A served model name (GET /v1/models)")
    stream: Bool = False
    stream_options: StreamOptions | None = None
    n: Int | None = knob(OPENAI, "n")
    stop: Stop | None = Field(None, description=f"Up to {MAX_STOP} strings that end the answer")
    min_tokens: Int | None = knob(OPENAI, "min_tokens")
    ignore_eos: Bool | None = Field(None, description="vLLM: keep generating after the end-of-sequence token")
    guided_json: dict[str, Any] | None = Field(None, description="JSON schema the answer must match")
    response_format: ResponseFormat | None = None
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    reasoning_effort: Any = None
    safety_identifier: Any = None
    prompt_cache_key: Any = None
    options: dict[str, Any] | None = Field(None, description="Workers AI options (rejectIfBusy)")
    logit_bias: Annotated[dict[int, float], BeforeValidator(_logit_bias)] | None = Field(
        None, description="Token id (a string) -> bias added to its logit before sampling "
                          f"({OPENAI_LOGIT_BIAS.span()}); logprobs stay the model's own")
    prompt_logprobs: Int | None = knob(OPENAI, "prompt_logprobs")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data):
        if isinstance(data, dict):
            for key, (what, noop) in OPENAI_UNSUPPORTED.items():
                if key in data and key not in cls.model_fields:
                    if data[key] not in (None, noop):
                        raise PydanticCustomError("refused", "{what} is not supported by this server",
                                                  {"name": key, "what": what})
                    data = {k: v for k, v in data.items() if k != key}     # a value that changes nothing
        return data

    @model_validator(mode="after")
    def _min_tokens(self):
        if self.min_tokens is not None and self.min_tokens > self.max_tokens_value:
            raise PydanticCustomError("range", "min_tokens must be <= max_tokens ({hi}), got {v}",
                                      {"name": "min_tokens", "hi": self.max_tokens_value, "v": self.min_tokens})
        return self

    @property
    def max_tokens_value(self) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULTS.max_tokens


class ChatCompletionRequest(_OpenAIBase):
    model_config = ConfigDict(extra="forbid", title="ChatCompletionRequest")
    messages: list[Message] = Field(min_length=1, description="The conversation")
    max_completion_tokens: Int | None = knob(OPENAI, "max_completion_tokens")
    logprobs: Bool | None = Field(None, description="Return the chosen tokens' logprobs")
    top_logprobs: Int | None = knob(OPENAI, "top_logprobs")
    tools: Annotated[list[Tool], BeforeValidator(_tool_array)] | None = Field(None, description="Functions the model "
                                                                                            "may call")
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: Bool | None = Field(None, description="Allow several calls in one answer (default true)")
    random_seed: Int | None = Field(None, ge=OPENAI["seed"].lo, le=OPENAI["seed"].hi,
                                    description="Mistral's name for seed")

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("refused", "top_logprobs requires logprobs: true", {"name": "top_logprobs"})
        if None not in (self.seed, self.random_seed) and self.seed != self.random_seed:
            raise PydanticCustomError("refused", "seed and random_seed (Mistral's name for it) differ",
                                      {"name": "random_seed"})
        return self

    @property
    def seed_value(self) -> int | None:
        return self.seed if self.seed is not None else self.random_seed

    @property
    def max_tokens_value(self) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_tokens_value


TokenIds = Annotated[list[Annotated[Int, Field(ge=0)]], Field(min_length=1)]
CompletionPrompt = Union[Annotated[Str, Field(min_length=1)],
                         Annotated[list[Annotated[Str, Field(min_length=1)]], Field(min_length=1,
                                                                                  max_length=MAX_PROMPTS)],
                         TokenIds, Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]]
ECHO_MAX_TOKENS = Range(0, OPENAI["max_tokens"].hi, True)


class CompletionRequest(_OpenAIBase):
    model_config = ConfigDict(extra="forbid", title="CompletionRequest")
    prompt: CompletionPrompt = Field(description=f"A text, up to {MAX_PROMPTS} texts, token ids (used verbatim: "
                                                 "no BOS added), or lists of token ids; `<s>` (BOS) is put before a "
                                                 "text that does not start with it")
    max_tokens: Int | None = Field(DEFAULTS.max_tokens, ge=ECHO_MAX_TOKENS.lo, le=ECHO_MAX_TOKENS.hi, description=(
        f"Tokens to generate at most ({ECHO_MAX_TOKENS.span()}, default {DEFAULTS.max_tokens}; 0 only with echo: "
        "the prompt is scored, nothing generated)."))
    logprobs: Int | None = knob(OPENAI, "logprobs")
    echo: Bool | None = Field(None, description="Each choice's text starts with its prompt (and its logprobs "
                                                "with the prompt tokens', the first null)")

    @model_validator(mode="before")
    @classmethod
    def _prompt_shape(cls, data):
        p = data.get("prompt") if isinstance(data, dict) else None
        if isinstance(p, list) and p:
            kinds = {"ids" if isinstance(x, list) else type(x).__name__ for x in p}
            if len(kinds) > 1 or not kinds <= {"str", "int", "ids"}:
                raise PydanticCustomError("refused", "prompt must be a string, a list of strings, a list of token "
                                                     "ids or a list of token-id lists (not a mix)", {"name": "prompt"})
        return data

    @model_validator(mode="after")
    def _echo(self):
        if self.max_tokens == 0 and not self.echo:
            raise PydanticCustomError("refused", "max_tokens 0 generates nothing: it needs echo: true (a prompt "
                                                 "only scored)", {"name": "max_tokens"})
        return self

    @property
    def prompts(self) -> list:
        """The prompts as a list: texts and token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# bodies above this size are parsed in a worker thread: tens of milliseconds would stall every stream
_THREAD_PARSE_BYTES = 256 * 1024


async def parse(request, model: type[BaseModel], openai: bool) -> tuple[BaseModel, dict]:
    """The body as JSON whatever its content-type (curl's -d sends form-urlencoded), validated by `model`.
    Returns the model and the raw object (messages and schemas reach the engine exactly as the client sent
    them). The body's size was bounded while it streamed in (server/body_limit.py); its nesting depth is
    bounded here, before anything recurses into it."""
    raw = await request.body()
    if not raw:
        raise bad_input("the request body is empty; send a JSON object")
    depth = request.app.state.server.settings.limits.max_json_depth
    body = await asyncio.to_thread(load_json, raw, depth) if len(raw) > _THREAD_PARSE_BYTES else \
        load_json(raw, depth)
    if not isinstance(body, dict):
        raise bad_input("the request body must be a JSON object")
    try:
        return model.model_validate(body), body
    except ValidationError as e:
        raise validation_error(e, openai) from None


def load_json(raw: bytes, max_depth: int):
    """json.loads, with nesting deeper than `max_depth` a 400 (never a RecursionError, in the decoder or in
    whatever walks the value later)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        value = None
    except ValueError as e:
        raise bad_input(f"the request body is not valid JSON ({e})") from None
    else:
        if json_depth(value, max_depth) <= max_depth:
            return value
    raise bad_input(f"the request body nests JSON deeper than {max_depth} levels (--max-json-depth)")


def json_depth(value, limit: int) -> int:
    """Nesting depth of objects and arrays (a flat object is 1), counted without recursion; stops counting
    once past `limit`."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else None
        if children is None:
            continue
        deepest = max(deepest, d)
        if deepest > limit:
            break
        stack.extend((c, d + 1) for c in children if isinstance(c, (dict, list)))
    return deepest
