"""Prometheus metrics under vLLM's names (existing Grafana boards work) and the one-line JSON request log.

Engine state (running, waiting, KV usage, preemptions, prefix cache) is read at scrape time; request
figures (tokens, TTFT, time per output token, end-to-end latency) are recorded when a request ends.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

request_log = logging.getLogger("server.requests")

_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)


class _EngineCollector:
    def __init__(self, get_engine, model_name: str):
        self.get_engine, self.model_name = get_engine, model_name

    def collect(self):
        llm = self.get_engine()
        labels = ["model_name"]
        values = [self.model_name]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests running on the engine", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run", labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage (1 = full)", labels=labels)
        preempt = CounterMetricFamily("vllm:num_preemptions", "Preemptions", labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   labels=labels)
        if llm is not None:
            eng = llm.engine
            running.add_metric(values, llm.num_running)
            waiting.add_metric(values, llm.num_waiting)
            usage.add_metric(values, eng.block_manager.usage)
            preempt.add_metric(values, eng.scheduler.num_preemptions)
            queries.add_metric(values, eng.block_manager.num_queries)
            hits.add_metric(values, eng.block_manager.num_hits)
        yield from (running, waiting, usage, preempt, queries, hits)


class Metrics:
    def __init__(self, get_engine, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(get_engine, model_name))
        labels = ["model_name"]
        self.model_name = model_name
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed", labels,
                                     registry=self.registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated", labels,
                                         registry=self.registry)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason: stop, length, or "
                               "abort / error for those that ended early", labels + ["finished_reason"],
                               registry=self.registry)
        self.ended_early = Counter("mistral_small:requests_ended_early", "Requests that ended before their end, by "
                                   "why: client_disconnected, client_stalled, timeout, shutdown, error",
                                   labels + ["reason"], registry=self.registry)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token", labels, buckets=_TTFT,
                              registry=self.registry)
        self.tpot = Histogram("vllm:time_per_output_token_seconds", "Time per output token after the first",
                              labels, buckets=_TPOT, registry=self.registry)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency", labels,
                             buckets=_E2E, registry=self.registry)


@dataclass
class RequestTimer:
    """Per-request timing kept by the HTTP layer; `finish` records metrics and writes the log line."""
    request_id: str
    route: str
    start: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()

    def finish(self, metrics: Metrics | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int,
               finish_reason: str | None, ended_by: str | None = None, sequence_tokens: int | None = None) -> None:
        """`finish_reason`: how the engine ended the request (None while it was still running); `ended_by`: why
        its response ended before the answer was delivered (server/admission.py), None when it was;
        `sequence_tokens`: the longest choice's tokens when several decode side by side (TPOT is per sequence;
        default: completion_tokens)."""
        end = time.monotonic()
        ttft = None if self.first_token is None else self.first_token - self.start
        decode = None if self.first_token is None else end - self.first_token
        tps = completion_tokens / (end - self.start) if end > self.start else 0.0
        if metrics is not None:
            m = metrics.model_name
            metrics.prompt_tokens.labels(m).inc(prompt_tokens)
            metrics.generation_tokens.labels(m).inc(completion_tokens)
            metrics.e2e.labels(m).observe(end - self.start)
            if ttft is not None:
                metrics.ttft.labels(m).observe(ttft)
            per_sequence = completion_tokens if sequence_tokens is None else sequence_tokens
            if decode is not None and per_sequence > 1:
                metrics.tpot.labels(m).observe(decode / (per_sequence - 1))
            if ended_by is not None:
                metrics.success.labels(m, "error" if ended_by == "error" else "abort").inc()
                metrics.ended_early.labels(m, ended_by).inc()
            elif finish_reason:
                metrics.success.labels(m, finish_reason).inc()
        request_log.info(json.dumps({
            "request_id": self.request_id, "model": metrics.model_name if metrics is not None else None,
            "route": self.route, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "cached_tokens": cached_tokens,
            "ttft_s": None if ttft is None else round(ttft, 4), "e2e_s": round(end - self.start, 4),
            "tokens_per_s": round(tps, 2), "finish_reason": finish_reason, "cancelled": ended_by is not None,
            "ended_by": ended_by}))
