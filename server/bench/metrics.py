"""vLLM's serving metrics from the per-request records, under vLLM's names (performance.md §6).

- TTFT: send -> first event with text or a tool call. ITL: gaps between later content events, pooled over
  requests. TPOT: per request (E2EL − TTFT) / (output tokens − 1), requests of one token left out. E2EL: send ->
  last content event.
- Token counts: the endpoint's usage (prompt_tokens, completion_tokens) when it reports it; otherwise the planned
  prompt length and the output text counted by the tokenizer (each record says which).
- Goodput (`--goodput ttft:MS tpot:MS e2el:MS`): completed requests per second that meet every SLO.
- Peak output tokens/s and requests in flight: one-second buckets over the run, as vLLM counts them.
"""

from __future__ import annotations

import math

import numpy as np

from server.bench.backends import RequestOutput

METRICS = ("ttft", "tpot", "itl", "e2el")
SLO_NAMES = ("ttft", "tpot", "e2el")


def parse_goodput(pairs: list[str] | None) -> dict[str, float]:
    slos = {}
    for pair in pairs or []:
        name, _, value = pair.partition(":")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {pair!r}: expected KEY:MILLISECONDS, e.g. ttft:1000") from None
        if name not in SLO_NAMES or ms < 0:
            raise ValueError(f"--goodput {pair!r}: KEY is one of {', '.join(SLO_NAMES)}, the value >= 0 ms")
        slos[name] = ms
    return slos


def _tpot(o: RequestOutput, n: int) -> float | None:
    return (o.latency - o.ttft) / (n - 1) if n > 1 else None


def records(outputs: list[RequestOutput | None], count_text) -> list[dict]:
    """One record per request (None: never sent, or stopped before it answered)."""
    recs = []
    for i, o in enumerate(outputs):
        if o is None:
            recs.append({"index": i, "success": False, "error": "not sent or not finished (run stopped)"})
            continue
        n_out = o.output_tokens
        source = "usage"
        if o.success and n_out is None:
            n_out, source = count_text(o.generated_text), "tokenizer"
        recs.append({
            "index": i, "request_id": o.request_id, "success": o.success, "error": o.error or None,
            "status": o.status, "prompt_len": o.prompt_len, "prompt_tokens": o.prompt_tokens,
            "expected_output_len": o.expected_output_len, "output_tokens": n_out if o.success else None,
            "output_tokens_source": source if o.success else None, "start_time_s": o.start_time,
            "ttft_s": o.ttft if o.success else None, "tpot_s": _tpot(o, n_out) if o.success else None,
            "e2el_s": o.latency if o.success else None, "itl_s": o.itl if o.success else [],
            "retries": o.retries, "finish_reason": o.finish_reason, "generated_text": o.generated_text,
            "tool_calls": o.tool_calls})
    return recs


def _stats(name: str, values_s: list[float], percentiles: list[float], out: dict) -> None:
    ms = np.array(values_s or [0.0]) * 1000
    out[f"mean_{name}_ms"] = float(np.mean(ms))
    out[f"median_{name}_ms"] = float(np.median(ms))
    out[f"std_{name}_ms"] = float(np.std(ms))
    for p in percentiles:
        out[f"p{int(p) if int(p) == p else p}_{name}_ms"] = float(np.percentile(ms, p))


def timeline(recs: list[dict]) -> dict:
    """Per one-second bucket of the run: output tokens, requests active at some point in it (vLLM's peak
    figures) and requests in flight on average over it (time-weighted: the plot's x axis)."""
    ok = [r for r in recs if r["success"]]
    if not ok:
        return {"output_tokens_per_s": [], "concurrent_requests": [], "mean_in_flight": []}
    t0 = min(r["start_time_s"] for r in ok)
    span = math.ceil(max(r["start_time_s"] + r["e2el_s"] for r in ok) - t0) + 1
    tokens, busy, flight = np.zeros(span), np.zeros(span), np.zeros(span)
    for r in ok:
        t = r["start_time_s"] + r["ttft_s"]
        for dt in [0.0] + r["itl_s"]:
            t += dt
            tokens[min(int(t - t0), span - 1)] += 1
        begin, end = r["start_time_s"] - t0, r["start_time_s"] + r["e2el_s"] - t0
        for s in range(int(begin), int(end) + 1):
            busy[s] += 1
            flight[s] += min(end, s + 1) - max(begin, s)
    return {"output_tokens_per_s": tokens.tolist(), "concurrent_requests": busy.tolist(),
            "mean_in_flight": flight.tolist()}


def summarize(recs: list[dict], duration: float, percentiles: list[float], goodput: dict[str, float]) -> dict:
    ok = [r for r in recs if r["success"]]
    total_in = sum(r["prompt_tokens"] if r["prompt_tokens"] is not None else r["prompt_len"] for r in ok)
    total_out = sum(r["output_tokens"] for r in ok)
    dur = duration if duration > 0 else math.inf       # nothing ran: rates are 0, never NaN
    res = {
        "duration": duration, "completed": len(ok), "failed": len(recs) - len(ok),
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur, "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
    }
    if goodput:
        limits = {k: v / 1000 for k, v in goodput.items()}
        good = sum(all((r[f"{k}_s"] or 0.0) <= v for k, v in limits.items()) for r in ok)
        res["request_goodput"] = good / dur
    else:
        res["request_goodput"] = None
    line = timeline(recs)
    res["max_output_tokens_per_s"] = max(line["output_tokens_per_s"], default=0.0)
    res["max_concurrent_requests"] = int(max(line["concurrent_requests"], default=0))
    values = {"ttft": [r["ttft_s"] for r in ok], "tpot": [r["tpot_s"] for r in ok if r["tpot_s"] is not None],
              "itl": [x for r in ok for x in r["itl_s"]], "e2el": [r["e2el_s"] for r in ok]}
    for name in METRICS:
        _stats(name, values[name], percentiles, res)
    res["timeline"] = line
    return res


def warnings_for(recs: list[dict], ignore_eos: bool) -> list[str]:
    ok = [r for r in recs if r["success"]]
    notes = []
    short = [r for r in ok if r["output_tokens"] < r["expected_output_len"]]
    if ignore_eos and short:
        notes.append(f"{len(short)} of {len(ok)} requests produced fewer tokens than planned although --ignore-eos "
                     "was sent: the endpoint does not honour ignore_eos / min_tokens (the hosted service does "
                     "not); the actual lengths are reported")
    off = [r for r in ok if r["prompt_tokens"] is not None and r["prompt_tokens"] != r["prompt_len"]]
    if off:
        notes.append(f"{len(off)} of {len(ok)} requests: the endpoint's usage.prompt_tokens differs from the planned "
                     f"length (first: planned {off[0]['prompt_len']}, usage {off[0]['prompt_tokens']}); the "
                     "usage figures are reported")
    no_usage = [r for r in ok if r["output_tokens_source"] == "tokenizer"]
    if no_usage:
        notes.append(f"{len(no_usage)} requests reported no usage: their output tokens were counted with the "
                     "tokenizer")
    return notes
