"""`mistral-small bench` against our server on the tiny checkpoint (loopback): both routes, rate and concurrency
modes, the shipped ShareGPT file and an image workload. Its counts must equal the server's own usage and
/metrics counters for the run, and every request's client-side TTFT must be at least the TTFT the server logged
for the same request (matched by x-request-id)."""

from __future__ import annotations

import json
import logging
import os
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixture import start_server, tiny_engine

from server.bench import runner
from server.cli import main as cli_main
from server.config import API_KEY_ENV, CLOUDFLARE_MODEL, ServerSettings

ROUND = 5e-5            # the server's log line rounds TTFT to 0.1 ms


@pytest.fixture(scope="module")
def live(tiny_dir):
    mp = pytest.MonkeyPatch()
    mp.delenv(API_KEY_ENV, raising=False)
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    yield srv
    srv.stop()
    mp.undo()


def counters(url: str) -> dict:
    text = httpx.get(f"{url}/metrics").text
    out = {"vllm:prompt_tokens_total": 0.0, "vllm:generation_tokens_total": 0.0, "success": 0.0}  # none yet
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in ("vllm:prompt_tokens_total", "vllm:generation_tokens_total"):
                out[s.name] = s.value
            elif s.name == "vllm:request_success_total":
                out["success"] += s.value
    return out


def bench(tmp_path, argv: list[str]) -> tuple[int, dict | None]:
    code = cli_main(["bench", "--no-progress", "--save-result", "--result-dir", str(tmp_path),
                     "--result-filename", "run.json", *argv])
    path = tmp_path / "run.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def server_logs(caplog) -> dict[str, dict]:
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "server.requests"]
    return {line["request_id"]: line for line in lines}


CASES = {
    # route, dataset and load mode
    "workers-sharegpt-rate": ["--backend", "workers", "--dataset-name", "sharegpt", "--num-prompts", "6",
                              "--sharegpt-output-len", "5", "--request-rate", "8", "--burstiness", "0.5"],
    "openai-chat-random-mm-concurrency": ["--backend", "openai-chat", "--dataset-name", "random-mm",
                                          "--num-prompts", "4", "--random-input-len", "48", "--random-output-len",
                                          "4", "--random-mm-bucket-config", "{(40, 60, 1): 0.5, (28, 28, 1): 0.5}",
                                          "--max-concurrency", "2"],
    "openai-completions-random-concurrency": ["--backend", "openai", "--dataset-name", "random", "--num-prompts",
                                              "4", "--random-input-len", "30", "--random-output-len", "4",
                                              "--random-range-ratio", "0.5", "--max-concurrency", "3"],
    "workers-prefix-repetition-rate": ["--backend", "workers", "--dataset-name", "prefix_repetition",
                                       "--num-prompts", "4", "--prefix-repetition-prefix-len", "20",
                                       "--prefix-repetition-suffix-len", "10", "--prefix-repetition-num-prefixes",
                                       "2", "--prefix-repetition-output-len", "3", "--request-rate", "20"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bench_counts_equal_the_servers(live, tmp_path, caplog, case):
    caplog.set_level(logging.INFO, logger="server.requests")
    before = counters(live.url)
    caplog.clear()
    code, res = bench(tmp_path, ["--base-url", live.url, "--ignore-eos", "--gpu-hourly-price", "2", *CASES[case]])
    after = counters(live.url)
    assert code == 0 and res is not None
    n = len(res["requests"])
    assert res["completed"] == n and res["failed"] == 0 and not res["warnings"], res["warnings"]
    first = res["initial_test"]
    assert first["success"] and first["output_tokens"] == 1
    # the server's own counters moved by exactly what bench counted (plus its one-token initial test)
    assert after["vllm:prompt_tokens_total"] - before["vllm:prompt_tokens_total"] == \
        res["total_input_tokens"] + first["prompt_tokens"]
    assert after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"] == \
        res["total_output_tokens"] + 1
    assert after["success"] - before["success"] == n + 1
    logs = server_logs(caplog)
    assert len(logs) == n + 1
    for r in res["requests"]:
        line = logs[r["request_id"]]
        # planned length == usage == what the server logged; --ignore-eos: exactly the planned output
        assert r["prompt_len"] == r["prompt_tokens"] == line["prompt_tokens"], r
        assert r["output_tokens"] == r["expected_output_len"] == line["completion_tokens"]
        assert r["output_tokens_source"] == "usage"
        assert r["ttft_s"] >= line["ttft_s"] - ROUND, (r["ttft_s"], line)
        assert r["e2el_s"] >= r["ttft_s"] and len(r["itl_s"]) <= r["output_tokens"] - 1
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_itl_ms", "p99_e2el_ms", "max_output_tokens_per_s"):
        assert isinstance(res[key], float), key
    assert res["cost"]["local_usd"] > 0 and res["cost"]["hosted_usd"] > 0
    assert (tmp_path / "run.png").stat().st_size > 10_000            # the plots
    live.assert_drained()


def test_random_lengths_are_planned_exactly(live, tmp_path):
    """--random-input-len means usage.prompt_tokens, template included, on each route."""
    for backend in ("workers", "openai"):
        code, res = bench(tmp_path, ["--base-url", live.url, "--backend", backend, "--num-prompts", "3",
                                     "--random-input-len", "57", "--random-output-len", "2", "--dry-run"])
        assert code == 0 and res is None        # a dry run sends nothing and writes nothing
    code, res = bench(tmp_path, ["--base-url", live.url, "--num-prompts", "3", "--random-input-len", "57",
                                 "--random-output-len", "2"])
    assert [r["prompt_tokens"] for r in res["requests"]] == [57, 57, 57]


def test_request_id_header_matches_the_log_line_on_both_routes(live, caplog):
    caplog.set_level(logging.INFO, logger="server.requests")
    caplog.clear()
    run = f"/client/v4/accounts/acct/ai/run/{CLOUDFLARE_MODEL}"
    msgs = [{"role": "user", "content": "Hi"}]
    ids = []
    with httpx.Client(base_url=live.url, timeout=60) as c:
        for path, body in ((run, {"messages": msgs}), ("/v1/chat/completions", {"messages": msgs}),
                           ("/v1/completions", {"prompt": "Hi"})):
            for stream in (False, True):
                r = c.post(path, json={**body, "max_tokens": 2, "stream": stream})
                assert r.status_code == 200
                rid = r.headers["x-request-id"]
                if path != run:       # the OpenAI id is the same id, streamed or not
                    first = json.loads(r.text.split("\n")[0][6:]) if stream else r.json()
                    assert first["id"] == rid
                ids.append(rid)
    assert len(set(ids)) == 6 and set(ids) == set(server_logs(caplog))


def test_interrupt_keeps_what_came_back(live, tmp_path, monkeypatch):
    """Ctrl-C after the first answer: exit 130, the JSON saved (without --save-result) with the answers so far."""
    real = runner.Sender.one
    seen = []

    async def one(self, client, sample):
        out = await real(self, client, sample)
        seen.append(out)
        if len(seen) == 2:                          # the initial test, then the first request of the run
            os.kill(os.getpid(), signal.SIGINT)     # asyncio.run turns it into cancelling the run
        return out

    monkeypatch.setattr(runner.Sender, "one", one)
    monkeypatch.chdir(tmp_path)
    code = cli_main(["bench", "--no-progress", "--base-url", live.url, "--num-prompts", "6",
                     "--random-input-len", "20", "--random-output-len", "40", "--ignore-eos",
                     "--max-concurrency", "1"])
    assert code == 130
    saved = list(tmp_path.glob("workers-*.json"))
    assert len(saved) == 1
    res = json.loads(saved[0].read_text())
    assert res["interrupted"] is True and 1 <= res["completed"] < 6 and res["failed"] == 6 - res["completed"]
    live.assert_drained()


def test_unreachable_endpoint_is_refused_clearly(tmp_path, capsys):
    from server_fixture import free_port
    code, res = bench(tmp_path, ["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2",
                                 "--random-input-len", "10", "--random-output-len", "2",
                                 "--ready-check-timeout-sec", "0.5"])
    assert code == 2 and res is None
    assert "cannot reach" in capsys.readouterr().err


def test_unknown_model_and_bad_key_are_refused(live, tmp_path, capsys):
    code, _ = bench(tmp_path, ["--base-url", live.url, "--model", "no-such-model", "--num-prompts", "1",
                               "--random-input-len", "10", "--random-output-len", "2"])
    assert code == 2 and "has no model 'no-such-model'" in capsys.readouterr().err
    with live.override(api_key="right"):
        code, _ = bench(tmp_path, ["--base-url", live.url, "--api-key", "wrong", "--num-prompts", "1",
                                   "--random-input-len", "10", "--random-output-len", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "refused the credentials" in err and "10000" in err


def test_masked_tokens_logprobs_are_floored_not_infinite(live):
    """Under a grammar most tokens have logprob -inf; JSON cannot carry that (500 before; compare found it)."""
    body = {"messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 6, "logprobs": True,
            "top_logprobs": 5, "response_format": {"type": "json_object"}}
    with httpx.Client(base_url=live.url, timeout=60) as c:
        whole = c.post("/v1/chat/completions", json=body)
        streamed = c.post("/v1/chat/completions", json={**body, "stream": True})
    assert whole.status_code == 200, whole.text
    values = [t["logprob"] for t in whole.json()["choices"][0]["logprobs"]["content"]
              for t in [t, *t["top_logprobs"]]]
    assert values and min(values) >= -9999.0
    assert streamed.status_code == 200 and "Infinity" not in streamed.text and "-9999.0" in whole.text + streamed.text
