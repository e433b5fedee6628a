"""`mistral-small bench` beside a peer tool (guidellm) on the same workload and the same server.

Both read one JSON-lines file (`{"prompt", "output_tokens_count"}` per line: our `--dataset-name custom`,
guidellm's `json_file`), send it to the OpenAI chat route at the same concurrency with EOS ignored, and report
completed requests, tokens and the medians of TTFT, ITL, TPOT and end-to-end latency side by side. Completed
requests and output tokens must agree exactly; the script says so and exits 1 when they do not.

    python benchmarks/bench_peer.py --base-url http://127.0.0.1:8000 --num-prompts 40 --concurrency 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, format_table, result_path, run_metadata, write_json

from server.cli import main as cli_main
from server.config import CLOUDFLARE_MODEL


def workload(path: Path, n: int, output_len: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    topics = ["rivers", "bread", "comets", "chess", "glaciers", "violins", "bees", "bridges", "tea", "maps"]
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(rng.choice(topics, size=int(rng.integers(3, 12))))
            f.write(json.dumps({"prompt": f"Request {i}: write about {words}.", "output_tokens_count": output_len})
                    + "\n")
    return path


def ours(base_url: str, data: Path, n: int, concurrency: int, out_dir: Path) -> dict:
    code = cli_main(["bench", "--base-url", base_url, "--backend", "openai-chat", "--dataset-name", "custom",
                     "--dataset-path", str(data), "--num-prompts", str(n), "--max-concurrency", str(concurrency),
                     "--ignore-eos", "--no-progress", "--ready-check-timeout-sec", "0", "--save-result",
                     "--result-dir", str(out_dir), "--result-filename", "ours.json"])
    if code != 0:
        raise SystemExit(f"mistral-small bench failed ({code})")
    r = json.loads((out_dir / "ours.json").read_text())
    return {"completed": r["completed"], "failed": r["failed"], "input_tokens": r["total_input_tokens"],
            "output_tokens": r["total_output_tokens"], "median_ttft_ms": r["median_ttft_ms"],
            "median_itl_ms": r["median_itl_ms"], "median_tpot_ms": r["median_tpot_ms"],
            "median_e2el_ms": r["median_e2el_ms"], "output_throughput": r["output_throughput"]}


def guidellm(base_url: str, data: Path, n: int, concurrency: int, out_dir: Path, timeout: float = 600) -> dict:
    out = out_dir / "guidellm.json"
    cmd = [sys.executable, "-m", "guidellm", "run",
           "--backend", f'kind=openai_http,target={base_url},model="{CLOUDFLARE_MODEL}"',
           "--profile", f"kind=concurrent,streams={concurrency}", "--data", f"kind=json_file,path={data}",
           "--constraint", f"kind=max_requests,count={n}", "--output", f"kind=json,path={out}",
           "--disable-console"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if r.returncode != 0:
        raise SystemExit(f"guidellm failed ({r.returncode}): {r.stderr[-2000:]}")
    m = json.loads(out.read_text())["benchmarks"][0]["metrics"]

    def ok(name: str) -> dict:
        return m[name]["successful"]

    return {"completed": m["request_totals"]["successful"], "failed": m["request_totals"]["errored"],
            "input_tokens": round(ok("prompt_token_count")["total_sum"]),
            "output_tokens": round(ok("output_token_count")["total_sum"]),
            "median_ttft_ms": ok("time_to_first_token_ms")["median"],
            "median_itl_ms": ok("inter_token_latency_ms")["median"],
            "median_tpot_ms": ok("time_per_output_token_ms")["median"],
            "median_e2el_ms": ok("request_latency")["median"] * 1000,
            "output_throughput": m["output_tokens_per_second"]["successful"]["mean"]}


def run(base_url: str, n: int, output_len: int, concurrency: int, out_dir: Path, seed: int = 0) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = workload(out_dir / "workload.jsonl", n, output_len, seed)
    a, b = ours(base_url, data, n, concurrency, out_dir), guidellm(base_url, data, n, concurrency, out_dir)
    keys = list(a)
    table = format_table(["figure", "mistral-small bench", "guidellm"], [[k, a[k], b[k]] for k in keys])
    agree = a["completed"] == b["completed"] and a["output_tokens"] == b["output_tokens"]
    return {"ours": a, "guidellm": b, "agree": agree, "table": table,
            "params": {"base_url": base_url, "num_prompts": n, "output_len": output_len, "concurrency": concurrency}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--num-prompts", type=int, default=40)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--label", default="server")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as work:
        res = run(args.base_url, args.num_prompts, args.output_len, args.concurrency, Path(work))
    print(res["table"])
    print("completed requests and output tokens " + ("agree" if res["agree"] else "DISAGREE"))
    path = write_json(result_path(RESULTS_DIR, "peer", args.label, "http"), {**run_metadata(), "figures": res})
    print(f"saved {path}")
    return 0 if res["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
