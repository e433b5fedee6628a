"""SamplingParams validation and the batched, counter-based sampler."""

import dataclasses
import math

import pytest
import torch

from engine.sampler import (Sampler, SamplingBatch, _random_uniform_tensor, apply_penalties, random_uniform,
                            top_k_top_p_mask)
from engine.sampling_params import SamplingParams as SP

EOS = 2
sample = Sampler()


def build(params, prompts=None, outputs=None, seeds=None, vocab=50):
    n = len(params)
    return SamplingBatch.build(params, seeds if seeds is not None else [p.seed or 0 for p in params],
                               prompts or [[] for _ in range(n)], outputs or [[] for _ in range(n)], EOS, vocab,
                               "cpu")


# ---- SamplingParams ------------------------------------------------------------------------------------------
BAD = [
    ("max_tokens", 0), ("max_tokens", 1.0), ("max_tokens", True),
    ("temperature", -1), ("temperature", math.nan), ("temperature", math.inf), ("temperature", True),
    ("temperature", "0.5"), ("temperature", None),
    ("top_p", -0.1), ("top_p", math.nan), ("top_p", False),
    ("top_k", -2), ("top_k", 1.5), ("top_k", True),
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", True),
    ("repetition_penalty", -0.5), ("repetition_penalty", math.inf), ("repetition_penalty", math.nan),
    ("frequency_penalty", 2.5), ("frequency_penalty", -2.1), ("frequency_penalty", math.nan),
    ("presence_penalty", -3), ("presence_penalty", True), ("presence_penalty", -math.inf),
    ("stop", [""]), ("stop", ""), ("stop", [1]), ("stop", ["a"] * 17), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", ["a"]), ("stop_token_ids", 5), ("stop_token_ids", [True]),
    ("min_tokens", -1), ("min_tokens", 257), ("min_tokens", 1.0),
    ("ignore_eos", 1), ("ignore_eos", "yes"),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", True), ("logprobs", 1.0),
]


@pytest.mark.parametrize("field,value", BAD)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError) as e:
        SP(**{field: value})
    assert str(e.value).startswith(f"{field}: "), str(e.value)


@pytest.mark.parametrize("kwargs", [
    {"temperature": 5}, {"top_p": 0}, {"top_p": 2}, {"repetition_penalty": 0}, {"repetition_penalty": 2},
    {"top_k": -1}, {"top_k": 50}, {"seed": 0}, {"seed": 9999999999}, {"seed": 2**63 - 1},
    {"frequency_penalty": -2, "presence_penalty": 2}, {"logprobs": 0}, {"logprobs": 20},
    {"max_tokens": 4, "min_tokens": 4}, {"stop": ["a"] * 16}, {"stop_token_ids": [0, 7]},
])
def test_edge_values_accepted(kwargs):
    SP(**kwargs)


def test_normalization_defaults_and_greedy():
    p = SP(stop="END", stop_token_ids=[5, 6], temperature=1)
    assert p.stop == ("END",) and p.stop_token_ids == (5, 6)
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert SP(stop=["a", "b"]).stop == ("a", "b")
    hash(p)  # frozen + tuples: usable as a dict key
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5
    d = SP()
    assert (d.max_tokens, d.temperature, d.top_p, d.top_k, d.seed, d.ignore_eos) == (256, 0.15, 1.0, 0, None, False)
    assert (d.repetition_penalty, d.frequency_penalty, d.presence_penalty, d.stop, d.stop_token_ids,
            d.min_tokens, d.logprobs) == (1.0, 0.0, 0.0, (), (), 0, None)
    assert SP(temperature=0).greedy and SP(top_k=1).greedy and SP(top_p=0).greedy
    assert not SP().greedy and not SP(top_k=-1, temperature=5).greedy


# ---- greedy --------------------------------------------------------------------------------------------------
def test_greedy_variants_are_argmax():
    torch.manual_seed(0)
    logits = torch.randn(64, 1000)
    want = logits.argmax(-1)
    for p in (SP(temperature=0), SP(temperature=1.0, top_k=1), SP(temperature=1.0, top_p=0)):
        out = sample(logits, build([dataclasses.replace(p, seed=i) for i in range(64)], vocab=1000))
        assert torch.equal(out.token_ids, want), p
    # the truncation path itself, not just the greedy shortcut, must leave only the argmax
    keep = top_k_top_p_mask(logits, torch.ones(64, dtype=torch.long), torch.ones(64))
    assert torch.equal(keep.sum(-1), torch.ones(64, dtype=torch.long)) and keep[torch.arange(64), want].all()
    keep = top_k_top_p_mask(logits, torch.zeros(64, dtype=torch.long), torch.zeros(64))
    assert torch.equal(keep.sum(-1), torch.ones(64, dtype=torch.long)) and keep[torch.arange(64), want].all()
    b = build([SP(temperature=1.0, top_k=1, seed=i) for i in range(64)], vocab=1000)
    b.greedy[:], b.all_greedy, b.use_top_k = False, False, True
    assert torch.equal(sample(logits, b).token_ids, want)


# ---- penalties -----------------------------------------------------------------------------------------------
def test_repetition_penalty_exact():
    torch.manual_seed(1)
    logits = torch.randn(3, 20) * 3
    prompts, outputs = [[1, 2, 3], [1, 2, 3], [4]], [[3, 5], [3, 5], [6]]
    b = build([SP(repetition_penalty=1.5), SP(repetition_penalty=1.0), SP(repetition_penalty=0.5)],
              prompts, outputs, vocab=20)
    got = apply_penalties(logits, b)
    want = logits.clone()
    for row, rp, toks in ((0, 1.5, {1, 2, 3, 5}), (2, 0.5, {4, 6})):
        for t in toks:
            x = logits[row, t]
            want[row, t] = x / rp if x > 0 else x * rp
    assert torch.equal(got, want)
    assert (got[0, [1, 2, 3, 5]] != logits[0, [1, 2, 3, 5]]).all()  # the data has no zero logit
    for rp in (0.0, 1.0):  # both mean "off": no change, and the work is skipped
        b = build([SP(repetition_penalty=rp)] * 3, prompts, outputs, vocab=20)
        assert not b.use_seen and b.seen is None and torch.equal(apply_penalties(logits, b), logits)


def test_frequency_presence_exact():
    logits = torch.zeros(2, 12)
    b = build([SP(frequency_penalty=0.5, presence_penalty=0.25), SP(frequency_penalty=-2, presence_penalty=-1)],
              [[9, 9], [9]], [[4, 4, 4, 7], [4, 4, 4, 7]], vocab=12)
    got = apply_penalties(logits, b)
    want = torch.zeros(2, 12)
    want[0, 4], want[0, 7] = -3 * 0.5 - 0.25, -0.5 - 0.25
    want[1, 4], want[1, 7] = 3 * 2 + 1, 2 + 1   # negative penalties encourage repeats
    assert torch.equal(got, want)               # prompt token 9 untouched: OpenAI counts generated tokens only
    assert build([SP()] * 2, outputs=[[1], [2]]).counts is None


def test_min_tokens_bans_eos_and_stop_ids_until_reached():
    logits = torch.zeros(1, 10)
    logits[0, EOS], logits[0, 7], logits[0, 5] = 100.0, 90.0, 50.0
    for temp in (0.0, 1.0):
        for ignore_eos in (False, True):   # as in vLLM, ignore_eos does not lift the ban
            p = SP(min_tokens=3, stop_token_ids=[7], temperature=temp, ignore_eos=ignore_eos, seed=3)
            for n in range(3):
                out = sample(logits, build([p], outputs=[[0] * n], vocab=10))
                assert out.token_ids.item() == 5
            assert sample(logits, build([p], outputs=[[0] * 3], vocab=10)).token_ids.item() == EOS


# ---- truncation ----------------------------------------------------------------------------------------------
def test_top_p_keeps_smallest_set_reaching_p():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log()   # unsorted on purpose
    for p, kept in ((0.5, [1]), (0.8, [1, 3]), (0.81, [1, 2, 3]), (0.95, [1, 2, 3]), (0.96, [0, 1, 2, 3]),
                    (1.0, [0, 1, 2, 3]), (2.0, [0, 1, 2, 3]), (0.0, [1])):
        keep = top_k_top_p_mask(logits, torch.tensor([0]), torch.tensor([p]))
        assert keep[0].nonzero().flatten().tolist() == kept, p


def test_top_k_ties_and_top_p_after_top_k():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    keep = top_k_top_p_mask(logits, torch.tensor([2]), torch.tensor([1.0]))
    assert keep[0].tolist() == [True, False, True, True, False]   # the tie at the 2nd value is kept
    # top-p measures mass in the top-k renormalized distribution: [.4,.3,.2] -> [.44,.33,.22], so p=.75 keeps 2
    logits = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    assert top_k_top_p_mask(logits, torch.tensor([3]), torch.tensor([0.75]))[0].tolist() == [True, True, False, False]
    assert top_k_top_p_mask(logits, torch.tensor([0]), torch.tensor([0.75]))[0].tolist() == [True, True, True, False]


# ---- seeds ---------------------------------------------------------------------------------------------------
def test_seeded_rows_ignore_batch_composition():
    torch.manual_seed(2)
    V = 500
    target, row = SP(temperature=1.0, seed=42), torch.randn(V)
    others = [SP(temperature=0.7, seed=7, top_k=20), SP(temperature=0), SP(temperature=1.3, seed=9, top_p=0.9,
                                                                           repetition_penalty=1.3)]
    for step in (0, 1, 17):
        alone = sample(row[None], build([target], outputs=[[0] * step], vocab=V)).token_ids.item()
        for pos in range(len(others) + 1):
            params = others[:pos] + [target] + others[pos:]
            logits = torch.randn(len(params), V)
            logits[pos] = row
            outs = [[1, 2]] * len(params)
            outs[pos] = [0] * step
            got = sample(logits, build(params, prompts=[[3, 4]] * len(params), outputs=outs, vocab=V))
            assert got.token_ids[pos].item() == alone, (step, pos)


def test_different_seeds_and_steps_differ():
    torch.manual_seed(3)
    V = 500
    logits = torch.randn(1, V).expand(50, V)

    def run(seed):
        return sample(logits, build([SP(temperature=1.0, seed=seed)] * 50, outputs=[[0] * s for s in range(50)],
                                    vocab=V)).token_ids.tolist()

    a, b = run(1), run(2)
    assert a == run(1)
    assert a != b and sum(x == y for x, y in zip(a, b)) < 10
    assert len(set(a)) > 25   # different steps give different draws
    # the noise is a pure function of (seed, step, token index): a wider vocabulary leaves the prefix alone
    s, t = torch.tensor([5, 2**40 + 5, -3]), torch.tensor([0, 0, 2**33])
    assert torch.equal(random_uniform(s, t, 100), random_uniform(s, t, 1000)[:, :100])
    assert len(set(random_uniform(s, t, 1000).flatten().tolist())) > 2990


# ---- distribution --------------------------------------------------------------------------------------------
CHI2_999 = {2: 13.8155, 3: 16.2662, 7: 24.3219}   # scipy.stats.chi2.ppf(0.999, dof)
LOGITS8 = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])


@pytest.mark.parametrize("extra,kept", [({}, 8), ({"top_k": 3}, 3), ({"top_p": 0.92}, 4)])
def test_chi_square_goodness_of_fit(extra, kept):
    N, T = 24000, 0.7
    b = build([SP(temperature=T, seed=1, **extra)] * N, vocab=8)
    b.seeds = torch.tensor([11, 222, 3333, 2**62 + 1]).repeat_interleave(N // 4)
    b.steps = torch.arange(N) % (N // 4)
    counts = torch.bincount(sample(LOGITS8.expand(N, 8), b).token_ids, minlength=8).double()
    probs = torch.softmax(LOGITS8.double() / T, -1)
    # the kept set is a prefix: LOGITS8 is sorted (test_top_p_case_really_keeps_four checks the top_p case)
    probs[kept:] = 0
    probs /= probs.sum()
    assert counts[kept:].sum() == 0, "a truncated-away token was drawn"
    expected = probs[:kept] * N
    stat = ((counts[:kept] - expected) ** 2 / expected).sum().item()
    assert stat < CHI2_999[kept - 1], (stat, counts.tolist(), expected.tolist())


def test_top_p_case_really_keeps_four():
    probs = torch.softmax(LOGITS8 / 0.7, -1)
    assert probs[:3].sum() < 0.92 <= probs[:4].sum()   # so the χ² top_p case above keeps exactly 4 tokens


# ---- logprobs ------------------------------------------------------------------------------------------------
def test_logprobs_are_raw_and_mixed_batches_work():
    torch.manual_seed(4)
    logits = torch.randn(4, 50)
    params = [SP(logprobs=5, temperature=1.0, seed=1, repetition_penalty=1.5), SP(temperature=0.5, seed=2),
              SP(logprobs=0, temperature=0), SP(logprobs=2, top_k=3, temperature=2.0, seed=4)]
    out = sample(logits, build(params, prompts=[[1, 2]] * 4, vocab=50))
    raw = torch.log_softmax(logits, -1)
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None])[:, 0])
    top = raw.topk(5, dim=-1)
    assert torch.equal(out.top_ids, top.indices) and torch.equal(out.top_logprobs, top.values)
    assert out.top_ids.dtype == torch.int64 and out.token_ids.dtype == torch.int64
    assert sample(logits, build([SP(temperature=0)] * 4, vocab=50)).logprobs is None
    only_chosen = sample(logits, build([SP(logprobs=0)] * 4, vocab=50))
    assert only_chosen.logprobs.shape == (4,) and only_chosen.top_ids is None


# ---- numerics ------------------------------------------------------------------------------------------------
def test_extreme_logits_and_hot_temperature_stay_finite():
    torch.manual_seed(5)
    V = 300
    logits = torch.randn(6, V) * 1e4
    logits[:, ::7] = float("-inf")
    logits[:, 3] = 1e4
    params = [SP(temperature=5, seed=1), SP(temperature=5, seed=2, top_p=0.9, logprobs=3),
              SP(temperature=5, seed=3, top_k=5, repetition_penalty=2, frequency_penalty=2, presence_penalty=-2),
              SP(temperature=1e-7, seed=4), SP(temperature=0), SP(temperature=5, seed=6, top_p=0)]
    out = sample(logits, build(params, prompts=[[3, 10, 20]] * 6, outputs=[[3, 3]] * 6, vocab=V))
    assert ((out.token_ids >= 0) & (out.token_ids < V)).all()
    assert torch.isfinite(logits.gather(1, out.token_ids[:, None])).all()   # never a -inf token
    assert not out.logprobs.isnan().any() and not out.top_logprobs.isnan().any()
    # temperature 5 on moderate logits: a near-uniform spread, still finite
    flat = torch.randn(1, V).expand(2000, V)
    b = build([SP(temperature=5, seed=8)] * 2000, vocab=V)
    b.steps = torch.arange(2000)
    tokens = sample(flat, b).token_ids
    assert len(set(tokens.tolist())) > 200


def test_cpu_noise_equals_the_device_formula():
    """The numpy fast path on CPU and the tensor path GPUs run give the very same numbers."""
    seeds = torch.tensor([0, 1, 2**62 + 5, 12345, 2**63 - 1], dtype=torch.int64)
    steps = torch.tensor([0, 5, 7, 2**40, 3], dtype=torch.int64)
    assert torch.equal(random_uniform(seeds, steps, 4099), _random_uniform_tensor(seeds, steps, 4099))
