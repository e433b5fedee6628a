"""One request never hurts the others: a fault in one request's own work ends that request alone (the engine
serves the rest), and a long prompt's prefill leaves room in every step for everyone else (fairness counted in
engine steps, never seconds)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from server_fixture import start_server, tiny_engine
from test_engine import idle_and_clean, make_llm
from test_server import HELLO, RUN, cf_error

from engine import SamplingParams
from server.config import ServerSettings

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
          "required": ["name", "n"]}


class FaultyMatcher:
    """A grammar matcher that fails after `after` tokens, when advancing or when computing its mask."""

    def __init__(self, inner, after: int, where: str):
        self.inner, self.after, self.where, self.seen = inner, after, where, 0

    def consume_token(self, token):
        self.seen += 1
        if self.where == "advance" and self.seen > self.after:
            raise RuntimeError("injected grammar fault (advance)")
        return self.inner.consume_token(token)

    def unsafe_compute_mask_ptr(self, ptr, size):
        if self.where == "mask" and self.seen >= self.after:
            raise RuntimeError("injected grammar fault (mask)")
        return self.inner.unsafe_compute_mask_ptr(ptr, size)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_fault_in_one_requests_grammar_ends_only_that_request(tiny_dir):
    llm = make_llm(tiny_dir)
    eng = llm.engine
    guided = SamplingParams(max_tokens=40, temperature=0, grammar=eng.grammars.json_schema(SCHEMA))
    alone = {p: llm.generate(p, guided if "json" in p else GREEDY)[0] for p in ("json please", "plain text")}
    reqs = {}
    for name, prompt, params in (("advance", "json please", guided), ("mask", "json please", guided),
                                 ("ok-json", "json please", guided), ("ok-text", "plain text", GREEDY)):
        req = eng.process(prompt, params, request_id=name)
        if name in ("advance", "mask"):
            req.matcher = FaultyMatcher(req.matcher, 3, name)
        eng.submit(req)
        reqs[name] = req
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    for name in ("advance", "mask"):
        out = done[name]
        assert out.finish_reason == "error" and f"injected grammar fault ({name})" in out.error, out
    ref = alone["json please"]
    assert (done["ok-json"].token_ids, done["ok-json"].finish_reason) == (ref.token_ids, ref.finish_reason)
    assert done["ok-text"].token_ids == alone["plain text"].token_ids
    idle_and_clean(llm)


def test_a_fault_in_one_requests_grammar_is_that_requests_error_over_http(tiny_dir, monkeypatch):
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    process_choices = srv.engine.process_choices      # what the server calls for every request

    def faulty_process(prompt, params=None, *args, **kwargs):
        reqs = process_choices(prompt, params, *args, **kwargs)
        if "FAULT" in json.dumps(prompt):
            for req in reqs:
                req.matcher = FaultyMatcher(req.matcher, 0, "advance")
        return reqs

    monkeypatch.setattr(srv.engine, "process_choices", faulty_process)
    body = {"max_tokens": 30, "temperature": 0, "guided_json": {"type": "boolean"}}    # done in a few tokens

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            return await asyncio.gather(
                client.post(RUN, json={"prompt": "FAULT", **body}),
                client.post(RUN, json={"prompt": "FAULT", "stream": True, **body}),
                client.post(RUN, json={"prompt": "fine", **body}),
                client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 8, "temperature": 0}))

    try:
        whole, streamed, ok, chat = asyncio.run(main())
        assert "request id" in cf_error(whole, 500, 5000) and "injected grammar fault" in whole.text
        last = json.loads([e for e in streamed.text.split("\n\n") if e][-1][len("data: "):])
        assert last["errors"][0]["code"] == 5000 and "[DONE]" not in streamed.text
        assert ok.status_code == 200 and isinstance(ok.json()["result"]["response"], bool), ok.text
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 8
        assert httpx.get(srv.url + "/health").status_code == 200 and not srv.llm.is_dead
        srv.assert_drained(15)
    finally:
        srv.stop()


# ---- fairness ------------------------------------------------------------------------------------------------------
BUDGET, T = 256, 64


@pytest.fixture(scope="module")
def fair(tiny_dir):
    return make_llm(tiny_dir, max_num_batched_tokens=BUDGET, long_prefill_token_threshold=T,
                    enable_prefix_caching=False)     # every prefill computed: the steps show the shares


def long_prompt(n: int) -> list[int]:
    return [1] + [1000 + (i * 7919) % 90000 for i in range(n - 1)]


def steps_until_first_token(eng, request_id: str, limit: int) -> int:
    for k in range(1, limit + 1):
        if any(o.request_id == request_id and o.token_ids for o in eng.step()):
            return k
    raise AssertionError(f"no first token for {request_id} within {limit} steps")


def test_a_short_request_gets_its_first_token_in_the_first_step_after_it_arrives_during_a_long_prefill(fair):
    """The stated bound (engine/scheduler.py): a prompt that fits in budget - T - the running decodes and short
    prefills, arriving with a free slot and nobody waiting ahead, samples its first token in the first step
    after it arrives — here beside a 2,000-token prefill that alone would take every step's whole budget."""
    eng = fair.engine
    alone = fair.generate(long_prompt(2000), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    steps = []
    schedule = eng.scheduler.schedule

    def recording():
        out = schedule()
        steps.append({s.request.request_id: s.num_tokens for s in out.scheduled})
        return out

    eng.scheduler.schedule = recording
    try:
        eng.add_request(long_prompt(2000), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                        request_id="long")
        eng.step()
        assert steps[-1] == {"long": BUDGET}                  # alone: the whole budget
        decoders = [eng.add_request(f"decode {i}", GREEDY) for i in range(3)]
        assert steps_until_first_token(eng, decoders[0], 1) == 1
        for k in range(3):                                    # long prefills share T; decodes every step
            eng.step()
            assert steps[-1]["long"] == T and all(steps[-1][d] == 1 for d in decoders), steps[-1]
        short = eng.add_request("A short question?", GREEDY)
        assert steps_until_first_token(eng, short, 1) == 1
        assert steps[-1]["long"] == T
        done = {}
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
        assert done["long"] == alone.token_ids                 # chunking never changes the answer
    finally:
        eng.scheduler.schedule = schedule
    idle_and_clean(fair)


def test_a_long_waiting_prompt_does_not_block_short_ones_behind_it(fair):
    eng = fair.engine
    eng.add_request(long_prompt(1500), SamplingParams(max_tokens=2, temperature=0), request_id="first-long")
    eng.step()
    decoder = eng.add_request("keep decoding", GREEDY)
    eng.step()
    eng.add_request(long_prompt(1200), SamplingParams(max_tokens=2, temperature=0), request_id="second-long")
    short = eng.add_request("Short?", GREEDY)
    assert steps_until_first_token(eng, short, 1) == 1      # passed the waiting long prompt
    assert eng.scheduler.waiting and eng.scheduler.waiting[0].request_id == "second-long"
    while eng.has_unfinished():
        eng.step()
    assert decoder
    idle_and_clean(fair)


def test_the_threshold_is_a_flag_with_a_derived_default():
    from engine.config import EngineConfig
    from server.cli import build_parser
    from server.flags import from_args
    assert EngineConfig().long_prefill_token_threshold == 2048 // 4
    assert EngineConfig(max_num_batched_tokens=8192).long_prefill_token_threshold == 2048
    args = build_parser().parse_args(["serve", "--long-prefill-token-threshold", "0"])
    assert from_args(EngineConfig, args).long_prefill_token_threshold == 0
