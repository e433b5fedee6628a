"""`mistral-small bench` and `mistral-small compare URL_A URL_B`: flags (vLLM's names), plans, refusals, runs.

Exit codes: 0 the run finished; 1 it was stopped by the endpoint (credentials, model, unreachable mid-run);
2 refused before sending anything; 130 interrupted (Ctrl-C). Whatever came back is saved in the last three.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sys
from pathlib import Path

from server.bench import compare, datasets, report, result
from server.bench.backends import RequestOptions
from server.bench.cost import DEFAULT_THRESHOLD, planned_cost
from server.bench.endpoint import BACKENDS, make_endpoint
from server.bench.metrics import METRICS, parse_goodput
from server.bench.runner import LoadConfig, Run, Sender
from server.bench.tokens import PromptCounter, RemoteTokenize, local_tokenizer


class Refused(ValueError):
    """The endpoint refused the first request: say why before spending anything."""


def add_commands(sub) -> None:
    b = sub.add_parser("bench", help="benchmark an endpoint (ours, the hosted one, any OpenAI-compatible)",
                       description="Load-test an endpoint with vLLM bench serve's flags and metrics.")
    b.add_argument("--base-url", help="server root (default http://127.0.0.1:8000; https://api.cloudflare.com "
                   "with --hosted)")
    _endpoint_flags(b)
    b.add_argument("--hosted", action="store_true", help="the hosted Workers AI service (or a stand-in at "
                   "--base-url): credentials from CLOUDFLARE_ACCOUNT_ID / CLOUDFLARE_API_TOKEN, rate capped")
    _workload_flags(b)
    g = b.add_argument_group("load")
    g.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (inf: all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    g.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    g.add_argument("--ignore-eos", action="store_true", help="send ignore_eos and min_tokens (exact lengths)")
    g.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="SLOs, e.g. ttft:1000 tpot:50")
    g.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="metrics with percentiles "
                   f"({','.join(METRICS)})")
    g.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles")
    c = b.add_argument_group("cost")
    c.add_argument("--gpu-hourly-price", type=float, help="USD per GPU hour, for the local cost beside the hosted")
    _spend_flags(b)
    _output_flags(b)
    b.add_argument("--label", help="result file prefix (default: the backend)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--dry-run", action="store_true", help="print the plan and expected cost, send nothing")
    b.set_defaults(func=cmd_bench)

    cmp = sub.add_parser("compare", help="send the same requests to two endpoints and compare the answers",
                         description="Same requests (text, images, tools, JSON mode) to both at temperature 0 "
                         "with fixed seeds; per request: identical or not, where and how they differ.")
    cmp.add_argument("url_a", help="base URL of endpoint A")
    cmp.add_argument("url_b", help="base URL of endpoint B")
    _endpoint_flags(cmp)
    cmp.add_argument("--hosted", nargs="+", choices=["A", "B"], default=[], help="which of them is the hosted "
                     "service (or a stand-in); a URL on cloudflare.com is anyway")
    _workload_flags(cmp, num_prompts=20, output_len=64)
    cmp.add_argument("--features", default="text,image,tools,json", help=f"request kinds, in turn ({','.join(compare.FEATURES)})")
    cmp.add_argument("--logprobs", type=int, default=5, help="top logprobs per token (OpenAI routes)")
    cmp.add_argument("--max-concurrency", type=int, default=4, help="requests in flight on each endpoint")
    _spend_flags(cmp)
    _output_flags(cmp)
    cmp.set_defaults(func=cmd_compare)


def _endpoint_flags(p) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument("--backend", choices=BACKENDS, default="workers", help="route: Workers AI run, OpenAI chat, "
                   "OpenAI completions")
    g.add_argument("--endpoint", help="path under the base URL (default: the backend's route)")
    g.add_argument("--model", help="model name (default @cf/mistralai/mistral-small-3.1-24b-instruct)")
    g.add_argument("--api-key", help="bearer token (default: MISTRAL_SMALL_API_KEY, or CLOUDFLARE_API_TOKEN hosted)")
    g.add_argument("--tokenizer", help="tekken.json or model directory for local counting (default: "
                   "mistral-common's vocabulary as Small 3.1's v7 tokenizer)")
    g.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    g.add_argument("--max-retries", type=int, default=5, help="times a rate-limited (429) request is resent")
    g.add_argument("--max-requests-per-minute", type=int, help="hard cap on sends (default: 300 hosted, none else)")
    g.add_argument("--ready-check-timeout-sec", type=float, default=60.0, help="wait this long for the endpoint "
                   "to come up (0: skip the initial test request)")


def _workload_flags(p, num_prompts: int = 1000, output_len: int = 128) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--dataset-name", choices=datasets.DATASETS, default="random")
    g.add_argument("--dataset-path", help="sharegpt: JSON file (default: the small one shipped in the repo); "
                   "custom: JSON lines")
    g.add_argument("--num-prompts", type=int, default=num_prompts)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (vLLM's default)")
    g.add_argument("--random-input-len", type=int, default=1024, help="usage.prompt_tokens, template and "
                   "images included")
    g.add_argument("--random-output-len", type=int, default=output_len)
    g.add_argument("--random-range-ratio", type=float, default=0.0)
    g.add_argument("--random-prefix-len", type=int, default=0)
    g.add_argument("--sharegpt-output-len", type=int)
    g.add_argument("--prefix-repetition-prefix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-suffix-len", type=int, default=256)
    g.add_argument("--prefix-repetition-num-prefixes", type=int, default=10)
    g.add_argument("--prefix-repetition-output-len", type=int, default=128)
    g.add_argument("--random-mm-base-items-per-request", type=int, default=1)
    g.add_argument("--random-mm-bucket-config", default=datasets.WorkloadConfig.random_mm_bucket_config)
    g.add_argument("--custom-output-len", type=int, default=256)


def _spend_flags(p) -> None:
    p.add_argument("--yes", action="store_true", help="run hosted workloads expected to cost more than "
                   "--cost-threshold")
    p.add_argument("--cost-threshold", type=float, default=DEFAULT_THRESHOLD, help="USD (default %(default)s)")


def _output_flags(p) -> None:
    p.add_argument("--save-result", action="store_true", help="write the JSON (and PNG / HTML) to --result-dir")
    p.add_argument("--result-dir", help="directory for results (default: current)")
    p.add_argument("--result-filename", help="file name of the JSON")


def _quiet() -> None:
    """One line per request from httpx, the tokenizer's load notes: not what a benchmark's reader wants."""
    for name in ("httpx", "mistral_common"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _counter(args, ep) -> PromptCounter:
    _quiet()
    remote = None if ep.hosted else RemoteTokenize.detect(ep.base_url, ep.headers, ep.model)
    return PromptCounter(local_tokenizer(args.tokenizer), remote)


def _check_spend(args, hosted: bool, samples, what: str) -> None:
    tin, tout, usd = planned_cost(samples)
    print(f"{what}: {len(samples)} requests, {tin:,} input + up to {tout:,} output tokens; at the hosted price "
          f"${usd:.4f}{' (this run is billed)' if hosted else ''}")
    if hosted and usd > args.cost_threshold and not args.yes:
        raise ValueError(f"the hosted run is expected to cost ${usd:.2f}, over --cost-threshold "
                         f"${args.cost_threshold:.2f}: add --yes to run it")


def _refusal(ep, out) -> Refused:
    if out.status in (401, 403) or out.code in (10000, "invalid_api_key"):
        who = "CLOUDFLARE_API_TOKEN" if ep.hosted else "--api-key / MISTRAL_SMALL_API_KEY"
        return Refused(f"{ep.url} refused the credentials ({out.error}): check {who}")
    if out.code in (5007, "model_not_found"):
        return Refused(f"{ep.url} has no model {ep.model!r} ({out.error}): check --model")
    if out.status is None:
        return Refused(f"cannot reach {ep.url}: {out.error}")
    return Refused(f"the first request to {ep.url} failed: {out.error}")


def cmd_bench(args) -> int:
    ep = make_endpoint(args.base_url, args.backend, args.model, args.endpoint, args.hosted, args.api_key)
    load = LoadConfig(args.request_rate, args.burstiness, args.max_concurrency, result.run_limit(args, ep),
                      args.max_retries, args.timeout, args.seed)
    cfg = datasets.WorkloadConfig.from_args(args)
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    pmetrics = [m.strip() for m in args.percentile_metrics.split(",") if m.strip()]
    goodput = parse_goodput(args.goodput)
    counter = _counter(args, ep)
    try:
        samples = datasets.build(cfg, counter, ep.chat)
    except BaseException:
        counter.close()
        raise
    print(f"endpoint {ep.url} ({ep.backend}{', hosted' if ep.hosted else ''}); prompt lengths counted by "
          f"{counter.source}; rate {args.request_rate}, burstiness {args.burstiness}, max concurrency "
          f"{args.max_concurrency}, at most {load.max_requests_per_minute or 'unlimited'} requests/min")
    _check_spend(args, ep.hosted, samples, "plan")
    if args.dry_run:
        return 0
    opts = RequestOptions(args.temperature, args.seed, args.ignore_eos)
    run = Run([None] * len(samples))
    sender = Sender(ep, opts, load, run, progress=not args.no_progress)
    code, finished = 0, False
    try:
        asyncio.run(_bench(sender, samples, args.ready_check_timeout_sec))
        code, finished = (1 if run.aborted else 0), True
    except KeyboardInterrupt:
        run.interrupted, code = True, 130
    finally:        # whatever happened once requests were sent, what came back is printed and kept
        if run.started is not None:
            res = result.assemble(args, ep, counter, samples, run, percentiles, goodput)
            print(result.table(res, percentiles, pmetrics))
            for note in res["warnings"]:
                print(f"warning: {note}")
            if run.aborted:
                print(f"the run stopped early: {run.aborted}", file=sys.stderr)
            if args.save_result or not finished or run.aborted:
                _report_saved(*result.save(args, res))
        counter.close()
    return code


async def _bench(sender: Sender, samples, ready_timeout: float) -> None:
    if ready_timeout > 0:
        out = await sender.initial_test(samples[0], ready_timeout)
        if not out.success:
            raise _refusal(sender.ep, out)
    await sender.all(samples)


def _report_saved(path: Path, png: Path | None, why: str | None) -> None:
    print(f"saved {path}" + (f" and {png}" if png else ""))
    if why:
        print(f"no plot: {why}", file=sys.stderr)


def cmd_compare(args) -> int:
    hosted = set(args.hosted)
    ep_a = make_endpoint(args.url_a, args.backend, args.model, args.endpoint, "A" in hosted, args.api_key)
    ep_b = make_endpoint(args.url_b, args.backend, args.model, args.endpoint, "B" in hosted, args.api_key)
    cfg = datasets.WorkloadConfig.from_args(args)
    counter = _counter(args, ep_a)
    samples = compare.with_features(datasets.build(cfg, counter, ep_a.chat),
                                    [f.strip() for f in args.features.split(",") if f.strip()], counter,
                                    ep_a.chat, args.seed)
    _check_spend(args, ep_a.hosted or ep_b.hosted, samples, "compare, per endpoint")
    opts = RequestOptions(args.temperature, args.seed, False, args.logprobs, stream=False)
    loads = [LoadConfig(max_concurrency=args.max_concurrency, max_requests_per_minute=result.run_limit(args, ep),
                        max_retries=args.max_retries, timeout=args.timeout) for ep in (ep_a, ep_b)]
    runs = [Run([None] * len(samples)), Run([None] * len(samples))]
    code = 0
    try:
        asyncio.run(_compare(ep_a, ep_b, samples, opts, loads, runs, args.ready_check_timeout_sec))
    except KeyboardInterrupt:
        runs[0].interrupted, code = True, 130
    finally:
        if runs[0].started is not None:
            _compare_report(args, compare.summarize(ep_a, ep_b, samples, *runs, counter.tokenizer, opts), code)
        counter.close()
    return code


def _compare_report(args, res: dict, code: int) -> None:
    print("\n".join(compare.summary_lines(res)))
    if args.save_result or code:
        base = Path(args.result_dir or ".") / (args.result_filename or f"compare-{res['date']}.json")
        base.parent.mkdir(parents=True, exist_ok=True)
        base.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        base.with_suffix(".html").write_text(report.html(res), encoding="utf-8")
        print(f"saved {base} and {base.with_suffix('.html')}")


async def _compare(ep_a, ep_b, samples, opts, loads, runs, ready_timeout: float) -> None:
    if ready_timeout > 0:
        for ep, load, run in zip((ep_a, ep_b), loads, runs):
            out = await Sender(ep, opts, load, run, progress=False).initial_test(samples[0], ready_timeout)
            if not out.success:
                raise _refusal(ep, out)
    await compare.fetch(ep_a, ep_b, samples, opts, *loads, *runs)

