"""The result of a bench run: the JSON (vLLM's keys plus one record per request), the printed table, the file
names (vLLM's `{label}-{rate}qps[-concurrency{N}]-{model}-{date}`), and the PNG beside the JSON."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

from server.bench import metrics
from server.bench.cost import cost_lines, cost_report
from server.bench.endpoint import HOSTED_REQUESTS_PER_MINUTE
from server.bench.plots import plot


def assemble(args, ep, counter, samples, run, percentiles: list[float], goodput: dict) -> dict:
    recs = metrics.records(run.outputs, counter.text_tokens)
    summary = metrics.summarize(recs, run.duration, percentiles, goodput)
    rate = args.request_rate
    result = {
        "date": datetime.now(UTC).strftime("%Y%m%d-%H%M%S"), "backend": ep.backend,
        "endpoint": ep.describe(), "label": args.label or ep.backend, "model_id": ep.model,
        "tokenizer_id": counter.source, "num_prompts": len(samples), "dataset_name": args.dataset_name,
        "request_rate": "inf" if math.isinf(rate) else rate, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "max_requests_per_minute": run_limit(args, ep),
        "ignore_eos": args.ignore_eos, "temperature": args.temperature, "seed": args.seed,
        **{k: v for k, v in summary.items()},
        "rate_limited": run.rate_limited, "rate_limited_wait_s": run.rate_limited_wait_s,
        "interrupted": run.interrupted, "aborted": run.aborted,
        "initial_test": None if run.initial_test is None else {
            "request_id": run.initial_test.request_id, "prompt_tokens": run.initial_test.prompt_tokens,
            "output_tokens": run.initial_test.output_tokens, "success": run.initial_test.success,
            "retries": run.initial_test.retries},
        "warnings": metrics.warnings_for(recs, args.ignore_eos),
        # vLLM's per-request arrays, for tools that read them
        "input_lens": [r.get("prompt_tokens") or r.get("prompt_len") for r in recs],
        "output_lens": [r.get("output_tokens") or 0 for r in recs],
        "ttfts": [r.get("ttft_s") or 0.0 for r in recs], "itls": [r.get("itl_s") or [] for r in recs],
        "generated_texts": [r.get("generated_text", "") for r in recs], "errors": [r.get("error") or "" for r in recs],
        "requests": recs,
    }
    result["cost"] = cost_report(result, args.gpu_hourly_price)
    return result


def run_limit(args, ep) -> int | None:
    """--max-requests-per-minute, else the hosted service's limit against it, else none."""
    if args.max_requests_per_minute is not None:
        return args.max_requests_per_minute
    return HOSTED_REQUESTS_PER_MINUTE if ep.hosted else None


def table(result: dict, percentiles: list[float], percentile_metrics: list[str]) -> str:
    row = "{:<40} {:<10}".format
    num = "{:<40} {:<10.2f}".format
    lines = ["{:=^50}".format(" Serving Benchmark Result "),
             row("Successful requests:", result["completed"]), row("Failed requests:", result["failed"])]
    if result["max_concurrency"] is not None:
        lines.append(row("Maximum request concurrency:", result["max_concurrency"]))
    if result["request_rate"] != "inf":
        lines.append(num("Request rate configured (RPS):", result["request_rate"]))
    lines += [num("Benchmark duration (s):", result["duration"]), row("Total input tokens:", result["total_input_tokens"]),
              row("Total generated tokens:", result["total_output_tokens"]),
              num("Request throughput (req/s):", result["request_throughput"])]
    if result["request_goodput"] is not None:
        lines.append(num("Request goodput (req/s):", result["request_goodput"]))
    lines += [num("Output token throughput (tok/s):", result["output_throughput"]),
              num("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"]),
              num("Peak concurrent requests:", result["max_concurrent_requests"]),
              num("Total Token throughput (tok/s):", result["total_token_throughput"])]
    if result["rate_limited"]:
        lines.append(row("Rate-limited answers (429, retried):", result["rate_limited"]))
    headers = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
               "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for m in metrics.METRICS:
        if m not in percentile_metrics:
            continue
        name = m.upper()
        lines += [f"{headers[m]:-^50}", num(f"Mean {name} (ms):", result[f"mean_{m}_ms"]),
                  num(f"Median {name} (ms):", result[f"median_{m}_ms"])]
        for p in percentiles:
            word = str(int(p)) if int(p) == p else str(p)
            lines.append(num(f"P{word} {name} (ms):", result[f"p{word}_{m}_ms"]))
    lines.append("{:-^50}".format("Cost"))
    lines += cost_lines(result["cost"])
    lines.append("=" * 50)
    return "\n".join(lines)


def filename(args, result: dict) -> str:
    if args.result_filename:
        return args.result_filename
    conc = f"-concurrency{args.max_concurrency}" if args.max_concurrency else ""
    model = result["model_id"].rsplit("/", 1)[-1]
    return f"{result['label']}-{result['request_rate']}qps{conc}-{model}-{result['date']}.json"


def save(args, result: dict) -> tuple[Path, Path | None, str | None]:
    """Write the JSON, then the PNG beside it: (json, png or None, why no png)."""
    path = Path(args.result_dir or ".") / filename(args, result)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, ensure_ascii=False, allow_nan=False) + "\n",
                    encoding="utf-8")
    try:
        return path, plot(result, path.with_suffix(".png")), None
    except ImportError as e:
        return path, None, str(e)
