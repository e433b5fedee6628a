"""The generation engine on the tiny checkpoint: batching, paging, preemption, prefix cache, chunked prefill."""

import asyncio
import random

import pytest

from engine import LLM, SamplingParams
from engine.async_llm import AsyncLLM
from engine.llm_engine import ContextWindowError
from util import hf_greedy, image_chat

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def make_llm(tiny_dir, **kw):
    kw.setdefault("kv_cache_memory", 32 * 2**20)
    return LLM(tiny_dir, device="cpu", dtype="float32", progress=False, **kw)


def idle_and_clean(llm):
    llm.engine.check_integrity()
    bm = llm.engine.block_manager
    assert not llm.engine.has_unfinished() and bm.num_free_blocks == bm.num_blocks


@pytest.fixture(scope="module")
def llm(tiny_dir):
    engine = make_llm(tiny_dir)
    yield engine
    idle_and_clean(engine)


def mixed_prompts(n=16):
    rng = random.Random(0)
    words = "the a cat sea wind river stone light night poem tell me about why how".split()
    prompts = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))
        prompts.append(image_chat([(rng.randint(28, 120), rng.randint(28, 120))], text, seed=i) if i % 4 == 1
                       else text)
    return prompts


@pytest.fixture(scope="module")
def alone(llm):
    """Each of 16 mixed prompts generated alone: the reference for every batching scenario."""
    return [llm.generate(p, GREEDY)[0].token_ids for p in mixed_prompts()]


def test_batched_equals_alone_equals_transformers(llm, alone, hf_model):
    outs = llm.generate(mixed_prompts(), GREEDY)
    assert [o.token_ids for o in outs] == alone
    for p, ref in list(zip(mixed_prompts(), alone))[:6]:
        enc = llm.engine.encode(p)
        assert hf_greedy(hf_model, enc.token_ids, 16, enc.images) == ref
    idle_and_clean(llm)


def test_stale_cache_contents_never_leak_into_a_batch(tiny_dir, alone):
    """Batched decode reads whole blocks: rows past each sequence's length and the table's padding entries
    hold whatever was there before. Poison the whole pool with NaN first: outputs must not change."""
    llm = make_llm(tiny_dir, enable_prefix_caching=False)
    llm.engine.runner.kv_cache.fill_(float("nan"))
    outs = llm.generate(mixed_prompts()[:8], GREEDY)
    assert [o.token_ids for o in outs] == alone[:8]
    idle_and_clean(llm)


def record_steps(eng):
    """Wrap the scheduler so the test sees every step's (request id, tokens) pairs."""
    steps, schedule = [], eng.scheduler.schedule

    def recording():
        out = schedule()
        steps.append({s.request.request_id: s.num_tokens for s in out.scheduled})
        return out
    eng.scheduler.schedule = recording
    return steps


def run_to_end(eng) -> dict:
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.token_ids
    return done


def test_mixed_step_and_join_mid_decode(tiny_dir, alone):
    llm = make_llm(tiny_dir)
    eng, prompts = llm.engine, mixed_prompts()
    steps = record_steps(eng)
    a = eng.add_request(prompts[0], GREEDY)
    for _ in range(3):
        eng.step()                                   # a decodes alone
    b = eng.add_request(prompts[2], GREEDY)          # joins while a is decoding
    done = run_to_end(eng)
    prompt_b = len(eng.encode(prompts[2]).token_ids)
    assert steps[3] == {a: 1, b: prompt_b}           # one step: a's decode token and b's whole prefill
    assert done == {a: alone[0], b: alone[2]}
    idle_and_clean(llm)


def test_non_contiguous_blocks_after_churn(tiny_dir, alone):
    llm = make_llm(tiny_dir, kv_cache_memory=40 * 16 * 512)     # 40 blocks: the churn cycles through all
    eng = llm.engine
    # requests finishing at different times leave the free list in release order, not block order
    llm.generate([f"churn {i} " * (6 * i + 2) for i in range(9)],
                 [SamplingParams(max_tokens=1 + 7 * (i % 4), temperature=0, ignore_eos=True) for i in range(9)])
    rid = eng.add_request(mixed_prompts()[3], GREEDY)
    eng.step()
    blocks = list(eng.core.requests[rid].block_ids)
    assert len(blocks) > 1 and any(b2 != b1 + 1 for b1, b2 in zip(blocks, blocks[1:])), blocks
    assert run_to_end(eng) == {rid: alone[3]}
    idle_and_clean(llm)


def test_small_pool_preempts_and_resumes_identically(tiny_dir, alone):
    # 24 blocks of 16 tokens: far too few for 16 requests at once, enough for the longest alone
    small = make_llm(tiny_dir, kv_cache_memory=24 * 16 * 512, enable_prefix_caching=False)
    outs = small.generate(mixed_prompts(), GREEDY)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == alone
    idle_and_clean(small)


def test_prefix_cache_hit_gives_identical_output(llm):
    system = "You are a careful assistant. " * 12
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "Name three rivers."}]
    first = llm.generate(chat, GREEDY)[0]
    second = llm.generate(chat, GREEDY)[0]
    assert first.usage.cached_tokens == 0
    assert second.usage.cached_tokens >= 16 * (len(first.prompt_token_ids) // 16 - 1) > 0
    assert second.token_ids == first.token_ids
    # a different question after the same system prompt shares the system blocks
    other = llm.generate([chat[0], {"role": "user", "content": "Name three mountains."}], GREEDY)[0]
    assert 0 < other.usage.cached_tokens < len(other.prompt_token_ids)
    idle_and_clean(llm)


def test_prefix_cache_never_shares_blocks_between_different_images(llm):
    a = image_chat([(112, 112)], "Same words.", seed=10)
    b = image_chat([(112, 112)], "Same words.", seed=11)            # same size, other pixels: same token ids
    enc_a, enc_b = llm.engine.encode(a), llm.engine.encode(b)
    assert enc_a.token_ids == enc_b.token_ids
    first_img = enc_a.token_ids.index(10)
    llm.generate(a, GREEDY)
    out_b = llm.generate(b, GREEDY)[0]
    assert out_b.usage.cached_tokens <= first_img                 # nothing at or after the image was reused
    fresh = make_llm(llm.engine.checkpoint.directory, enable_prefix_caching=False).generate(b, GREEDY)[0]
    assert out_b.token_ids == fresh.token_ids
    idle_and_clean(llm)


def long_context_checkpoint(make_checkpoint):
    """One layer, two heads: the reference attention is quadratic, and long-context tests only need the
    paging and chunking to be right."""
    from dataclasses import replace

    from engine.tiny_checkpoint import TINY
    return make_checkpoint(cfg=replace(TINY, text=replace(TINY.text, num_hidden_layers=1, num_attention_heads=2,
                                                          num_key_value_heads=1)))


def test_long_prompt_chunked_prefill_equals_unchunked(make_checkpoint):
    """A 32k-token prompt through 2048-token chunks under a KV pool barely larger than the sequence gives the
    same tokens as one unchunked prefill."""
    d = long_context_checkpoint(make_checkpoint)
    ids = [1] + [1000 + (i * 7919) % 120000 for i in range(32_768)]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    per_token = 2 * 1 * 16 * 4                     # K and V, one layer, one KV head of 16 floats
    kv = (len(ids) + 64) * per_token
    chunked = make_llm(d, kv_cache_memory=kv, max_num_batched_tokens=2048)
    steps = record_steps(chunked.engine)
    out = chunked.generate(ids, params)[0]
    assert max(sum(s.values()) for s in steps) == 2048 and len(steps) >= 17
    idle_and_clean(chunked)
    whole = make_llm(d, kv_cache_memory=kv, max_num_batched_tokens=len(ids))
    assert whole.generate(ids, params)[0].token_ids == out.token_ids


def test_image_split_across_prefill_chunks_is_encoded_once(tiny_dir):
    chat = image_chat([(300, 200), (90, 60)], "Two pictures.", seed=5)
    reference = make_llm(tiny_dir).generate(chat, GREEDY)[0].token_ids
    llm = make_llm(tiny_dir, max_num_batched_tokens=24)       # the 11x8 image's 88 placeholders span 4 chunks
    calls = []
    encode = llm.engine.model.encode_images
    llm.engine.model.encode_images = lambda images: calls.append(len(images)) or encode(images)
    assert llm.generate(chat, GREEDY)[0].token_ids == reference
    assert calls == [1, 1]                                    # each image once, however many chunks it spans
    idle_and_clean(llm)


def test_requests_that_can_never_fit_are_refused(llm, tiny_dir):
    with pytest.raises(ContextWindowError, match=r"\(128010\) exceeded this model context window limit \(128000\)"):
        llm.engine.add_request([1] * 127_000, SamplingParams(max_tokens=1010))
    tiny_pool = make_llm(tiny_dir, kv_cache_memory=4 * 16 * 512)
    with pytest.raises(ContextWindowError, match="need 5 KV blocks but the whole cache holds 4"):
        tiny_pool.engine.add_request([1] * 60, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="exceeds the model's 131072 positions"):
        make_llm(tiny_dir, max_model_len=131_073)
    assert make_llm(tiny_dir, max_model_len=131_072).engine.config.max_model_len == 131_072
    idle_and_clean(llm)


def test_seeded_sampling_repeats_alone_and_batched(llm):
    p = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    alone = llm.generate("Tell me a story.", p)[0].token_ids
    assert llm.generate("Tell me a story.", p)[0].token_ids == alone
    others = [SamplingParams(max_tokens=5, temperature=1.0, seed=s) for s in range(3)]
    batch = llm.generate(["Hi", "Tell me a story.", "Other", "More"], [others[0], p, others[1], others[2]])
    assert batch[1].token_ids == alone
    differ = llm.generate("Tell me a story.", SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=99,
                                                             ignore_eos=True))[0].token_ids
    assert differ != alone
    top1 = llm.generate("Tell me a story.", SamplingParams(max_tokens=12, temperature=1.0, top_k=1,
                                                           ignore_eos=True))[0].token_ids
    assert top1 == llm.generate("Tell me a story.", SamplingParams(max_tokens=12, temperature=0,
                                                                   ignore_eos=True))[0].token_ids
    idle_and_clean(llm)


def test_stop_strings_and_logprobs(llm):
    base = llm.generate("Write something.", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                            logprobs=3))[0]
    assert len(base.logprobs) == 20 and all(len(lp.top) == 3 for lp in base.logprobs)
    assert all(lp.top[0][1] >= lp.logprob - 1e-5 for lp in base.logprobs)    # greedy picks the top token
    stop = base.text[len(base.text) // 2: len(base.text) // 2 + 3]
    assert stop.strip()
    cut = llm.generate("Write something.", SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                           stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == base.text[:base.text.index(stop)]
    idle_and_clean(llm)


def test_async_stream_and_abort(llm):
    async def main():
        engine = AsyncLLM(engine=llm.engine)
        try:
            deltas, last = [], None
            async for out in engine.stream("Tell me a story.", GREEDY):
                deltas.append(out.delta_text)
                last = out
            assert last.finished and "".join(deltas) == last.text and len(last.token_ids) == 16

            long = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
            agen = engine.stream("Write a long essay.", long)
            seen = 0
            async for out in agen:
                seen += 1
                if seen == 3:
                    break
            await agen.aclose()                       # the client went away
            for _ in range(200):
                if not llm.engine.has_unfinished():
                    break
                await asyncio.sleep(0.01)
            assert not llm.engine.has_unfinished()
        finally:
            engine.shutdown()
    asyncio.run(main())
    idle_and_clean(llm)


@pytest.mark.slow
def test_128k_context_runs_through_chunked_prefill(make_checkpoint):
    """The full served window on CPU: 127,990 prompt tokens + 10 generated = 128,000 (slow: not in CI)."""
    ids = [1] + [1000 + (i * 7919) % 120000 for i in range(127_989)]
    llm = make_llm(long_context_checkpoint(make_checkpoint), kv_cache_memory=(128_000 + 16) * 2 * 16 * 4,
                   max_num_batched_tokens=8192)
    out = llm.generate(ids, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.usage.total_tokens == 128_000
    idle_and_clean(llm)
