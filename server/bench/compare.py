"""The same requests to two endpoints, answer by answer: is ours the hosted model's, is a quantized server its
full-precision twin?

Every request goes to both at temperature 0 with the same fixed seed, whole (not streamed: the hosted JSON mode
does not stream). `--features` mixes request kinds, one after the other: plain text, an image, a tool the model
may call, JSON mode with a schema. Per request: identical or not, the first differing token and the text around
it, and where both endpoints return logprobs (OpenAI routes; Workers AI has none) how far they differ before
that token and what each gave the other's token there. Tokens are the endpoints' own when both return logprobs,
else both answers are re-tokenized with the local tokenizer (the record says which).
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import numpy as np

from server.bench.backends import RequestOptions, RequestOutput
from server.bench.datasets import SampleRequest, noise_png
from server.bench.endpoint import Endpoint
from server.bench.runner import LoadConfig, Run, Sender
from server.bench.tokens import PromptCounter

FEATURES = ("text", "image", "tools", "json")
CONTEXT = 8                     # tokens shown on each side of the first difference
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
ANSWER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "summary": {"type": "string"}},
                 "required": ["city", "summary"]}


def with_features(samples: list[SampleRequest], features: list[str], counter: PromptCounter, chat: bool,
                  seed: int) -> list[SampleRequest]:
    """Request i gets features[i % len(features)]; its planned length is counted again."""
    bad = [f for f in features if f not in FEATURES]
    if bad:
        raise ValueError(f"--features: unknown {', '.join(bad)} (choose from {', '.join(FEATURES)})")
    if not chat and any(f != "text" for f in features):
        raise ValueError("--features image, tools and json need a chat route: --backend workers or openai-chat")
    rng = np.random.default_rng(seed)
    for s in samples:
        s.feature = features[s.index % len(features)]
        if s.feature == "image":
            s.images.append(noise_png(rng, 64, 64))
        elif s.feature == "tools":
            s.tools = [WEATHER_TOOL]
        elif s.feature == "json":
            s.json_schema = ANSWER_SCHEMA
        if s.feature != "text":
            s.prompt_len = counter.chat(s.messages(), s.tools)
    return samples


async def fetch(ep_a: Endpoint, ep_b: Endpoint, samples, opts: RequestOptions, load_a: LoadConfig,
                load_b: LoadConfig, run_a: Run, run_b: Run) -> None:
    """Both endpoints, request by request (at most --max-concurrency requests in flight on each)."""
    sa, sb = Sender(ep_a, opts, load_a, run_a, progress=False), Sender(ep_b, opts, load_b, run_b, progress=False)
    sem = asyncio.Semaphore(load_a.max_concurrency or 1)

    async def both(ca, cb, s):
        async with sem:
            run_a.outputs[s.index], run_b.outputs[s.index] = await asyncio.gather(sa.one(ca, s), sb.one(cb, s))

    async with sa.client() as ca, sb.client() as cb:
        run_a.started = run_b.started = time.perf_counter()
        try:
            await asyncio.gather(*(both(ca, cb, s) for s in samples))
        finally:
            run_a.ended = run_b.ended = time.perf_counter()


def answer(o: RequestOutput) -> str:
    calls = "" if not o.tool_calls else "[TOOL_CALLS]" + json.dumps(o.tool_calls, ensure_ascii=False)
    return o.generated_text + calls


def tokens(o: RequestOutput, tokenizer, retokenize: bool) -> list[str]:
    if not retokenize:
        return [t["token"] for t in o.logprobs]
    return [tokenizer.token_bytes(i).decode("utf-8", "replace") for i in tokenizer.encode_text(answer(o))]


def compare_one(s: SampleRequest, a: RequestOutput | None, b: RequestOutput | None, tokenizer) -> dict:
    rec = {"index": s.index, "feature": s.feature, "prompt": s.prompt[:200], "prompt_len": s.prompt_len,
           "request_id_a": a and a.request_id, "request_id_b": b and b.request_id}
    errs = {k: (o.error if o is not None else "not sent") for k, o in (("a", a), ("b", b))
            if o is None or not o.success}
    if errs:
        return {**rec, "identical": False, "error": errs}
    rec.update(identical=answer(a) == answer(b), text_a=answer(a), text_b=answer(b),
               output_tokens_a=a.output_tokens, output_tokens_b=b.output_tokens)
    retokenize = not (a.logprobs and b.logprobs)
    ta, tb = tokens(a, tokenizer, retokenize), tokens(b, tokenizer, retokenize)
    rec["token_source"] = "re-tokenized locally" if retokenize else "endpoint logprobs"
    idx = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), None)
    if idx is None and len(ta) != len(tb):
        idx = min(len(ta), len(tb))
    rec["first_diff_token"] = idx
    if idx is not None:
        rec["context"] = {"before": "".join(ta[max(0, idx - CONTEXT):idx]), "a": "".join(ta[idx:idx + CONTEXT]),
                          "b": "".join(tb[idx:idx + CONTEXT])}
    if not retokenize:
        rec["logprobs"] = _logprob_diff(a.logprobs, b.logprobs, idx)
    return rec


def _logprob_diff(la: list[dict], lb: list[dict], idx: int | None) -> dict:
    """|logprob_a − logprob_b| of the shared tokens before the first difference, and both sides' view of it."""
    shared = range(min(len(la), len(lb)) if idx is None else idx)
    diffs = [abs(la[i]["logprob"] - lb[i]["logprob"]) for i in shared]
    rep = {"shared_tokens": len(diffs), "max_abs_diff": max(diffs, default=0.0),
           "mean_abs_diff": float(np.mean(diffs)) if diffs else 0.0}
    if idx is not None and idx < len(la) and idx < len(lb):
        x, y = la[idx], lb[idx]
        rep["at_first_diff"] = {"token_a": x["token"], "logprob_a": x["logprob"], "token_b": y["token"],
                                "logprob_b": y["logprob"],
                                "a_logprob_of_token_b": x["top"].get(y["token"]),
                                "b_logprob_of_token_a": y["top"].get(x["token"])}
    return rep


def summarize(ep_a: Endpoint, ep_b: Endpoint, samples, run_a: Run, run_b: Run, tokenizer, opts) -> dict:
    recs = [compare_one(s, run_a.outputs[s.index], run_b.outputs[s.index], tokenizer) for s in samples]
    total, same = len(recs), sum(r["identical"] for r in recs)
    by_feature = {}
    for r in recs:
        f = by_feature.setdefault(r["feature"], {"total": 0, "identical": 0})
        f["total"] += 1
        f["identical"] += r["identical"]
    lp = [r["logprobs"]["max_abs_diff"] for r in recs if "logprobs" in r and r["logprobs"]["shared_tokens"]]
    return {"date": datetime.now(UTC).strftime("%Y%m%d-%H%M%S"),
            "a": ep_a.describe(), "b": ep_b.describe(), "temperature": opts.temperature, "seed": opts.seed,
            "total": total, "identical": same, "identical_ratio": same / total if total else 0.0,
            "failed": sum("error" in r for r in recs), "by_feature": by_feature,
            "max_abs_logprob_diff": max(lp, default=None),
            "interrupted": run_a.interrupted or run_b.interrupted, "requests": recs}


def summary_lines(result: dict) -> list[str]:
    lines = ["{:=^60}".format(" Compare "), f"A: {result['a']['backend']} {result['a']['url']}",
             f"B: {result['b']['backend']} {result['b']['url']}",
             (f"identical: {result['identical']} / {result['total']} ({result['identical_ratio']:.1%}), "
              f"failed: {result['failed']}")]
    for f, c in result["by_feature"].items():
        lines.append(f"  {f:<6} {c['identical']} / {c['total']}")
    if result["max_abs_logprob_diff"] is not None:
        lines.append(f"largest |logprob difference| on shared tokens: {result['max_abs_logprob_diff']:.4g}")
    for r in result["requests"]:
        if not r["identical"] and "error" not in r:
            ctx = r.get("context", {})
            lines.append(f"  #{r['index']} ({r['feature']}) differs at token {r['first_diff_token']}: "
                         f"...{ctx.get('before', '')!r} -> A {ctx.get('a', '')!r} | B {ctx.get('b', '')!r}")
        elif "error" in r:
            lines.append(f"  #{r['index']} ({r['feature']}) failed: {r['error']}")
    return lines
