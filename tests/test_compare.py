"""`mistral-small compare URL_A URL_B`: our in-process server against a second server process on the same tiny
checkpoint (every answer identical), and against the same checkpoint served with `--quantization fp8` (answers
diverge: where, the text around it, and the logprob differences)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from server_fixture import free_port, start_server, tiny_engine

from server.cli import main as cli_main
from server.config import API_KEY_ENV, ServerSettings


def spawn(model_dir, *flags) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "server", "serve", "--model", str(model_dir), "--port", str(port),
                             "--kv-cache-gib", "0.0625", "--log-level", "warning", *flags],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


@pytest.fixture(scope="module")
def servers(tiny_dir):
    """(ours in-process, a second process on the same weights, the same weights in fp8)."""
    mp = pytest.MonkeyPatch()
    mp.delenv(API_KEY_ENV, raising=False)
    procs = [spawn(tiny_dir), spawn(tiny_dir, "--quantization", "fp8")]
    live = start_server(tiny_engine(tiny_dir), ServerSettings())
    try:
        for proc, url in procs:
            wait_healthy(proc, url)
        yield live.url, procs[0][1], procs[1][1]
    finally:
        live.stop()
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(timeout=30)
        mp.undo()


def compare(tmp_path, a: str, b: str, *extra) -> dict:
    code = cli_main(["compare", a, b, "--save-result", "--result-dir", str(tmp_path), "--result-filename", "cmp.json",
                     "--random-input-len", "40", *extra])
    assert code == 0
    return json.loads((tmp_path / "cmp.json").read_text())


def test_same_checkpoint_in_another_process_is_identical(servers, tmp_path):
    ours, twin, _ = servers
    res = compare(tmp_path, ours, twin, "--backend", "openai-chat", "--num-prompts", "8", "--random-output-len", "16")
    assert res["total"] == 8 and res["identical"] == 8 and res["failed"] == 0, res["requests"]
    assert res["by_feature"] == {f: {"total": 2, "identical": 2} for f in ("text", "image", "tools", "json")}
    for r in res["requests"]:
        assert r["token_source"] == "endpoint logprobs" and r["first_diff_token"] is None
        assert r["logprobs"]["shared_tokens"] == r["output_tokens_a"] == 16
    assert res["max_abs_logprob_diff"] < 1e-4
    page = (tmp_path / "cmp.html").read_text()
    assert "8 / 8 answers identical" in page and "<script" not in page


def test_workers_route_without_logprobs_compares_retokenized(servers, tmp_path):
    ours, twin, _ = servers
    res = compare(tmp_path, ours, twin, "--backend", "workers", "--num-prompts", "4", "--random-output-len", "12",
                  "--features", "text,image")
    assert res["identical"] == res["total"] == 4
    assert {r["token_source"] for r in res["requests"]} == {"re-tokenized locally"}
    assert res["max_abs_logprob_diff"] is None              # Workers AI gives no logprobs


def test_fp8_diverges_with_index_and_logprob_differences(servers, tmp_path, capsys):
    ours, _, fp8 = servers
    res = compare(tmp_path, ours, fp8, "--backend", "openai-chat", "--num-prompts", "8", "--random-output-len", "24",
                  "--features", "text,image")
    assert res["failed"] == 0 and res["identical"] < res["total"]
    diverged = [r for r in res["requests"] if not r["identical"]]
    for r in diverged:
        i = r["first_diff_token"]
        assert isinstance(i, int) and 0 <= i < 24
        assert r["context"]["a"] != r["context"]["b"]
        at = r["logprobs"]["at_first_diff"]
        assert at["token_a"] != at["token_b"] and r["logprobs"]["shared_tokens"] == i
    assert res["max_abs_logprob_diff"] > 0                 # fp8 weights move the logprobs before any divergence
    out = capsys.readouterr().out
    assert f"identical: {res['identical']} / 8" in out and "differs at token" in out
    assert "differs at token" in (tmp_path / "cmp.html").read_text()
