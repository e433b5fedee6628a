"""`mistral-small bench --hosted` against a local stand-in of the hosted service (tests/hosted_standin.py): the
credentials from Cloudflare's environment variables, TTFT taken at the first text event (not the empty one the
hosted stream opens with), padding ignored, usage honoured, 429s waited out and reported, bad credentials and
unknown models refused before anything is spent, the expected cost printed and guarded by --yes."""

from __future__ import annotations

import json

import pytest
from hosted_standin import MODEL, WORDS, StandIn, start_standin

from server.bench.endpoint import HOSTED_REQUESTS_PER_MINUTE
from server.cli import main as cli_main

DELAY = 0.4


@pytest.fixture(scope="module")
def standin():
    s, server, thread = start_standin(StandIn(first_text_delay=DELAY))
    yield s
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def cf_env(monkeypatch, standin):
    monkeypatch.setenv("CLOUDFLARE_ACCOUNT_ID", standin.account)
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", standin.token)


def bench(standin, tmp_path, *extra) -> tuple[int, dict | None]:
    code = cli_main(["bench", "--hosted", "--base-url", standin.url, "--no-progress", "--num-prompts", "4",
                     "--random-input-len", "20", "--random-output-len", str(len(WORDS)), "--ignore-eos",
                     "--save-result", "--result-dir", str(tmp_path), "--result-filename", "hosted.json", *extra])
    path = tmp_path / "hosted.json"
    return code, json.loads(path.read_text()) if path.exists() else None


def test_ttft_is_taken_at_the_first_text_event(standin, cf_env, tmp_path, capsys):
    standin.seen.clear()
    code, res = bench(standin, tmp_path, "--max-concurrency", "2", "--gpu-hourly-price", "3")
    out = capsys.readouterr().out
    assert code == 0 and res["completed"] == 4 and res["failed"] == 0
    assert "at the hosted price $" in out and "(this run is billed)" in out     # the expected cost, first
    assert res["endpoint"]["hosted"] and res["max_requests_per_minute"] == HOSTED_REQUESTS_PER_MINUTE
    for r in res["requests"]:
        # the empty `response` event came at once; the first text DELAY later: TTFT is taken there
        assert DELAY <= r["ttft_s"] <= r["e2el_s"], r
        assert r["generated_text"] == "".join(WORDS)                # `p` padding ignored, no-response events too
        assert r["output_tokens"] == len(WORDS) and r["output_tokens_source"] == "usage"
        assert len(r["itl_s"]) == len(WORDS) - 1
    assert res["median_ttft_ms"] >= DELAY * 1000
    # hosted: the bearer token and account from the environment, the model in the path, ignore_eos sent
    body = standin.seen[-1]["body"]
    assert body["ignore_eos"] is True and body["min_tokens"] == len(WORDS) and body["stream"] is True
    assert res["cost"]["hosted_usd"] > 0 and "break_even_utilisation" in res["cost"]
    # the stand-in counts prompts its own way: bench reports the endpoint's usage and says so
    assert any("usage.prompt_tokens differs" in w for w in res["warnings"])


def test_rate_limits_are_waited_out_and_reported(standin, cf_env, tmp_path):
    standin.rate_limited = 2
    code, res = bench(standin, tmp_path, "--max-concurrency", "1")
    assert code == 0 and res["completed"] == 4 and res["failed"] == 0
    assert res["rate_limited"] == 2 and res["rate_limited_wait_s"] >= 2        # Retry-After: 1, twice
    # the initial test request met them (it is the first one sent)
    assert sum(r["retries"] for r in res["requests"]) + res["initial_test"]["retries"] == 2


def test_bad_token_is_refused(standin, cf_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CLOUDFLARE_API_TOKEN", "expired")
    code, res = bench(standin, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and res is None
    assert "refused the credentials" in err and "10000" in err and "CLOUDFLARE_API_TOKEN" in err


def test_missing_credentials_and_unknown_model_are_refused(standin, cf_env, monkeypatch, tmp_path, capsys):
    code, _ = bench(standin, tmp_path, "--model", "@cf/nobody/nothing")
    assert code == 2 and "has no model '@cf/nobody/nothing'" in capsys.readouterr().err
    monkeypatch.delenv("CLOUDFLARE_ACCOUNT_ID")
    code, _ = bench(standin, tmp_path)
    assert code == 2 and "CLOUDFLARE_ACCOUNT_ID" in capsys.readouterr().err


def test_expensive_hosted_runs_need_yes(standin, cf_env, tmp_path, capsys):
    standin.seen.clear()
    code, _ = bench(standin, tmp_path, "--cost-threshold", "0.000001")
    captured = capsys.readouterr()
    assert code == 2 and "add --yes" in captured.err and not standin.seen       # nothing was sent
    code, res = bench(standin, tmp_path, "--cost-threshold", "0.000001", "--yes")
    assert code == 0 and res["completed"] == 4


def test_model_default_is_the_hosted_name():
    from server.bench.endpoint import make_endpoint
    ep = make_endpoint(None, "workers", hosted=True, env={"CLOUDFLARE_ACCOUNT_ID": "a1",
                                                           "CLOUDFLARE_API_TOKEN": "secret-xyz"})
    assert ep.url == f"https://api.cloudflare.com/client/v4/accounts/a1/ai/run/{MODEL}"
    assert ep.headers == {"Authorization": "Bearer secret-xyz"} and "secret" not in json.dumps(ep.describe())
    ep = make_endpoint(None, "openai-chat", hosted=True, env={"CLOUDFLARE_ACCOUNT_ID": "a1",
                                                              "CLOUDFLARE_API_TOKEN": "t"})
    assert ep.url == "https://api.cloudflare.com/client/v4/accounts/a1/ai/v1/chat/completions"


def test_credentials_revoked_mid_run_stop_it_and_keep_the_answers(standin, cf_env, tmp_path, monkeypatch, capsys):
    standin.seen.clear()
    standin.revoke_after = 3                    # the initial test and two requests get through
    monkeypatch.chdir(tmp_path)
    try:
        code = cli_main(["bench", "--hosted", "--base-url", standin.url, "--no-progress", "--num-prompts", "6",
                         "--random-input-len", "20", "--random-output-len", "3", "--max-concurrency", "1"])
    finally:
        standin.revoke_after = None
    assert code == 1 and "the run stopped early" in capsys.readouterr().err
    saved = list(tmp_path.glob("workers-*.json"))               # saved without --save-result
    res = json.loads(saved[0].read_text())
    assert res["completed"] == 2 and res["failed"] == 4 and "10000" in res["aborted"]
    assert len(standin.seen) == 3                                 # nothing more was sent after the refusal
