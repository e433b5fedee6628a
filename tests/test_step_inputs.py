"""Step inputs built from persistent state (engine/input_batch.py): block-table rows that only grow and equal
a from-scratch rebuild, penalty statistics equal to a from-scratch build, one device->host copy per step, a
decode step that reads only the tokens it computes."""

import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.request import Request
from engine.sampler import SampledTokens, SamplerOutput, SamplingBatch, uses_penalties
from engine.staging import ReadBack, StagingArena

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def make_llm(path, **kw):
    kw.setdefault("kv_cache_memory", 32 * 2**20)
    return LLM(path, device="cpu", dtype="float32", progress=False, **kw)


def prompts(n=12):
    rng = random.Random(1)
    words = "the a cat sea wind river stone light night poem tell me about why how".split()
    system = {"role": "system", "content": "You answer briefly and kindly. " * 6}     # shared: prefix-cache hits
    out = []
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 70)))
        out.append([system, {"role": "user", "content": text}] if i % 3 == 0 else text)
    return out


def after_prepare(runner, check):
    """Call check(sched, step_inputs) after every InputBatch.prepare."""
    prepare = runner.inputs.prepare

    def checked(sched, kv_caches):
        step = prepare(sched, kv_caches)
        if step is not None:
            check(sched, step)
        return step
    runner.inputs.prepare = checked


def check_against_rebuild(runner, sched, step):
    """Everything prepare built incrementally equals what the per-step rebuild (the code before the persistent
    buffers) made from each request's block list and tokens."""
    bs, bt = runner.config.block_size, runner.inputs.block_table
    reqs = [s.request for s in sched.scheduled]
    width = max(len(r.block_ids) for r in reqs)
    tables = torch.tensor([r.block_ids + [0] * (width - len(r.block_ids)) for r in reqs], dtype=torch.int32)
    assert torch.equal(step.ctx.block_tables, tables)
    ids, positions, slots = [], [], []
    for s in sched.scheduled:
        r, start = s.request, s.request.num_computed_tokens
        pos = np.arange(start, start + s.num_tokens)
        ids += r.all_token_ids[start:start + s.num_tokens].tolist()
        positions += pos.tolist()
        slots += (np.asarray(r.block_ids)[pos // bs] * bs + pos % bs).tolist()
    assert step.input_ids.tolist() == ids and step.positions.tolist() == positions
    assert step.ctx.slot_mapping.tolist() == slots and step.ctx.slot_mapping.dtype == torch.int64
    qlens = [s.num_tokens for s in sched.scheduled]
    assert step.ctx.query_lens_cpu == qlens and step.ctx.cu_seqlens_q.tolist() == np.cumsum([0] + qlens).tolist()
    assert step.ctx.seq_lens.tolist() == step.ctx.seq_lens_cpu == [r.num_computed_tokens + q
                                                                     for r, q in zip(reqs, qlens)]
    # the persistent rows themselves: each holder's blocks then zeros; free rows all zero
    held = set()
    for r, row in bt.row_of.items():
        n = len(r.block_ids)
        assert bt.num_blocks[row] == n and bt.table[row, :n].tolist() == r.block_ids
        assert not bt.table[row, n:].any()
        held.add(row)
    free = [row for row in range(bt.table.shape[0]) if row not in held]
    assert not bt.table[free].any()


def test_block_table_rows_equal_a_rebuild_after_churn_preemption_and_prefix_hits(tiny_dir):
    alone = make_llm(tiny_dir, enable_prefix_caching=False)
    want = [alone.generate(p, GREEDY)[0].token_ids for p in prompts()]
    # 20 blocks of 16 tokens and 48-token steps: chunked prefills, preemptions, prefix hits, rows reused
    llm = make_llm(tiny_dir, kv_cache_memory=20 * 16 * 512, max_num_batched_tokens=48)
    runner = llm.engine.runner
    staged, steps = [], []
    stage = runner.inputs.block_table.stage_new_blocks

    def counting(reqs, rows, staging):
        before = sum(runner.inputs.block_table.num_blocks[row] for row in rows)
        out = stage(reqs, rows, staging)
        staged.append(sum(runner.inputs.block_table.num_blocks[row] for row in rows) - before)
        return out
    runner.inputs.block_table.stage_new_blocks = counting
    after_prepare(runner, lambda sched, step: steps.append(sched) or check_against_rebuild(runner, sched, step))
    outs = llm.generate(prompts(), GREEDY)
    assert [o.token_ids for o in outs] == want
    eng = llm.engine
    assert eng.scheduler.num_preemptions > 0 and eng.block_manager.num_hits > 0
    # rows only grow: a decode-only step uploads at most one new block per request
    for sched, n in zip(steps, staged):
        if all(s.num_tokens == 1 for s in sched.scheduled):
            assert n <= len(sched.scheduled)
    eng.step()                                      # the last finished requests leave the batch
    assert not runner.inputs.block_table.row_of and not runner.inputs.penalties.row_of
    assert not runner.inputs.block_table.table.any()
    eng.check_integrity()


# Penalties that pull towards seen tokens: the random model's own choices rarely repeat, so penalties that push
# away from them would change nothing
PENALTIES = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, repetition_penalty=0.3),
             SamplingParams(max_tokens=14, temperature=0.8, seed=5, ignore_eos=True, frequency_penalty=-1.5,
                            presence_penalty=-0.7),
             SamplingParams(max_tokens=14, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=14, temperature=1.0, seed=9, ignore_eos=True, repetition_penalty=0.6,
                            frequency_penalty=-1.0)]


def test_penalty_state_equals_a_from_scratch_build_through_preemption(tiny_dir):
    ps = prompts(8)
    params = [PENALTIES[i % 4] for i in range(8)]
    ref = make_llm(tiny_dir, enable_prefix_caching=False)
    want = [ref.generate(p, sp)[0].token_ids for p, sp in zip(ps, params)]
    llm = make_llm(tiny_dir, kv_cache_memory=16 * 16 * 512, enable_prefix_caching=False)
    inputs, checked = llm.engine.runner.inputs, []
    build = inputs.sampling_batch

    def compare(reqs, eos_id, vocab_size):
        batch = build(reqs, eos_id, vocab_size)
        scratch = SamplingBatch.build([r.params for r in reqs], [r.seed for r in reqs],
                                      [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
                                      eos_id, vocab_size, "cpu")
        assert (batch.use_seen, batch.use_counts) == (scratch.use_seen, scratch.use_counts)
        for i, r in enumerate(reqs):          # rows without a penalty may hold anything: they are not read
            if scratch.use_seen and scratch.repetition_penalty[i] != 1:
                assert torch.equal(batch.seen[i], scratch.seen[i])
            if scratch.use_counts and (r.params.frequency_penalty or r.params.presence_penalty):
                assert torch.equal(batch.counts[i], scratch.counts[i])
        checked.append(sum(uses_penalties(r.params) for r in reqs))
        return batch
    inputs.sampling_batch = compare
    outs = llm.generate(ps, params)
    assert [o.token_ids for o in outs] == want
    assert llm.engine.scheduler.num_preemptions > 0 and sum(checked) > 20
    assert ref.generate(ps[0], PENALTIES[2])[0].token_ids != want[0]    # the penalty did change the output
    llm.engine.step()
    assert not inputs.penalties.row_of
    llm.engine.check_integrity()


SYNCING = ("item", "tolist", "cpu", "__bool__", "__int__", "__float__")


def test_one_device_to_host_copy_per_step(tiny_llm, monkeypatch):
    """Outside the model's forward, a step reads nothing back from tensors except through ReadBack.fetch,
    which it calls exactly once when some request samples (never when none does)."""
    eng = tiny_llm.engine
    runner = eng.runner
    grammar = eng.grammars.json_schema({"type": "object", "properties": {"a": {"type": "integer"}}})
    reads, fetches, state = [], [], {"model": False}
    for name in SYNCING:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **k):
            if not state["model"]:
                reads.append(_name)
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, wrapped)
    for attr in ("forward", "compute_logits"):           # the model's own code is not this test's subject
        real = getattr(runner.model, attr)

        def inside(*a, _real=real, **k):
            state["model"] = True
            try:
                return _real(*a, **k)
            finally:
                state["model"] = False
        monkeypatch.setattr(runner.model, attr, inside)
    fetch = runner.inputs.readback.fetch
    monkeypatch.setattr(runner.inputs.readback, "fetch", lambda v: fetches.append(v.shape) or fetch(v))

    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=40, temperature=0.9, seed=3, grammar=grammar),
              SamplingParams(max_tokens=10, temperature=0.7, seed=1, repetition_penalty=1.3, frequency_penalty=0.4,
                             stop=["e"]),
              SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)]
    ids = [eng.add_request(p, sp) for p, sp in zip(["Hi", "JSON", "Write", "x " * 300], params)]
    reads.clear()
    steps = 0
    while eng.has_unfinished():
        before = len(fetches)
        outs = eng.step()
        steps += 1
        sampled = sum(1 for o in outs if o.delta_token_ids)
        assert len(fetches) - before == (1 if sampled else 0)
        if sampled:
            assert fetches[-1][0] == sampled
    assert reads == [] and steps > 5
    eng.check_integrity()
    assert set(ids).isdisjoint(eng.core.requests)


def test_a_decode_step_reads_only_the_tokens_it_computes(make_checkpoint, monkeypatch):
    """With an 8k-token context, decode steps touch one new token id (and a new block's 16 when it fills), and
    the request's block list only through its new entries: nothing proportional to the context."""
    from engine.tiny_checkpoint import TINY
    d = make_checkpoint(cfg=replace(TINY, text=replace(TINY.text, num_hidden_layers=1, num_attention_heads=2,
                                                      num_key_value_heads=1)))
    llm = make_llm(d, max_num_batched_tokens=8192)
    eng = llm.engine
    ids = [1] + [1000 + (i * 7919) % 120000 for i in range(8191)]
    rid = eng.add_request(ids, SamplingParams(max_tokens=200, temperature=0.8, seed=1, repetition_penalty=1.2))
    eng.step()                                          # the prefill: the first token
    req = eng.core.requests[rid]
    assert req.num_output_tokens == 1

    class Guarded(list):
        """A block list that may be indexed and appended, or sliced past a given length, but never read whole."""
        def __iter__(self):
            raise AssertionError("iterated the whole block list")

        def __getitem__(self, i):
            if isinstance(i, slice):
                start = i.start or 0
                assert start >= len(self) - 1 and i.stop is None, f"block list sliced at {i}"
            return list.__getitem__(self, i)

        def copy(self):
            raise AssertionError("copied the whole block list")

    lengths = []
    token_ids = Request.token_ids
    monkeypatch.setattr(Request, "token_ids", lambda self, s, e: lengths.append(e - s) or token_ids(self, s, e))
    for name in ("prompt_token_ids", "output_token_ids", "all_token_ids"):
        monkeypatch.setattr(Request, name, property(lambda self, _n=name: pytest.fail(f"{_n} read in a step")))
    req.block_ids = Guarded(req.block_ids)
    for _ in range(40):
        eng.step()
    assert req.num_output_tokens == 41 and len(req.block_ids) > 8192 // 16
    assert lengths and max(lengths) <= eng.config.block_size     # 1 per decode; 16 to hash a block that filled
    assert lengths.count(1) == 40
    monkeypatch.undo()
    req.block_ids = list.__getitem__(req.block_ids, slice(None))
    eng.abort(rid)
    eng.check_integrity()


# ---- the transfer buffers ------------------------------------------------------------------------------------
def test_staging_arena_grows_mid_step_without_losing_staged_values():
    arena = StagingArena(torch.device("cpu"), nbytes=256)
    arena.reset()
    a = arena.put([1, 2, 3], torch.int64)
    host, mask = arena.alloc((2, 5), torch.int32)
    host.copy_(torch.arange(10, dtype=torch.int32).view(2, 5))
    big = arena.put(np.arange(1000), torch.int64)               # does not fit: a new, larger arena
    c = arena.put([True, False], torch.bool)
    assert arena.capacity > 256
    arena.flush()
    assert a.tolist() == [1, 2, 3] and mask.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert torch.equal(big, torch.arange(1000)) and c.tolist() == [True, False]
    assert a.data_ptr() % 64 == mask.data_ptr() % 64 == 0
    arena.reset()                                               # the next step reuses the (grown) arena
    d = arena.put([7.5], torch.float32)
    arena.flush()
    assert d.tolist() == [7.5] and arena.capacity > 256


def test_sampled_results_round_trip_exactly_through_one_copy():
    torch.manual_seed(0)
    ids = torch.tensor([0, 131071, 2, 99999])
    lp = torch.randn(4) * 30
    top_ids, top_lp = torch.randint(0, 131072, (4, 5)), torch.randn(4, 5)
    back = ReadBack(torch.device("cpu"), numel=8)                # grows to fit
    full = SampledTokens(back.fetch(SamplerOutput(ids, lp, top_ids, top_lp).pack()))
    assert full.token_ids == ids.tolist() and full.logprobs == lp.tolist()
    assert full.top_ids == top_ids.tolist() and full.top_logprobs == top_lp.tolist()
    only = SampledTokens(back.fetch(SamplerOutput(ids, lp, None, None).pack()))
    assert only.logprobs == lp.tolist() and only.top_ids is None
    bare = SampledTokens(back.fetch(SamplerOutput(ids, None, None, None).pack()))
    assert bare.token_ids == ids.tolist() and bare.logprobs is None and bare.top_logprobs is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_engine_steps_make_no_implicit_sync_on_gpu(tiny_dir, monkeypatch):
    """torch's sync debug mode raises on any implicit device sync (pageable copies, .item(), .tolist(),
    nonzero): outside the model's forward none may happen in a step; ReadBack waits on an event explicitly."""
    llm = LLM(tiny_dir, device="cuda", dtype="float32", progress=False, kv_cache_memory=32 * 2**20)
    eng, runner = llm.engine, llm.engine.runner
    for attr in ("forward", "compute_logits"):
        real = getattr(runner.model, attr)

        def inside(*a, _real=real, **k):
            torch.cuda.set_sync_debug_mode(0)
            try:
                return _real(*a, **k)
            finally:
                torch.cuda.set_sync_debug_mode("error")
        monkeypatch.setattr(runner.model, attr, inside)
    grammar = eng.grammars.json_schema({"type": "object"})
    for p, sp in zip(prompts(4), [PENALTIES[0], PENALTIES[1], SamplingParams(max_tokens=8, logprobs=2),
                                  SamplingParams(max_tokens=8, grammar=grammar)]):
        eng.add_request(p, sp)
    torch.cuda.set_sync_debug_mode("error")
    try:
        while eng.has_unfinished():
            eng.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    eng.check_integrity()
