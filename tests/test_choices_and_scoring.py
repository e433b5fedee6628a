"""The engine side of OpenAI's `n`, prompt logprobs (echo / vLLM's prompt_logprobs) and logit_bias, on the tiny
checkpoint: choices share one prefill through the prefix cache, prompt logprobs equal transformers' log-softmax
whatever the chunking, and logit_bias moves sampling but not the reported logprobs."""

import asyncio

import pytest
import torch

from engine import LLM, SamplingParams
from engine import prompt_logprobs as prompt_logprobs_module
from engine.async_llm import AsyncLLM
from engine.input_processor import choice_seed
from engine.sampler import Sampler, SamplingBatch

WORDS = "the a cat sea wind river stone light night poem tell me about why how".split()


def make_llm(tiny_dir, **kw):
    kw.setdefault("kv_cache_memory", 32 * 2**20)
    return LLM(tiny_dir, device="cpu", dtype="float32", progress=False, **kw)


def text(n_words: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words))


def clean(llm):
    llm.engine.check_integrity()
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-softmax of transformers' logits (fp32): row q - 1 scores token q."""
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def run_choices(llm, prompt, params, n):
    """All the choices of one prompt through AsyncLLM (as the server runs them): their final outputs."""
    async def go():
        engine = AsyncLLM(engine=llm.engine)
        try:
            streams = await engine.submit_choices(prompt, params, n, raw=True)
            finals = []
            for s in streams:
                async for out in s:
                    pass
                finals.append(out)
            return finals
        finally:
            engine.shutdown()
    return asyncio.run(go())


# ---- prompt logprobs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,rows", [(2048, 256), (16, 5)])
def test_prompt_logprobs_equal_transformers_whatever_the_chunking(tiny_dir, hf_model, monkeypatch, chunk, rows):
    monkeypatch.setattr(prompt_logprobs_module, "ROWS", rows)
    llm = make_llm(tiny_dir, max_num_batched_tokens=chunk)
    prompt = "<s>" + text(60)
    ids = llm.engine.encode(prompt, raw=True).token_ids
    assert len(ids) > 3 * 16
    out = llm.generate(prompt, SamplingParams(max_tokens=0, prompt_logprobs=3), raw=True)[0]
    assert out.token_ids == [] and out.finish_reason == "length" and out.usage.completion_tokens == 0
    ref = hf_logprobs(hf_model, ids)
    lps = out.prompt_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    for q in range(1, len(ids)):
        lp, row = lps[q], ref[q - 1]
        assert lp.token_id == ids[q]
        assert abs(lp.logprob - row[ids[q]].item()) < 1e-4, q
        assert lp.rank == int((row > row[ids[q]]).sum()) + 1
        top = row.topk(3)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert max(abs(v - r) for (_, v), r in zip(lp.top, top.values.tolist())) < 1e-4
    clean(llm)


def test_prompt_logprobs_never_come_from_the_prefix_cache(tiny_dir):
    llm = make_llm(tiny_dir)
    prompt = "<s>" + text(60, seed=3)
    bm = llm.engine.block_manager
    plain = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(prompt, plain, raw=True)                       # the prompt's blocks are now cached
    hits = bm.num_hits
    scored = llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), raw=True)[0]
    assert bm.num_hits == hits and scored.usage.cached_tokens == 0        # no lookup at all
    again = llm.generate(prompt, plain, raw=True)[0]                      # and the cache still serves others
    assert again.usage.cached_tokens > 0 and again.token_ids == scored.token_ids
    fresh = make_llm(tiny_dir).generate(prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                                        raw=True)[0]
    assert [lp and lp.logprob for lp in fresh.prompt_logprobs] == [lp and lp.logprob for lp in scored.prompt_logprobs]
    clean(llm)


# ---- n ---------------------------------------------------------------------------------------------------------
def test_choices_share_one_prefill_and_differ(tiny_dir):
    llm = make_llm(tiny_dir)
    bm, bs = llm.engine.block_manager, llm.engine.config.block_size
    prompt = "<s>" + text(50, seed=5)
    n_prompt = len(llm.engine.encode(prompt, raw=True).token_ids)
    assert n_prompt % bs != 0
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=42, ignore_eos=True)
    hits = bm.num_hits
    outs = run_choices(llm, prompt, params, 4)
    full = (n_prompt - 1) // bs
    assert bm.num_hits - hits == 3 * full * bs              # the later choices took the prompt from the cache
    assert [o.usage.cached_tokens for o in outs] == [0] + [full * bs] * 3
    assert len({tuple(o.token_ids) for o in outs}) == 4     # the choices differ
    # each choice is reproducible: choice j is a plain request seeded choice_seed(42, j)
    for j, o in enumerate(outs):
        alone = make_llm(tiny_dir).generate(prompt, SamplingParams(
            max_tokens=6, temperature=1.0, seed=choice_seed(42, j), ignore_eos=True), raw=True)[0]
        assert alone.token_ids == o.token_ids, j
    assert choice_seed(42, 0) == 42 and choice_seed(None, 3) is None
    assert outs[0].token_ids == run_choices(llm, prompt, params, 1)[0].token_ids
    clean(llm)


# ---- logit_bias ------------------------------------------------------------------------------------------------
def test_logit_bias_is_batched_per_row_and_logprobs_stay_the_models():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0, logit_bias={7: 100}, logprobs=0),
              SamplingParams(temperature=0, logit_bias={int(logits[1].argmax()): -100}, logprobs=0),
              SamplingParams(temperature=0, logprobs=0)]
    batch = SamplingBatch.build(params, [0, 0, 0], [[]] * 3, [[]] * 3, 2, 50, "cpu")
    out = Sampler()(logits.clone(), batch)
    second = logits[1].clone()
    second[second.argmax()] = -float("inf")
    assert out.token_ids.tolist() == [7, int(second.argmax()), int(logits[2].argmax())]
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 100.5})


# ---- the same on the fast path ------------------------------------------------------------------------------------
def test_choices_prompt_logprobs_and_logit_bias_on_the_triton_backend(tiny_dir):
    """n choices (sharing one prefill through the prefix cache), prompt logprobs and logit_bias give the same
    answers on the Triton attention backend (Triton's interpreter on CPU) as on the reference backend."""
    prompt = "<s>" + text(30)
    seeded = SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    scored = SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=2, ignore_eos=True)
    results = {}
    for backend in ("reference", "triton"):
        llm = make_llm(tiny_dir, attention_backend=backend, max_num_batched_tokens=16)
        assert llm.engine.runner.attention.name == backend
        choices = [o.token_ids for o in run_choices(llm, prompt, seeded, 3)]
        greedy = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), raw=True)[0]
        bias = {greedy.token_ids[0]: -100.0}
        biased = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True,
                                                     logit_bias=bias), raw=True)[0]
        lps = llm.generate(prompt, scored, raw=True)[0].prompt_logprobs
        results[backend] = (choices, greedy.token_ids, biased.token_ids, lps)
        clean(llm)
    ref, fast = results["reference"], results["triton"]
    assert len(set(map(tuple, ref[0]))) > 1 and fast[0] == ref[0]        # the choices differ, and agree
    assert fast[1] == ref[1] and fast[2] == ref[2] and ref[2][0] != ref[1][0]
    assert len(fast[3]) == len(ref[3]) and fast[3][0] is None
    for a, b in zip(fast[3][1:], ref[3][1:]):
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4 and a.rank == b.rank
