"""A peer tool on the same workload: guidellm (installed by the test extra) and `mistral-small bench` send the
same JSON-lines file to our OpenAI chat route at the same concurrency; completed requests and output tokens must
be equal (benchmarks/bench_peer.py, which also prints the medians side by side for benchmarks/README.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from server_fixture import start_server, tiny_engine

from server.config import API_KEY_ENV, ServerSettings

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("bench_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_guidellm_agrees_on_requests_and_tokens(tiny_dir, peer, tmp_path, monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    srv = start_server(tiny_engine(tiny_dir), ServerSettings())
    try:
        res = peer.run(srv.url, n=6, output_len=8, concurrency=2, out_dir=tmp_path)
        srv.assert_drained(15)
    finally:
        srv.stop()
    ours, theirs = res["ours"], res["guidellm"]
    table = res["table"]
    assert ours["completed"] == theirs["completed"] == 6 and ours["failed"] == theirs["failed"] == 0, table
    assert ours["output_tokens"] == theirs["output_tokens"] == 48 and res["agree"], table
    assert ours["input_tokens"] == theirs["input_tokens"], table        # both read the server's usage
    for key in ("median_ttft_ms", "median_itl_ms", "median_tpot_ms", "median_e2el_ms"):
        assert ours[key] >= 0 and theirs[key] >= 0, (key, table)      # measured, never asserted fast
