"""The /v1 routes as the clients people already use expect them, byte for byte (raw HTTP; the SDKs themselves
are in test_clients.py): tool-call streaming and tool_choice, `n`, completions' prompt shapes, `echo` and
prompt logprobs, logit_bias, vLLM's tokenizer routes, Mistral's API shape. The tiny random-weight checkpoint,
a real uvicorn server."""

from __future__ import annotations

import json
import time
import re

import httpx
import pytest
from http_util import favour_token, post_all, streamed_calls
from jsonschema.validators import validator_for
from server_fixture import start_server, tiny_engine

from engine.limits import MAX_N
from server.config import CLOUDFLARE_MODEL, HF_MODEL, MISTRAL_MODEL, ServerSettings

pytestmark = pytest.mark.usefixtures("drained")   # after each test using `live`: idle engine, whole pool

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MISTRAL_UA = {"user-agent": "mistral-client-python/3.7.0"}
CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                   "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"]}}}
ALARM = {"type": "function", "function": {
    "name": "set_alarm", "description": "Set an alarm",
    "parameters": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0, "maximum": 23}},
                   "required": ["hour"]}}}
TOOLS = [WEATHER, ALARM]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, and wake me at 7?"}]
LONG = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)


@pytest.fixture(scope="module")
def live(tiny_dir):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    yield srv
    srv.stop()


@pytest.fixture
def http(live):
    with httpx.Client(base_url=live.url, timeout=300) as c:
        yield c


def continue_calls(live):
    """Favour every token that continues a call array after a complete call (",", "},", "},{", ",{")."""
    enc = live.engine.tokenizer.encode_text
    return favour_token(live, sorted({enc(s)[0] for s in (",", "},", "},{", ",{")}))


def valid_call(call: dict) -> bool:
    f = call["function"]
    return CALL_ID.fullmatch(call["id"]) is not None and \
        validator_for(PARAMS[f["name"]])(PARAMS[f["name"]]).is_valid(json.loads(f["arguments"]))


# ---- tool calls --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "set_alarm"}},
                                    {"function": {"name": "set_alarm"}}], ids=["openai", "mistral"])
def test_named_tool_choice_makes_exactly_one_call_and_ends(live, choice):
    """Even when the model wants more calls, a named choice is one call of that tool (parallel_tool_calls is
    left at its default, true)."""
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": choice, "temperature": 1.0, "max_tokens": 60}
    with continue_calls(live):
        replies = post_all(live, [(CHAT, {**body, "seed": s, "stream": stream}) for s in (1, 2, 3)
                                  for stream in (False, True)])
    for whole, streamed in zip(replies[::2], replies[1::2]):
        assert whole.status == 200, whole.text
        c = whole.json()["choices"][0]
        assert c["finish_reason"] == "tool_calls" and len(c["message"]["tool_calls"]) == 1, c
        call = c["message"]["tool_calls"][0]
        assert call["function"]["name"] == "set_alarm" and valid_call(call)
        calls, content, finish = streamed_calls(streamed)
        assert finish == "tool_calls" and content == "" and [x["function"] for x in calls] == [call["function"]]


def test_an_answer_cut_at_length_keeps_the_complete_calls(live):
    """Streamed and whole alike: the calls completed before max_tokens are delivered, the cut one is not in
    the whole answer (its fragments were already streamed; finish_reason "length" says it is incomplete)."""
    body = {"messages": ASK, "tools": [WEATHER], "tool_choice": "required", "temperature": 1.0, "max_tokens": 70}
    with continue_calls(live):
        replies = post_all(live, [(CHAT, {**body, "seed": s, "stream": stream}) for s in (1, 2, 3)
                                  for stream in (False, True)])
    for whole, streamed in zip(replies[::2], replies[1::2]):
        c = whole.json()["choices"][0]
        calls = c["message"]["tool_calls"]
        assert c["finish_reason"] == "length" and calls and c["message"]["content"] is None, c
        assert all(valid_call(x) for x in calls)
        got, _, finish = streamed_calls(streamed)
        assert finish == "length" and len(got) in (len(calls), len(calls) + 1)
        assert [x["function"] for x in got[:len(calls)]] == [x["function"] for x in calls]
        for cut in got[len(calls):]:            # a call whose name had come when max_tokens cut it
            with pytest.raises(json.JSONDecodeError):
                json.loads(cut["function"]["arguments"])


# ---- n -------------------------------------------------------------------------------------------------------
def test_n_choices_share_the_prompt_and_are_indexed_per_prompt(live):
    bm, bs = live.engine.block_manager, live.engine.config.block_size
    prompts = [LONG, "Once upon a time"]
    n = 3
    ids = [live.engine.encode("<s>" + p, raw=True).token_ids for p in prompts]
    body = {"prompt": prompts, "n": n, "max_tokens": 5, "temperature": 1.0, "seed": 9, "echo": True,
            "ignore_eos": True}
    hits = bm.num_hits
    first, again, streamed = post_all(live, [(COMPLETIONS, body), (COMPLETIONS, body),
                                             (COMPLETIONS, {**body, "stream": True})])
    assert bm.num_hits - hits >= (n - 1) * ((len(ids[0]) - 1) // bs) * bs > 0
    choices = first.json()["choices"]
    assert [c["index"] for c in choices] == list(range(len(prompts) * n))
    for c in choices:
        assert c["text"].startswith(prompts[c["index"] // n])              # choice j of prompt p: p * n + j
    texts = [c["text"] for c in choices]
    assert len(set(texts)) == len(texts)                                   # the choices differ
    assert [c["text"] for c in again.json()["choices"]] == texts           # and each is reproducible
    usage = first.json()["usage"]
    assert usage["prompt_tokens"] == sum(map(len, ids))                    # each prompt counted once
    assert usage["completion_tokens"] == len(prompts) * n * 5
    parts = {}
    for e in streamed.events()[:-1]:
        for c in e["choices"]:
            parts[c["index"]] = parts.get(c["index"], "") + c["text"]
    assert [parts[k] for k in range(len(texts))] == texts


def test_n_on_chat_streams_every_choice_and_limits_n(live, http):
    r = post_all(live, [(CHAT, {"messages": ASK, "n": 2, "max_tokens": 3, "temperature": 1.0, "seed": 4,
                                "stream": True, "stream_options": {"include_usage": True}})])[0]
    events = r.events()
    roles = [e["choices"][0]["index"] for e in events[:-1] if e["choices"] and "role" in e["choices"][0]["delta"]]
    finished = [e["choices"][0]["index"] for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert roles == [0, 1] and sorted(finished) == [0, 1]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 6
    err = http.post(CHAT, json={"messages": ASK, "n": MAX_N + 1}).json()["error"]
    assert err["param"] == "n" and str(MAX_N) in err["message"]


# ---- completions: prompts, echo, prompt logprobs ---------------------------------------------------------------
def test_token_id_prompts_are_verbatim_and_echoed_exactly(live, http):
    tok = live.engine.tokenizer
    ids = [22177, 1044, 2606]                      # no BOS: none is added
    r = http.post(COMPLETIONS, json={"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 1})
    c = r.json()["choices"][0]
    assert r.json()["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                                 "prompt_tokens_details": {"cached_tokens": 0}}
    assert c["text"] == tok.decode(ids, skip_special=False) and c["finish_reason"] == "length"
    lp = c["logprobs"]
    assert lp["tokens"] == [tok.token_bytes(t).decode() for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in lp["token_logprobs"][1:]) and all(len(t) == 1 for t in lp["top_logprobs"][1:])
    texts = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 1, "echo": True}).json()
    assert texts["choices"][0]["text"].startswith("Hello") and texts["usage"]["prompt_tokens"] == \
        len(tok.encode_raw("<s>Hello"))                                    # a text gets <s> first
    for bad, param in (({"prompt": [tok.vocab_size]}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
                       ({"prompt": "x", "max_tokens": 0}, "max_tokens")):
        err = http.post(COMPLETIONS, json=bad).json()["error"]
        assert err["param"] == param, err


def test_prompt_logprobs_in_vllms_shape(http):
    """Per prompt token: None for the first, then {token id: {logprob, rank, decoded_token}} holding the prompt's
    token (its rank) and the top alternatives (ranks 1..k)."""
    ids = http.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    chat_ids = http.post("/tokenize", json={"messages": ASK}).json()["tokens"]
    for path, body, prompt in ((COMPLETIONS, {"prompt": "Hello there"}, ids), (CHAT, {"messages": ASK}, chat_ids)):
        r = http.post(path, json={**body, "max_tokens": 1, "prompt_logprobs": 2}).json()
        plp = r["choices"][0]["prompt_logprobs"] if path == COMPLETIONS else r["prompt_logprobs"]
        assert plp[0] is None and len(plp) == len(prompt) == r["usage"]["prompt_tokens"]
        for token, entry in zip(prompt[1:], plp[1:]):
            assert str(token) in entry and 2 <= len(entry) <= 3
            assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
            assert sorted(v["rank"] for v in entry.values())[:2] == [1, 2]
            best = max(entry.values(), key=lambda v: v["logprob"])
            assert best["rank"] == 1 and entry[str(token)]["logprob"] <= best["logprob"]


# ---- logit_bias ----------------------------------------------------------------------------------------------
def test_logit_bias_steers_sampling_and_logprobs_stay_the_models(http):
    body = {"messages": ASK, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    plain = http.post(CHAT, json=body).json()["choices"][0]
    favoured = 4179
    biased = http.post(CHAT, json={**body, "logit_bias": {str(favoured): 100}}).json()["choices"][0]
    tokens = [t["token"] for t in biased["logprobs"]["content"]]
    assert tokens == ["},"] * 4
    # the first position saw the same model: its top alternatives are the unbiased ones, not the bias's (equal
    # up to float noise: the second request reads the prompt's K/V from the prefix cache)
    seen, model = (c["logprobs"]["content"][0]["top_logprobs"] for c in (biased, plain))
    assert [t["token"] for t in seen] == [t["token"] for t in model]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-5 for a, b in zip(seen, model))
    first = plain["logprobs"]["content"][0]["token"]
    first_id = json.loads(http.post("/tokenize", json={"prompt": first, "add_special_tokens": False}).text)["tokens"]
    banned = http.post(CHAT, json={**body, "logit_bias": {str(first_id[0]): -100}}).json()["choices"][0]
    assert banned["logprobs"]["content"][0]["token"] != first
    for bias in ({"abc": 1}, {"5": 101}, {"5": "x"}, {"999999": 1}, [], {str(t): 1 for t in range(301)}):
        err = http.post(COMPLETIONS, json={"prompt": "x", "logit_bias": bias}).json()["error"]
        assert err["param"] == "logit_bias" and "logit_bias" in err["message"], (bias, err)


# ---- vLLM's tokenizer routes ---------------------------------------------------------------------------------
def test_tokenize_matches_what_the_generation_routes_encode(live, http):
    r = http.post("/tokenize", json={"prompt": "Hello</s> [INST]"}).json()
    usage = http.post(COMPLETIONS, json={"prompt": "Hello</s> [INST]", "max_tokens": 1}).json()["usage"]
    assert r["tokens"][0] == 1 and r["count"] == usage["prompt_tokens"] == len(r["tokens"])
    assert r["max_model_len"] == live.engine.config.max_model_len and r["token_strs"] is None
    bare = http.post("/tokenize", json={"prompt": "</s>", "add_special_tokens": False}).json()
    assert bare["tokens"] == [2]                                           # control tokens as completions parse them
    chat = http.post("/tokenize", json={"messages": ASK, "tools": TOOLS, "return_token_strs": True}).json()
    usage = http.post(CHAT, json={"messages": ASK, "tools": TOOLS, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"] and chat["token_strs"][:2] == ["<s>", "[AVAILABLE_TOOLS]"]
    assert http.post("/detokenize", json={"tokens": chat["tokens"][:2]}).json() == {"prompt": "<s>[AVAILABLE_TOOLS]"}
    info = http.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == ("<s>", "</s>", "<pad>")
    assert (info["bos_token_id"], info["eos_token_id"], info["vocab_size"]) == (1, 2, 131072)
    assert info["model_max_length"] == live.engine.config.max_model_len
    for path, body, status, param in (
            ("/tokenize", {"prompt": "a", "messages": ASK}, 400, None),
            ("/tokenize", {"messages": ASK, "add_special_tokens": True}, 400, "add_special_tokens"),
            ("/tokenize", {"prompt": "a", "model": "nope"}, 404, "model"),
            ("/detokenize", {"tokens": [131072]}, 400, "tokens"),
            ("/detokenize", {"tokens": "1"}, 400, "tokens")):
        r = http.post(path, json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (path, body, r.text)


# ---- Mistral's API shape -------------------------------------------------------------------------------------
def test_usage_on_the_last_finish_chunk_for_mistral_clients_only(live):
    body = {"messages": ASK, "max_tokens": 3, "stream": True, "n": 2, "temperature": 0}
    mistral = post_all(live, [(CHAT, body)], headers=MISTRAL_UA)[0].events()[:-1]
    assert [("usage" in e) for e in mistral] == [False] * (len(mistral) - 1) + [True]
    assert mistral[-1]["choices"][0]["finish_reason"] == "length"
    assert mistral[-1]["usage"]["completion_tokens"] == 6 and mistral[-1]["usage"]["prompt_tokens"] > 0
    fields = post_all(live, [(CHAT, {**body, "random_seed": 3})])[0].events()[:-1]    # Mistral's own field
    assert "usage" in fields[-1]
    plain = post_all(live, [(CHAT, body)])[0].events()[:-1]
    assert not any("usage" in e for e in plain)                            # never an extra chunk for OpenAI
    with live.override(force_include_usage=True):
        forced = post_all(live, [(CHAT, body)])[0].events()[:-1]
    assert "usage" in forced[-1] and forced[-1]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in e for e in forced[:-1])


def test_mistral_clients_get_whole_calls_in_the_stream(live):
    body = {"messages": ASK, "tools": TOOLS, "tool_choice": "any", "temperature": 1.0, "max_tokens": 80,
            "stream": True}
    replies = post_all(live, [(CHAT, {**body, "random_seed": s}) for s in (1, 2, 3)], headers=MISTRAL_UA)
    for r in replies:
        entries = [d for e in r.events()[:-1] for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
        finish = [c["finish_reason"] for e in r.events()[:-1] for c in e["choices"] if c["finish_reason"]]
        if finish == ["tool_calls"]:
            assert entries and [d["index"] for d in entries] == list(range(len(entries)))
        for d in entries:                      # each whole: id, name and complete arguments in one delta
            assert set(d) == {"index", "id", "type", "function"} and valid_call(d), d


def test_random_seed_is_seed_and_safe_prompt_is_refused(http):
    body = {"messages": ASK, "max_tokens": 4, "temperature": 1.0}
    a = http.post(CHAT, json={**body, "random_seed": 77}).json()["choices"][0]["message"]
    b = http.post(CHAT, json={**body, "seed": 77}).json()["choices"][0]["message"]
    assert a == b
    err = http.post(CHAT, json={**body, "seed": 1, "random_seed": 2}).json()["error"]
    assert err["param"] == "random_seed"
    assert http.post(CHAT, json={**body, "safe_prompt": False}).status_code == 200
    err = http.post(CHAT, json={**body, "safe_prompt": True}).json()["error"]
    assert err["param"] == "safe_prompt" and "not supported" in err["message"]
    assert http.post(CHAT, json={**body, "prompt_mode": None}).status_code == 200
    err = http.post(CHAT, json={**body, "prompt_mode": "reasoning"}).json()["error"]
    assert err["param"] == "prompt_mode" and "not supported" in err["message"]


def test_tpot_is_per_sequence_when_choices_decode_side_by_side():
    from server.metrics import Metrics, RequestTimer
    metrics = Metrics(lambda: None, "m")
    timer = RequestTimer("r", "openai-chat")
    timer.token()
    time.sleep(0.08)
    timer.finish(metrics, 5, 4 * 9, 0, "length", sequence_tokens=9)       # 4 choices of 9 tokens
    tpot = metrics.tpot.labels("m")
    (total,) = [s.value for s in tpot.collect()[0].samples if s.name.endswith("_sum")]
    elapsed = time.monotonic() - timer.first_token
    assert 0.08 / 8 <= total <= elapsed / 8           # over 8 gaps of one sequence, not 35 of all four


def test_models_carry_mistrals_fields_and_can_be_retrieved(live, http):
    data = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in data] == [CLOUDFLARE_MODEL, HF_MODEL, MISTRAL_MODEL]
    for m in data:
        assert m["object"] == "model" and m["type"] == "base" and m["capabilities"]["completion_chat"]
        assert m["capabilities"]["function_calling"] and m["capabilities"]["vision"]
        assert m["max_context_length"] == m["max_model_len"] == live.engine.config.max_model_len
        assert http.get(f"/v1/models/{m['id']}").json() == m
    r = http.get("/v1/models/gpt-4o")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert http.post(CHAT, json={"model": MISTRAL_MODEL, "messages": ASK, "max_tokens": 1}).status_code == 200
