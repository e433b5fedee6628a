"""The parts of `mistral-small bench` that need no server: arrivals, the rate cap, vLLM's metric definitions,
cost, workloads, and the JSON written without matplotlib."""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

from server.bench import cost, datasets, metrics, result
from server.bench.runner import WindowLimiter, arrival_times
from server.bench.tokens import PromptCounter, local_tokenizer


def test_arrivals_poisson_and_burstiness():
    assert arrival_times(5, math.inf, 1.0, np.random.default_rng(0)) == [0.0] * 5
    t = arrival_times(400, 10.0, 1.0, np.random.default_rng(0))
    assert t == sorted(t) and t[-1] == pytest.approx(40.0)            # n / rate seconds, as vLLM rescales
    cv = {b: np.std(np.diff(arrival_times(2000, 10.0, b, np.random.default_rng(1)))) * 10 for b in (0.25, 1, 4)}
    assert cv[0.25] > 1.5 and 1.2 > cv[1] > 0.8 and cv[4] < 0.6               # gamma gaps: CV = 1 / sqrt(burstiness)


def test_window_limiter_caps_sends():
    async def go():
        lim = WindowLimiter(2, window=0.3)
        t0 = time.monotonic()
        for _ in range(3):
            await lim.acquire()
        return time.monotonic() - t0
    assert asyncio.run(go()) >= 0.29


def rec(i, ttft, e2el, itl, out, prompt=10, start=0.0):
    return {"index": i, "success": True, "prompt_len": prompt, "prompt_tokens": prompt, "output_tokens": out,
            "expected_output_len": out, "output_tokens_source": "usage", "start_time_s": start, "ttft_s": ttft,
            "tpot_s": (e2el - ttft) / (out - 1) if out > 1 else None, "e2el_s": e2el, "itl_s": itl}


def test_vllm_metric_definitions_and_goodput():
    recs = [rec(0, 0.1, 0.5, [0.2, 0.2], 3), rec(1, 0.3, 0.3, [], 1, start=0.5),
            {"index": 2, "success": False, "error": "x"}]
    s = metrics.summarize(recs, 2.0, [50.0, 99.0], {"ttft": 200})
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 20, 4)
    assert s["mean_tpot_ms"] == pytest.approx(200.0)          # one-token requests have no TPOT
    assert s["median_itl_ms"] == pytest.approx(200.0) and s["mean_ttft_ms"] == pytest.approx(200.0)
    assert s["p50_e2el_ms"] == pytest.approx(400.0)
    assert s["request_goodput"] == pytest.approx(0.5)         # only the first meets TTFT <= 200 ms
    assert s["output_throughput"] == pytest.approx(2.0) and s["max_output_tokens_per_s"] == 4.0   # all in second 0
    assert metrics.summarize([], 0.0, [99.0], {})["request_throughput"] == 0.0     # never NaN
    with pytest.raises(ValueError, match="KEY is one of"):
        metrics.parse_goodput(["itl:5"])


def test_cost_figures():
    assert cost.hosted_cost(1_000_000, 1_000_000) == pytest.approx(0.91)
    rep = cost.cost_report({"total_input_tokens": 1_000_000, "total_output_tokens": 1_000_000, "duration": 3600.0,
                            "output_throughput": 1e6 / 3600}, gpu_hourly_price=1.82)
    assert rep["local_usd"] == pytest.approx(1.82) and rep["local_usd_per_m_output"] == pytest.approx(1.82)
    assert rep["break_even_utilisation"] == pytest.approx(2.0)        # 1.82 $/h vs 0.91 $ of tokens per hour


@pytest.fixture(scope="module")
def counter():
    return PromptCounter(local_tokenizer())


def test_workloads_plan_exact_lengths(counter):
    cfg = datasets.WorkloadConfig(num_prompts=5, random_input_len=100, random_output_len=7, random_range_ratio=0.3)
    samples = datasets.build(cfg, counter, chat=True)
    for s in samples:
        assert counter.chat(s.messages()) == s.prompt_len and 70 <= s.prompt_len <= 130
    mm = datasets.build(datasets.WorkloadConfig(dataset_name="random-mm", num_prompts=2, random_input_len=120,
                                                random_mm_bucket_config="{(30, 50, 1): 1.0}"), counter, chat=True)
    assert all(len(s.images) == 1 and counter.chat(s.messages()) == s.prompt_len == 120 for s in mm)
    sg = datasets.build(datasets.WorkloadConfig(dataset_name="sharegpt", num_prompts=50), counter, chat=True)
    assert len(sg) == 50 and len({s.prompt for s in sg}) == 40          # 40 shipped conversations, repeated
    assert all(s.expected_output_len >= 4 for s in sg)


@pytest.mark.parametrize("changes,message", [
    ({"dataset_name": "nope"}, "--dataset-name must be one of"),
    ({"dataset_name": "custom"}, "needs --dataset-path"),
    ({"dataset_name": "random-mm", "random_mm_bucket_config": "{(1, 1, 4): 1.0}"}, "only images"),
    ({"random_range_ratio": 1.0}, "--random-range-ratio"),
])
def test_workload_flags_are_checked(changes, message):
    with pytest.raises(ValueError, match=message):
        datasets.WorkloadConfig(**changes)


def test_impossible_lengths_and_bad_files_are_clear(counter, tmp_path):
    with pytest.raises(ValueError, match="impossible"):
        datasets.build(datasets.WorkloadConfig(dataset_name="random-mm", num_prompts=1, random_input_len=5,
                                               random_mm_bucket_config="{(64, 64, 1): 1.0}"), counter, chat=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="line 2"):
        datasets.build(datasets.WorkloadConfig(dataset_name="custom", dataset_path=str(bad)), counter, chat=True)


def test_json_is_written_without_matplotlib(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    recs = [rec(0, 0.1, 0.5, [0.2, 0.2], 3)]
    res = {"requests": recs, "model_id": "m", "label": "x", "request_rate": "inf", "date": "d",
           **metrics.summarize(recs, 1.0, [99.0], {})}
    args = SimpleNamespace(result_filename=None, max_concurrency=None, result_dir=str(tmp_path))
    path, png, why = result.save(args, res)
    assert json.loads(path.read_text())["completed"] == 1 and png is None
    assert "mistral-small-engine[bench]" in why
