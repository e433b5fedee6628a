"""The clients people point at a local server, unmodified, against a real server process on the tiny
random-weight checkpoint: the `openai`, `mistralai` and `cloudflare` SDKs, LangChain's ChatOpenAI and
instructor. Random weights answer nonsense, but every structured answer is held to its schema by the grammar,
so each client's own parsing must succeed. (lm-eval: tests/test_lm_eval.py.)"""

from __future__ import annotations

import json
import re
from typing import Literal

import cloudflare
import instructor
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from mistralai.client import Mistral
from pydantic import BaseModel, Field
from server_fixture import start_server, tiny_engine

from server.config import CLOUDFLARE_MODEL, MISTRAL_MODEL, ServerSettings

pytestmark = pytest.mark.usefixtures("drained")   # after each test using `live`: idle engine, whole pool

KEY = "client-key"
CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Weather(BaseModel):
    """Current weather in a city"""
    city: str = Field(max_length=8)
    unit: Literal["c", "f"]


WEATHER = {"type": "function", "function": {"name": "Weather", "description": "Current weather in a city",
                                            "parameters": Weather.model_json_schema()}}


@pytest.fixture(scope="module")
def live(tiny_dir):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings(api_key=KEY))
    yield srv
    srv.stop()


@pytest.fixture
def oai(live):
    return openai.OpenAI(api_key=KEY, base_url=f"{live.url}/v1", max_retries=0)


def weather(arguments: str) -> Weather:
    return Weather.model_validate_json(arguments)


# ---- openai ----------------------------------------------------------------------------------------------------
def test_openai_streamed_tool_calls_and_named_choice(oai):
    named = {"type": "function", "function": {"name": "Weather"}}
    kw = {"model": CLOUDFLARE_MODEL, "messages": ASK, "tools": [WEATHER], "temperature": 1.0, "max_tokens": 80}
    for seed in (1, 2):
        whole = oai.chat.completions.create(**kw, tool_choice=named, seed=seed)
        (call,) = whole.choices[0].message.tool_calls          # named: exactly one call
        assert whole.choices[0].finish_reason == "tool_calls" and CALL_ID.fullmatch(call.id)
        weather(call.function.arguments)
        with oai.chat.completions.stream(**kw, tool_choice=named, seed=seed) as stream:
            fragments = [e.arguments_delta for e in stream if e.type == "tool_calls.function.arguments.delta"]
            final = stream.get_final_completion()
        (streamed,) = final.choices[0].message.tool_calls
        assert streamed.function.name == "Weather" and streamed.function.arguments == call.function.arguments
        assert "".join(fragments) == call.function.arguments          # nothing lost, the opening {" included


def test_openai_n_and_logit_bias(oai):
    r = oai.chat.completions.create(model=CLOUDFLARE_MODEL, messages=ASK, n=3, max_tokens=4, temperature=1.0, seed=5)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens == 12
    assert len({c.message.content for c in r.choices}) == 3
    comma = 1044
    biased = oai.chat.completions.create(model=CLOUDFLARE_MODEL, messages=ASK, max_tokens=3, temperature=0,
                                         logit_bias={str(comma): 100})
    assert biased.choices[0].message.content == ",,,"
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=CLOUDFLARE_MODEL, messages=ASK, logit_bias={"x": 1})
    assert e.value.body["param"] == "logit_bias"


def test_openai_completions_list_and_token_prompts_with_echo(oai, live):
    tok = live.engine.tokenizer
    ids = [[22177, 1044], [1, 2606, 3265, 4391]]
    r = oai.completions.create(model=CLOUDFLARE_MODEL, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.prompt_tokens == 6
    for c, p in zip(r.choices, ids):
        assert c.logprobs.tokens[:len(p)] == [tok.token_bytes(t).decode() for t in p]
        assert c.logprobs.token_logprobs[0] is None and len(c.logprobs.token_logprobs) == len(p) + 1
        assert c.text.startswith(tok.decode(p, skip_special=False))
    texts = oai.completions.create(model=CLOUDFLARE_MODEL, prompt=["Hello", "Bonjour"], n=2, max_tokens=2,
                                   temperature=1.0, seed=3)
    assert [c.index for c in texts.choices] == [0, 1, 2, 3] and texts.usage.completion_tokens == 8


# ---- mistralai -------------------------------------------------------------------------------------------------
@pytest.fixture
def mistral(live):
    return Mistral(api_key=KEY, server_url=live.url)


def test_mistral_sdk_streams_tool_calls_with_any_and_usage(mistral):
    for seed in (1, 2):
        calls, usage, finish = [], None, None
        for event in mistral.chat.stream(model=MISTRAL_MODEL, messages=ASK, tools=[WEATHER], tool_choice="any",
                                         random_seed=seed, temperature=1.0, max_tokens=80):
            chunk = event.data
            calls += chunk.choices[0].delta.tool_calls or [] if chunk.choices else []
            finish = chunk.choices[0].finish_reason or finish if chunk.choices else finish
            usage = chunk.usage or usage
        assert finish == "tool_calls" and calls and usage.completion_tokens > 0 and usage.prompt_tokens > 0
        for call in calls:          # whole calls: name and complete arguments in one delta
            assert call.function.name == "Weather" and CALL_ID.fullmatch(call.id)
            weather(call.function.arguments)
        again = mistral.chat.complete(model=MISTRAL_MODEL, messages=ASK, tools=[WEATHER], tool_choice="any",
                                      random_seed=seed, temperature=1.0, max_tokens=80)
        assert [c.function.arguments for c in again.choices[0].message.tool_calls] == \
            [c.function.arguments for c in calls]                 # random_seed: the same answer


def test_mistral_sdk_models_and_n(mistral, live):
    listed = mistral.models.list()
    assert [m.id for m in listed.data] == list(live.settings.model_names)
    card = mistral.models.retrieve(model_id=MISTRAL_MODEL)
    assert card.id == MISTRAL_MODEL and card.capabilities.function_calling and card.capabilities.vision
    assert card.max_context_length == live.engine.config.max_model_len
    r = mistral.chat.complete(model=MISTRAL_MODEL, messages=ASK, n=2, max_tokens=3, random_seed=4, temperature=1.0)
    assert len(r.choices) == 2 and r.usage.completion_tokens == 6


# ---- cloudflare ------------------------------------------------------------------------------------------------
def test_cloudflare_sdk_tools_and_tool_choice(live):
    cf = cloudflare.Cloudflare(api_token=KEY, base_url=f"{live.url}/client/v4", max_retries=0)
    tools = [WEATHER["function"]]
    for seed in (7, 8):
        res = cf.ai.run(CLOUDFLARE_MODEL, account_id="local", messages=ASK, tools=tools, max_tokens=80,
                        temperature=1.0, seed=seed,
                        extra_body={"tool_choice": {"type": "function", "function": {"name": "Weather"}}})
        (call,) = res["tool_calls"]                 # a named choice: exactly one call
        assert res["response"] == "" and call["name"] == "Weather" and Weather.model_validate(call["arguments"])
    res = cf.ai.run(CLOUDFLARE_MODEL, account_id="local", messages=ASK, tools=tools, max_tokens=5, temperature=0,
                    extra_body={"tool_choice": "none"})
    assert res["tool_calls"] == [] and res["response"]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    res = cf.ai.run(CLOUDFLARE_MODEL, account_id="local", messages=ASK, max_tokens=20, temperature=0,
                    extra_body={"guided_json": schema})
    assert isinstance(res["response"]["ok"], bool)


# ---- LangChain -------------------------------------------------------------------------------------------------
@pytest.fixture
def chat(live):
    return ChatOpenAI(model=CLOUDFLARE_MODEL, base_url=f"{live.url}/v1", api_key=KEY, temperature=1.0,
                      max_tokens=80, seed=3, max_retries=0)


def test_langchain_bind_tools_required_and_a_round_trip(chat):
    @tool
    def get_weather(city: str = Field(max_length=8), unit: Literal["c", "f"] = "c") -> str:
        """Current weather in a city."""
        return json.dumps({"city": city, "temperature": 21, "unit": unit})

    llm = chat.bind_tools([get_weather], tool_choice="required")
    history = [HumanMessage("What is the weather in Paris?")]
    first = llm.invoke(history)
    assert first.tool_calls and first.response_metadata["finish_reason"] == "tool_calls"
    history.append(first)
    for call in first.tool_calls:
        assert call["name"] == "get_weather" and CALL_ID.fullmatch(call["id"])
        history.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
    final = chat.bind(max_tokens=8).invoke(history)
    assert isinstance(final.content, str) and not final.tool_calls


def test_langchain_with_structured_output(chat):
    for method in ("json_schema", "function_calling"):
        out = chat.with_structured_output(Weather, method=method).invoke("Weather in Paris?")
        assert isinstance(out, Weather), method


# ---- instructor ------------------------------------------------------------------------------------------------
def test_instructor_tools_mode_and_partial_streaming(oai):
    client = instructor.from_openai(oai, mode=instructor.Mode.TOOLS)
    kw = {"model": CLOUDFLARE_MODEL, "messages": ASK, "temperature": 1.0, "max_tokens": 80, "seed": 8}
    whole = client.chat.completions.create(response_model=Weather, max_retries=0, **kw)
    assert isinstance(whole, Weather)
    partials = list(client.chat.completions.create_partial(response_model=Weather, max_retries=0, **kw))
    assert len(partials) > 1 and Weather.model_validate(partials[-1].model_dump())
    assert any(p.city is None for p in partials[:-1])          # really partial on the way
