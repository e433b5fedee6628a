"""Structured output and function calling end to end, on the tiny random-weight checkpoint (CPU).

Random weights sample more or less anything the grammar allows, which makes them a good fuzzer: at temperature
1 every answer that finishes with `stop` must validate against its JSON schema, on both routes, streamed or not;
and for the schemas whose strings and arrays are bounded, nearly every answer must finish at all. Requests are
sent concurrently so the engine batches them (the whole sweep is a few engine batches, not hundreds of runs).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass

import http_util
import openai
import pytest
from http_util import Reply, favour_token, streamed_calls
from jsonschema.validators import validator_for
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from server_fixture import start_server, tiny_engine

from engine.guided import TOOL_CALLS_ID
from engine.sampling_params import SamplingParams
from engine.tool_calls import _hash_id
from server.config import CLOUDFLARE_MODEL, ServerSettings
from server.structured import parse_tools

pytestmark = pytest.mark.usefixtures("drained")   # after each test using `live`: idle engine, whole pool

TOKEN = "test-token"
RUN = f"/client/v4/accounts/acct/ai/run/{CLOUDFLARE_MODEL}"
CHAT = "/v1/chat/completions"
JSON_MODE_CUT = "JSON Mode couldn't be met"
CALL_ID = re.compile(r"[A-Za-z0-9]{9}")


# ---- the schema table -----------------------------------------------------------------------------------------
def obj(props: dict, required: list | None = None, **kw) -> dict:
    """A closed object (additionalProperties: false); every property required unless told otherwise."""
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False, **kw}


def integer(lo: int, hi: int, **kw) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi, **kw}


def string(max_length: int, **kw) -> dict:
    return {"type": "string", "maxLength": max_length, **kw}


def fmt(name: str, **kw) -> dict:
    return {"type": "string", "format": name, **kw}


BOOL = {"type": "boolean"}
POINT_DEFS = {"point": obj({"x": integer(0, 9), "y": integer(0, 9)})}

# (id, bounded, schema). bounded: every string and array has a limit (maxLength / maxItems / enum / const /
# format / a pattern of bounded repetition), numbers have a range and nesting is finite, so an answer cannot
# run on forever and nearly all of them must finish with `stop`. The others may run into max_tokens on random
# weights; whatever of them finishes must still validate.
SCHEMAS = [
    ("flat-person", True, obj({"name": string(12), "age": integer(0, 120), "admin": BOOL})),
    ("enum-top", True, {"type": "string", "enum": ["red", "green", "blue"]}),
    ("int-range-top", True, integer(-50, 50)),
    ("bool-top", True, BOOL),
    ("null-top", True, {"type": "null"}),
    ("const-top", True, {"const": "fixed-value"}),
    ("const-prop", True, obj({"kind": {"const": "point"}, "x": integer(0, 9), "y": integer(0, 9)})),
    ("nested-address", True, obj({"user": obj({"name": string(10), "address": obj(
        {"city": string(10), "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})})),
    ("deep-nest", True, obj({"a": obj({"b": obj({"c": obj({"d": obj({"e": integer(0, 99)})})})})})),
    ("array-tags", True, obj({"tags": {"type": "array", "items": string(6), "minItems": 1, "maxItems": 3}})),
    ("array-top", True, {"type": "array", "items": integer(0, 99), "minItems": 2, "maxItems": 4}),
    ("array-exact", True, obj({"rgb": {"type": "array", "items": integer(0, 255), "minItems": 3, "maxItems": 3}})),
    ("array-objects", True, obj({"items": {"type": "array", "maxItems": 3,
                                           "items": obj({"id": integer(1, 99), "ok": BOOL})}})),
    ("matrix", True, obj({"m": {"type": "array", "maxItems": 3, "items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": integer(0, 9)}}})),
    ("enum-array", True, obj({"days": {"type": "array", "minItems": 1, "maxItems": 7, "items": {
        "enum": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]}}})),
    ("enum-mixed", True, {"enum": [1, "two", None, True, 3.5]}),
    ("enum-objects", True, {"enum": [{"a": 1}, {"b": [2, 3]}, "plain"]}),
    ("int-enum", True, obj({"level": {"type": "integer", "enum": [1, 2, 3]}})),
    ("nullable-type", True, obj({"note": {"type": ["string", "null"], "maxLength": 8}})),
    ("nullable-anyof", True, obj({"value": {"anyOf": [integer(0, 9), {"type": "null"}]}})),
    ("multi-type", True, obj({"v": {"type": ["integer", "boolean"], "minimum": 0, "maximum": 9}})),
    ("anyof-shapes", True, obj({"shape": {"anyOf": [
        obj({"kind": {"const": "circle"}, "r": integer(1, 9)}),
        obj({"kind": {"const": "square"}, "side": integer(1, 9)})]}})),
    ("oneof-str-int", True, obj({"id": {"oneOf": [string(4, pattern="^[a-z]+$"), integer(0, 9)]}})),
    ("allof-merge", True, {"allOf": [{**obj({"a": integer(0, 9)}), "additionalProperties": True},
                                     {"properties": {"b": BOOL}, "required": ["b"]}],
                           "properties": {"a": {}, "b": {}}, "additionalProperties": False}),
    ("required-subset", True, obj({"a": integer(0, 9), "b": string(5), "c": BOOL}, required=["a"])),
    ("all-optional", True, obj({"x": BOOL, "y": integer(0, 3)}, required=[])),
    ("empty-object", True, obj({})),
    ("bool-flags", True, obj({k: BOOL for k in ("read", "write", "exec", "sticky")})),
    ("string-min-max", True, obj({"s": {"type": "string", "minLength": 2, "maxLength": 5}})),
    ("exclusive-min", True, obj({"p": {"type": "integer", "exclusiveMinimum": 0, "maximum": 10}})),
    ("exclusive-max", True, obj({"p": {"type": "integer", "minimum": -5, "exclusiveMaximum": 5}})),
    ("multiple-of", True, obj({"n": integer(0, 100, multipleOf=5)})),
    ("negative-range", True, obj({"t": integer(-273, -1)})),
    ("number-range", True, obj({"p": {"type": "number", "minimum": 0, "maximum": 1}})),
    ("number-exclusive", True, obj({"t": {"type": "number", "exclusiveMinimum": -10, "exclusiveMaximum": 40}})),
    ("date", True, obj({"day": fmt("date")})),
    ("date-range", True, obj({"from": fmt("date"), "to": fmt("date")})),
    ("date-time", True, obj({"at": fmt("date-time")})),
    ("time", True, obj({"at": fmt("time")})),
    ("uuid", True, obj({"id": fmt("uuid")})),
    ("uuid-list", True, obj({"ids": {"type": "array", "maxItems": 2, "items": fmt("uuid")}})),
    ("ipv4", True, obj({"ip": fmt("ipv4")})),
    ("ipv6", True, obj({"ip": fmt("ipv6")})),
    ("email", True, obj({"email": fmt("email", maxLength=40)})),
    ("pattern-code", True, obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}})),
    ("pattern-hex", True, obj({"color": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}})),
    ("pattern-phone", True, obj({"phone": {"type": "string", "pattern": "^\\+[1-9][0-9]{7,12}$"}})),
    ("pattern-alternatives", True, obj({"size": {"type": "string", "pattern": "^(S|M|L|X{1,3}L)$"}})),
    ("defs-ref", True, {"$defs": POINT_DEFS, **obj({"a": {"$ref": "#/$defs/point"},
                                                    "b": {"$ref": "#/$defs/point"}})}),
    ("defs-nested-ref", True, {"$defs": {"city": string(8), "addr": obj({"city": {"$ref": "#/$defs/city"}})},
                               **obj({"home": {"$ref": "#/$defs/addr"}, "work": {"$ref": "#/$defs/addr"}})}),
    ("tuple-prefix-items", True, {"type": "array", "prefixItems": [integer(0, 9), {"enum": ["a", "b"]}, BOOL],
                                  "items": False, "minItems": 3}),
    ("annotated", True, obj({"city": string(10, description="The city", title="City"),
                             "unit": {"enum": ["c", "f"], "default": "c", "description": "Unit"}},
                            title="Weather query", description="What to look up")),
    ("order", True, obj({"id": fmt("uuid"), "placed": fmt("date-time"), "status": {"enum": ["new", "paid"]},
                         "lines": {"type": "array", "minItems": 1, "maxItems": 2, "items": obj(
                             {"sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                              "qty": integer(1, 5), "gift": {"type": ["boolean", "null"]}})}})),
    # unbounded: free strings, open objects, numbers without a range, recursion
    ("free-string", False, obj({"text": {"type": "string"}})),
    ("min-length-only", False, obj({"s": {"type": "string", "minLength": 3}})),
    ("any-object", False, {"type": "object"}),
    ("unbounded-int", False, obj({"n": {"type": "integer"}})),
    ("unbounded-number", False, obj({"x": {"type": "number"}})),
    ("array-unbounded", False, obj({"words": {"type": "array", "items": string(5)}})),
    ("open-object", False, {"type": "object", "properties": {"a": integer(0, 9)}, "required": ["a"]}),
    ("pattern-properties", False, {"type": "object", "patternProperties": {"^x_": integer(0, 9)},
                                   "additionalProperties": False}),
    ("recursive-tree", False, {"$defs": {"node": obj({"v": integer(0, 9), "kids": {
        "type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}, required=["v"])},
        "$ref": "#/$defs/node"}),
    ("hostname", False, obj({"host": fmt("hostname")})),
    ("uri", False, obj({"link": fmt("uri")})),
    ("duration", False, obj({"d": fmt("duration")})),
    ("pattern-plus", False, obj({"word": {"type": "string", "pattern": "^[a-z]+$"}})),
]
SCHEMA_BY_ID = {sid: schema for sid, _, schema in SCHEMAS}

# schemas llguidance cannot compile (or that are not schemas at all): a 400 naming the problem
INVALID_SCHEMAS = [
    ("type-typo", {"type": "object", "properties": {"a": {"type": "strin"}}}, "'strin' is not valid"),
    ("not", {"type": "object", "not": {"required": ["a"]}}, 'Unimplemented keys: ["not"]'),
    ("if-then", {"type": "string", "if": {"maxLength": 2}, "then": {"pattern": "^a"}}, 'Unimplemented keys: ["if", "then"]'),
    ("unique-items", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, 'Unimplemented keys: ["uniqueItems"]'),
    ("look-around", {"type": "string", "pattern": "^(?=a)[a-z]+$"}, "look-around"),
    ("min-above-max", {"type": "integer", "minimum": 5, "maximum": 3}, "minimum (5) is greater than maximum"),
    ("missing-ref", {"$ref": "#/$defs/nowhere"}, "Pointer '/$defs/nowhere' does not exist"),
    ("unknown-format", {"type": "string", "format": "colour"}, "Unknown format: colour"),
    ("required-undeclared", obj({"a": integer(0, 9)}, required=["b"]), "required property 'b' is unsatisfiable"),
]


def validator(schema):
    """The schema's own draft (2020-12 by default), with that draft's format checker (date, date-time, time,
    email, uuid, ipv4, ipv6 are checked; the default FormatChecker() would check `time` as draft 3)."""
    cls = validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def test_schema_table():
    assert len(SCHEMAS) >= 50 and len(SCHEMA_BY_ID) == len(SCHEMAS)
    assert sum(bounded for _, bounded, _ in SCHEMAS) >= 45
    for sid, _, schema in SCHEMAS:
        validator_for(schema).check_schema(schema)


FORMAT_CASES = {   # RFC 3339 as JSON Schema validators check it: real calendar days, no year 0, no second 60
    "date": ["2024-02-29", "2023-02-28", "2000-02-29", "0001-01-01", "2023-12-31", "2023-02-29", "1900-02-29",
             "2023-04-31", "0000-06-15", "2023-13-01", "2023-1-01", "20230101"],
    "time": ["23:59:59Z", "00:00:00+05:30", "12:30:00.123456-08:00", "23:59:60Z", "24:00:00Z", "12:00:00",
             "12:00:00+24:00", "7:00:00Z"],
    "date-time": ["2024-02-29T23:59:59Z", "1999-12-31T00:00:00.5+01:00", "2023-02-29T10:00:00Z",
                  "2023-06-30T23:59:60Z", "0000-01-01T00:00:00Z", "2023-06-30 10:00:00Z", "2023-06-30T10:00:00"],
}


def grammar_accepts(llm, grammar: str, text: str) -> bool:
    matcher = llm.engine.grammars.matcher(grammar)
    return matcher.consume_tokens(llm.tokenizer.encode_raw(text)) and matcher.is_accepting()


@pytest.mark.parametrize("name", list(FORMAT_CASES))
def test_date_and_time_formats_accept_exactly_what_validators_accept(tiny_llm, name):
    schema = {"type": "string", "format": name}
    grammar = tiny_llm.engine.grammars.json_schema(schema)
    for value in FORMAT_CASES[name]:
        assert grammar_accepts(tiny_llm, grammar, json.dumps(value)) == validator(schema).is_valid(value), value
    tool_grammar = tiny_llm.engine.grammars.tool_calls([{"name": "f", "parameters": obj({"v": schema})}], "required")
    for value in FORMAT_CASES[name]:        # tool arguments get the same formats
        text = "[TOOL_CALLS]" + json.dumps([{"name": "f", "arguments": {"v": value}}], separators=(",", ":"))
        assert grammar_accepts(tiny_llm, tool_grammar, text) == validator(schema).is_valid(value), value


# ---- the server and HTTP helpers ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tiny_dir):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings(api_key=TOKEN))
    yield srv
    srv.stop()


def post_all(srv, jobs: list[tuple[str, dict]]) -> list[Reply]:
    return http_util.post_all(srv, jobs, TOKEN)


def post(srv, path: str, body: dict) -> Reply:
    return post_all(srv, [(path, body)])[0]


def cf_error(reply: Reply, status: int = 400, code: int = 5006) -> str:
    assert reply.status == status, reply.text
    body = reply.json()
    assert body["success"] is False and len(body["errors"]) == 1 and body["errors"][0]["code"] == code, body
    return body["errors"][0]["message"]


def oai_error(reply: Reply, status: int = 400) -> dict:
    assert reply.status == status, reply.text
    return reply.json()["error"]


@dataclass
class Answer:
    finish: str             # "stop" or "length" (Workers JSON mode: a 200, or the "couldn't be met" error)
    text: str               # the JSON text as generated
    value: object = None    # the parsed answer when finished


def json_answer(route: str, stream: bool, reply: Reply) -> Answer:
    """One JSON-mode reply of either route, streamed or not, as (finish, text, value); checks its shape."""
    if route == "workers" and not stream:
        if reply.status == 400:
            assert JSON_MODE_CUT in cf_error(reply), reply.text
            return Answer("length", "")
        assert reply.status == 200, reply.text
        result = reply.json()["result"]
        assert set(result) == {"response", "tool_calls", "usage"} and result["tool_calls"] == []
        # JSON mode: the value itself (an object stays an object), never its text; as generated, verbatim
        head = '{"result":{"response":'
        assert reply.text.startswith(head), reply.text
        value, end = json.JSONDecoder().raw_decode(reply.text, len(head))
        assert value == result["response"]
        return Answer("stop", reply.text[len(head):end], result["response"])
    assert reply.status == 200, reply.text
    events = reply.events() if stream else None
    if route == "workers":
        if events[-1] != "[DONE]":
            assert JSON_MODE_CUT in events[-1]["errors"][0]["message"], events[-1]
            return Answer("length", "".join(e["response"] for e in events[:-1]))
        *content, usage, _ = events
        assert set(usage) == {"response", "usage"} and usage["response"] == ""
        assert all(e["tool_calls"] == [] for e in content)
        text = "".join(e["response"] for e in content)
        return Answer("stop", text, json.loads(text))
    if not stream:
        choice = reply.json()["choices"][0]
        assert choice["message"]["tool_calls"] is None
        text, finish = choice["message"]["content"], choice["finish_reason"]
    else:
        assert events[-1] == "[DONE]"
        chunks = [e["choices"][0] for e in events[:-1]]
        text = "".join(c["delta"].get("content", "") for c in chunks)
        finish = chunks[-1]["finish_reason"]
        assert all(c["finish_reason"] is None for c in chunks[:-1])
    assert finish in ("stop", "length"), finish
    return Answer(finish, text, json.loads(text) if finish == "stop" else None)


# ---- 1. the schema sweep: both routes, streamed and not, at temperature 1 -------------------------------------
SWEEP_MODES = [(route, how, stream) for route, how in (("workers", "guided_json"), ("workers", "response_format"),
                                                       ("openai", "json_schema")) for stream in (False, True)]
OBJECT_MODES = [(route, "json_object", stream) for route in ("workers", "openai") for stream in (False, True)]
SEEDS_PER_SCHEMA = 1
BOUNDED_MAX_TOKENS = 400
UNBOUNDED_MAX_TOKENS = 64


def mode_id(mode) -> str:
    route, how, stream = mode
    return f"{route}-{how}-{'stream' if stream else 'whole'}"


def json_request(route: str, how: str, stream: bool, sid: str, schema: dict, seed: int, max_tokens: int):
    body = {"messages": [{"role": "user", "content": f"Answer in JSON ({sid}, #{seed})."}],
            "temperature": 1.0, "seed": seed, "max_tokens": max_tokens, "stream": stream}
    if how == "guided_json":
        body["guided_json"] = schema
    elif how == "response_format":                 # Workers AI: the bare schema
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif how == "json_schema":                     # OpenAI's wrapper
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": sid.replace("-", "_"), "schema": schema, "strict": True}}
    else:
        body["response_format"] = {"type": "json_object"}
    return (RUN if route == "workers" else CHAT), body


@pytest.fixture(scope="module")
def sweep(live):
    """{mode: [(schema id, bounded, schema, Answer)]}: every schema, SEEDS_PER_SCHEMA seeds, every mode, plus
    json_object on both routes; all sent at once (the engine batches them)."""
    jobs, keys = [], []
    for m, mode in enumerate(SWEEP_MODES + OBJECT_MODES):
        route, how, stream = mode
        table = SCHEMAS if how != "json_object" else [(f"object-{k}", False, {"type": "object"}) for k in range(8)]
        for k, (sid, bounded, schema) in enumerate(table):
            for s in range(SEEDS_PER_SCHEMA if how != "json_object" else 1):
                seed = 1 + 10_000 * m + 100 * k + s
                jobs.append(json_request(route, how, stream, sid, schema, seed,
                                         BOUNDED_MAX_TOKENS if bounded else UNBOUNDED_MAX_TOKENS))
                keys.append((mode, sid, bounded, schema))
    replies = post_all(live, jobs)
    out = {}
    for (mode, sid, bounded, schema), reply in zip(keys, replies):
        out.setdefault(mode, []).append((sid, bounded, schema, json_answer(mode[0], mode[2], reply)))
    return out


def stop_rate(rows) -> tuple[int, int]:
    bounded = [a for _, b, _, a in rows if b]
    return sum(a.finish == "stop" for a in bounded), len(bounded)


@pytest.mark.parametrize("mode", SWEEP_MODES + OBJECT_MODES, ids=mode_id)
def test_sweep_every_finished_answer_validates(sweep, mode):
    rows = sweep[mode]
    stopped = [(sid, schema, a) for sid, _, schema, a in rows if a.finish == "stop"]
    print(f"\n{mode_id(mode)}: {len(stopped)}/{len(rows)} answers finished, all valid")
    assert stopped, "no answer finished"
    for sid, schema, a in stopped:
        errors = [e.message for e in validator(schema).iter_errors(a.value)]
        assert not errors, f"{sid}: {a.text!r} does not match its schema: {errors}"
        if mode[0] == "workers" and schema.get("type") == "object":
            assert isinstance(a.value, dict), (sid, a.value)
    if mode[0] == "openai":           # a cut answer is never presented as finished
        for sid, _, _, a in rows:
            if a.finish == "length":
                with contextlib.suppress(json.JSONDecodeError):
                    value = json.loads(a.text)
                    assert not validator(SCHEMA_BY_ID.get(sid, {"type": "object"})).is_valid(value), (sid, a.text)


@pytest.mark.parametrize("mode", SWEEP_MODES, ids=mode_id)
def test_sweep_bounded_schemas_finish(sweep, mode):
    stopped, total = stop_rate(sweep[mode])
    print(f"\n{mode_id(mode)}: bounded schemas finished {stopped}/{total} ({stopped / total:.1%}); all schemas "
          f"{sum(a.finish == 'stop' for *_, a in sweep[mode])}/{len(sweep[mode])}")
    assert total == SEEDS_PER_SCHEMA * sum(b for _, b, _ in SCHEMAS)
    assert stopped >= 0.95 * total, [(sid, a.text[:80]) for sid, b, _, a in sweep[mode] if b and a.finish != "stop"]


def test_sweep_answers_vary(sweep):
    """Temperature 1 and varied seeds really explore the grammar: most schemas got several distinct answers."""
    texts = {sid: set() for sid in SCHEMA_BY_ID}
    for mode in SWEEP_MODES:
        for sid, _, _, a in sweep[mode]:
            if a.finish == "stop":
                texts[sid].add(a.text)
    varied = sum(len(t) > 1 for t in texts.values())
    print(f"\n{varied}/{len(texts)} schemas got more than one distinct answer")
    assert varied >= 40, {sid: t for sid, t in texts.items() if len(t) < 2}


@pytest.mark.parametrize("how", ["guided_json", "response_format", "json_schema", "openai_guided_json"])
@pytest.mark.parametrize("sid,schema,problem", INVALID_SCHEMAS, ids=[i[0] for i in INVALID_SCHEMAS])
def test_uncompilable_schema_is_a_400_naming_the_problem(live, how, sid, schema, problem):
    route = "openai" if how in ("json_schema", "openai_guided_json") else "workers"
    path, body = json_request(route, "guided_json" if how == "openai_guided_json" else how, False, sid, schema,
                              1, 8)
    reply = post(live, path, body)
    if route == "workers":
        message = cf_error(reply)
        assert message.startswith("AiError: Bad input: Error: ")
    else:
        err = oai_error(reply)
        assert err["type"] == "invalid_request_error" and err["param"] == "response_format"
        message = err["message"]
    assert problem in message, message


def test_uncompilable_tool_parameters_are_a_400(live):
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "^(?=x)"}}}}}
    for path in (RUN, CHAT):
        reply = post(live, path, {"messages": [{"role": "user", "content": "hi"}], "tools": [tool]})
        message = cf_error(reply) if path == RUN else oai_error(reply)["message"]
        assert "look-around" in message, message


# ---- 2. JSON mode: the object itself, and an explicit error when max_tokens cuts it --------------------------
PERSON = SCHEMA_BY_ID["flat-person"]


def test_workers_json_mode_returns_the_object(live):
    for body_extra in ({"guided_json": PERSON}, {"response_format": {"type": "json_schema", "json_schema": PERSON}},
                       {"response_format": {"type": "json_object"}}):
        reply = post(live, RUN, {"messages": [{"role": "user", "content": "Who?"}], "temperature": 1, "seed": 5,
                                 "max_tokens": 60, **body_extra})
        if "json_object" in json.dumps(body_extra) and reply.status == 400:
            continue              # an open object may run past max_tokens on random weights
        assert reply.status == 200, reply.text
        result = reply.json()["result"]
        assert isinstance(result["response"], dict), result
        assert result["tool_calls"] == [] and result["usage"]["completion_tokens"] > 0
        if "json_object" not in json.dumps(body_extra):
            assert validator(PERSON).is_valid(result["response"]), result


def test_json_mode_cut_by_max_tokens(live):
    msgs = [{"role": "user", "content": "Who?"}]
    base = {"messages": msgs, "temperature": 1, "seed": 9, "max_tokens": 4, "guided_json": PERSON}
    whole, streamed, oai_whole, oai_streamed = post_all(live, [
        (RUN, base), (RUN, {**base, "stream": True}), (CHAT, base), (CHAT, {**base, "stream": True})])
    # Workers: an explicit 400, never a truncated object
    message = cf_error(whole)
    assert JSON_MODE_CUT in message and "max_tokens" in message, message
    # Workers stream: the text so far, then an in-band error event instead of usage and [DONE]
    assert streamed.status == 200
    events = streamed.events()
    assert "[DONE]" not in events and all("usage" not in e for e in events[:-1])
    assert events[-1]["success"] is False and JSON_MODE_CUT in events[-1]["errors"][0]["message"]
    assert events[-1]["errors"][0]["code"] == 5006
    partial = "".join(e["response"] for e in events[:-1])
    assert partial.startswith("{") and not validator(PERSON).is_valid(_try_json(partial))
    # OpenAI: finish_reason "length", the truncated text as it is
    for reply, stream in ((oai_whole, False), (oai_streamed, True)):
        answer = json_answer("openai", stream, reply)
        assert answer.finish == "length" and answer.value is None
        assert answer.text == partial and _try_json(answer.text) is None


def test_workers_passes_out_of_range_numbers_through_verbatim(live):
    """1e999 is valid JSON that no double holds: a JSON-mode answer or tool arguments carrying such a number
    come back as generated (not a 500 from a float that cannot be serialized)."""
    ask = [{"role": "user", "content": "A big number, please."}]
    body = {"messages": ask, "temperature": 1.0, "max_tokens": 64, "guided_json": SCHEMA_BY_ID["unbounded-number"]}
    replies = post_all(live, [(RUN, {**body, "seed": s, "stream": stream}) for s in range(1, 13)
                              for stream in (False, True)])
    huge = 0
    for whole, streamed in zip(replies[::2], replies[1::2]):
        answer = json_answer("workers", True, streamed)
        if answer.finish != "stop":
            assert JSON_MODE_CUT in cf_error(whole)
            continue
        assert whole.status == 200, whole.text
        assert whole.text.startswith('{"result":{"response":' + answer.text + ',"tool_calls":[],'), whole.text
        huge += not math.isfinite(answer.value["x"])
    assert huge, "no answer had a number beyond the double range"

    tool = {"name": "scale", "description": "Scale", "parameters": obj({"x": {"type": "number"}})}
    body = {"messages": ask, "tools": [tool], "temperature": 1.0, "max_tokens": 200}
    with favour_token(live, TOOL_CALLS_ID):
        replies = post_all(live, [(RUN, {**body, "seed": s}) for s in range(1, 17)])
    huge = 0
    for reply in replies:
        if reply.status == 400:
            assert "cut off by max_tokens" in cf_error(reply)
            continue
        assert reply.status == 200, reply.text
        for call in reply.json()["result"]["tool_calls"]:
            assert call["name"] == "scale" and set(call["arguments"]) == {"x"}
            huge += not math.isfinite(call["arguments"]["x"])
    assert huge, "no call had a number beyond the double range"


def _try_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ---- 3. tool calls ------------------------------------------------------------------------------------------
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": string(12), "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
FLIGHT = {"type": "function", "function": {
    "name": "book_flight", "description": "Book a flight",
    "parameters": {"type": "object", "properties": {
        "from": {"type": "string", "pattern": "^[A-Z]{3}$"}, "to": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "date": fmt("date"), "seats": integer(1, 9), "refundable": BOOL},
        "required": ["from", "to", "date", "seats"]}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm",
    "parameters": {"type": "object", "properties": {
        "at": fmt("time"), "days": {"type": "array", "maxItems": 3, "items": {"enum": ["mon", "tue", "wed"]}}},
        "required": ["at"]}}}
TOOLS = [WEATHER, FLIGHT, ALARM]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "Book me a flight and tell me the weather."}]


def check_calls(calls: list[dict], only: str | None = None) -> None:
    """OpenAI tool calls: 9-alphanumeric ids, known names, arguments valid against the tool's parameters."""
    assert calls
    for c in calls:
        assert set(c) == {"id", "type", "function"} and c["type"] == "function"
        assert CALL_ID.fullmatch(c["id"]), c["id"]
        name = c["function"]["name"]
        assert name in TOOL_SCHEMAS and (only is None or name == only), name
        args = json.loads(c["function"]["arguments"])
        assert validator(TOOL_SCHEMAS[name]).is_valid(args), (name, args)


TOOL_CASES = [  # (id, tool_choice, parallel_tool_calls)
    ("required-single", "required", False),
    ("named", {"type": "function", "function": {"name": "book_flight"}}, False),
    ("named-alarm", {"type": "function", "function": {"name": "set_alarm"}}, False),
    ("required-parallel", "required", True),
]


@pytest.fixture(scope="module")
def tool_replies(live):
    """Every case × 6 seeds, each non-streamed and streamed, all at once."""
    jobs, keys = [], []
    for cid, choice, parallel in TOOL_CASES:
        for seed in range(1, 7):
            body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "parallel_tool_calls": parallel,
                    "temperature": 1.0, "seed": 1000 + seed, "max_tokens": 300}
            jobs += [(CHAT, body), (CHAT, {**body, "stream": True})]
            keys.append((cid, choice, parallel, seed))
    replies = post_all(live, jobs)
    return [(k, replies[2 * i], replies[2 * i + 1]) for i, k in enumerate(keys)]


@pytest.mark.parametrize("case", [c[0] for c in TOOL_CASES])
def test_tool_choice_forces_valid_calls(tool_replies, case):
    ids, counts = [], []
    for (cid, choice, parallel, seed), whole, _ in tool_replies:
        if cid != case:
            continue
        assert whole.status == 200, whole.text
        choice_obj = whole.json()["choices"][0]
        assert choice_obj["finish_reason"] == "tool_calls", choice_obj
        message = choice_obj["message"]
        assert message["content"] is None and message["role"] == "assistant"
        calls = message["tool_calls"]
        check_calls(calls, None if isinstance(choice, str) else choice["function"]["name"])
        if not parallel:
            assert len(calls) == 1
        ids += [c["id"] for c in calls]
        counts.append(len(calls))
    assert len(ids) == len(set(ids)), ids
    if case == "required-parallel":
        print(f"\nparallel calls per answer: {counts}")


@pytest.mark.parametrize("case", [c[0] for c in TOOL_CASES])
def test_streamed_tool_calls_match_the_whole_answer(tool_replies, case):
    for (cid, choice, parallel, seed), whole, streamed in tool_replies:
        if cid != case:
            continue
        assert streamed.status == 200, streamed.text
        calls, content, finish = streamed_calls(streamed)
        expected = whole.json()["choices"][0]["message"]["tool_calls"]
        assert finish == "tool_calls" and content == ""
        check_calls(calls)
        # same seed: the same calls, argument text for argument text; ids are fresh per answer
        assert [c["function"] for c in calls] == [c["function"] for c in expected], seed
        assert not {c["id"] for c in calls} & {c["id"] for c in expected}


def test_tool_choice_none_never_calls_even_when_the_model_wants_to(live):
    body = {"messages": ASK, "tools": TOOLS, "temperature": 1.0, "logprobs": True}
    with favour_token(live, TOOL_CALLS_ID):
        replies = post_all(live, [(CHAT, {**body, "seed": s, "tool_choice": choice,
                                          "max_tokens": 300 if choice == "auto" else 12})
                                  for s in range(1, 5) for choice in ("auto", "none")])
    for k, reply in enumerate(replies):
        assert reply.status == 200, reply.text
        choice = reply.json()["choices"][0]
        tokens = [t["token"] for t in choice["logprobs"]["content"]]
        if k % 2 == 0:     # auto: the favoured [TOOL_CALLS] comes first, then a call the grammar keeps valid
            assert tokens[0] == "[TOOL_CALLS]" and choice["finish_reason"] == "tool_calls", choice
            check_calls(choice["message"]["tool_calls"])
        else:              # none: [TOOL_CALLS] is impossible; plain text to max_tokens
            assert "[TOOL_CALLS]" not in tokens and len(tokens) == 12, tokens
            assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"] is None
            assert choice["message"]["content"]


def test_workers_tools_return_name_and_argument_objects(live):
    native = [t["function"] for t in TOOLS]                    # Workers AI's own tool shape
    body = {"messages": ASK, "tools": native, "temperature": 1.0, "max_tokens": 300}
    with favour_token(live, TOOL_CALLS_ID):
        replies = post_all(live, [(RUN, {**body, "seed": s, "stream": stream})
                                  for s in range(1, 5) for stream in (False, True)])
    for whole, streamed in zip(replies[::2], replies[1::2]):
        assert whole.status == 200, whole.text
        result = whole.json()["result"]
        assert result["response"] == "" and result["tool_calls"], result
        for call in result["tool_calls"]:
            assert set(call) == {"name", "arguments"} and isinstance(call["arguments"], dict), call
            assert validator(TOOL_SCHEMAS[call["name"]]).is_valid(call["arguments"]), call
        events = streamed.events()
        assert events[-1] == "[DONE]" and set(events[-2]) == {"response", "usage"}
        with_calls = [e for e in events[:-2] if e["tool_calls"]]
        assert len(with_calls) == 1 and with_calls[0]["response"] == ""
        assert with_calls[0]["tool_calls"] == result["tool_calls"]        # same seed, same complete calls
        assert events[-2]["usage"] == result["usage"]


def test_tool_calls_cut_by_max_tokens(live):
    body = {"messages": ASK, "temperature": 1.0, "seed": 3, "max_tokens": 4}
    oai, oai_streamed = post_all(live, [(CHAT, {**body, "tools": TOOLS, "tool_choice": "required", **extra})
                                        for extra in ({}, {"stream": True})])
    choice = oai.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["tool_calls"] is None, choice
    assert streamed_calls(oai_streamed)[2] == "length"
    # the Workers route has no tool_choice: with the call favoured, a cut call is an explicit error
    with favour_token(live, TOOL_CALLS_ID):
        cf, cf_streamed = post_all(live, [(RUN, {**body, "tools": [t["function"] for t in TOOLS], **extra})
                                          for extra in ({}, {"stream": True})])
    assert "cut off by max_tokens" in cf_error(cf)
    last = cf_streamed.events()[-1]
    assert last["success"] is False and "cut off by max_tokens" in last["errors"][0]["message"], last


# ---- 4. the openai SDK's tool loop --------------------------------------------------------------------------
def test_openai_sdk_tool_loop(live):
    client = openai.OpenAI(api_key=TOKEN, base_url=f"{live.url}/v1", max_retries=0)
    first = client.chat.completions.create(
        model=CLOUDFLARE_MODEL, messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
        temperature=1.0, seed=11, max_tokens=300)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert CALL_ID.fullmatch(call.id)
    assert validator(TOOL_SCHEMAS[call.function.name]).is_valid(json.loads(call.function.arguments))
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"ok": True, "ref": "X1"})}]
    finals = [client.chat.completions.create(model=CLOUDFLARE_MODEL, messages=history, temperature=0,
                                             max_tokens=16, **extra)
              for extra in ({}, {"tools": TOOLS, "tool_choice": "none"})]
    parsed = parse_tools(TOOLS)
    for final, tools in zip(finals, (None, parsed)):
        answer = final.choices[0]
        assert answer.finish_reason in ("stop", "length") and answer.message.tool_calls is None
        assert isinstance(answer.message.content, str)
        # the history really reached the prompt: exactly mistral-common's encoding of it
        assert final.usage.prompt_tokens == len(reference_encoding(live, history, tools))

    # a history written by another client, with OpenAI-style ids: accepted, and encoded as mistral-common
    # encodes it with the ids mapped onto the model's 9-alphanumeric form
    foreign = json.loads(json.dumps(history).replace(call.id, "call_abc123"))
    final = client.chat.completions.create(model=CLOUDFLARE_MODEL, messages=foreign, tools=TOOLS,
                                           tool_choice="none", temperature=0, max_tokens=4)
    mapped = json.loads(json.dumps(history).replace(call.id, _hash_id("call_abc123")))
    ours = live.engine.encode(foreign, tools=parsed).token_ids
    assert ours == reference_encoding(live, mapped, parsed)
    assert ours != reference_encoding(live, history, parsed)       # the id is part of the prompt
    assert final.usage.prompt_tokens == len(ours) and final.choices[0].finish_reason in ("stop", "length")


def reference_encoding(srv, messages, tools) -> list[int]:
    """mistral-common's own encoding (its default validation mode), as tests/test_tokenizer.py checks it."""
    ref = MistralTokenizer.from_file(str(srv.engine.checkpoint.directory / "tekken.json"))
    openai_tools = None if tools is None else [{"type": "function", "function": t} for t in tools]
    return ref.encode_chat_completion(ChatCompletionRequest.from_openai(messages, openai_tools)).tokens


# ---- 5. grammar and free requests in one batch --------------------------------------------------------------
def test_grammar_and_free_requests_share_a_batch(tiny_llm):
    engine = tiny_llm.engine
    free_prompts = ["Hello there", "Tell me a story about a cat.", "1 2 3", "Bonjour"]
    free = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    guided = [(sid, schema) for sid, bounded, schema in SCHEMAS if bounded][::4]
    alone = [tiny_llm.generate(p, free)[0].token_ids for p in free_prompts]
    masks_before = engine.runner.grammar_masks

    prompts, params, kinds = [], [], []
    for k, (sid, schema) in enumerate(guided):         # free requests interleaved with guided ones
        if k < len(free_prompts):
            prompts.append(free_prompts[k])
            params.append(free)
            kinds.append(("free", k))
        prompts.append(f"JSON for {sid}")
        params.append(SamplingParams(max_tokens=200, temperature=1.0, seed=77 + k,
                                     grammar=engine.grammars.json_schema(schema)))
        kinds.append(("guided", schema))
    outs = tiny_llm.generate(prompts, params)
    assert engine.runner.grammar_masks > masks_before
    for (kind, what), out in zip(kinds, outs):
        if kind == "free":
            assert out.token_ids == alone[what], free_prompts[what]
        else:
            assert out.finish_reason == "stop", out.text
            assert validator(what).is_valid(json.loads(out.text)), out.text
    # and a guided request's own tokens do not depend on its neighbours either
    seeded = params[kinds.index(("guided", guided[0][1]))]
    assert tiny_llm.generate(f"JSON for {guided[0][0]}", seeded)[0].token_ids == \
        outs[kinds.index(("guided", guided[0][1]))].token_ids
