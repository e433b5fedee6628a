"""Sending the workload: arrival times (vLLM's Poisson / gamma process), the concurrency cap, the hosted rate
limit, retries after 429, the progress bar, and keeping every answer that came back when the run is stopped.

`--request-rate inf` sends everything at t=0; a finite rate draws gaps from a gamma distribution with shape
`--burstiness` (1 = Poisson), rescaled so that N requests span N/rate seconds, as vLLM does. `--max-concurrency`
caps requests in flight (closed loop). `--max-requests-per-minute` is a hard sliding-window cap on sends, 300 by
default against the hosted service (its documented limit). A 429 is answered by waiting (its Retry-After, else
1, 2, 4 ... 30 s) and sending again, up to `--max-retries` times; the waits are reported, never fatal. An
endpoint that refuses the credentials or the model, or cannot be reached, stops the run: what came back is kept.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass, field, replace

import httpx
import numpy as np
from tqdm import tqdm

from server.bench.backends import RequestOptions, RequestOutput, send
from server.bench.datasets import SampleRequest
from server.bench.endpoint import Endpoint

FATAL_CODES = {10000, 5007, "model_not_found", "invalid_api_key"}


@dataclass(frozen=True)
class LoadConfig:
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    max_requests_per_minute: int | None = None
    max_retries: int = 5
    timeout: float = 600.0                  # one request, seconds
    seed: int = 0

    def __post_init__(self):
        if not self.request_rate > 0:
            raise ValueError("--request-rate must be > 0 (inf: all at once)")
        if not self.burstiness > 0:
            raise ValueError("--burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")
        if self.max_requests_per_minute is not None and self.max_requests_per_minute < 1:
            raise ValueError("--max-requests-per-minute must be >= 1")


@dataclass
class Run:
    """One run's state, readable at any moment: what the CLI saves when the run ends, fails or is stopped."""
    outputs: list[RequestOutput | None]
    initial_test: RequestOutput | None = None
    started: float | None = None            # perf_counter when the first request was sent
    ended: float | None = None
    rate_limited: int = 0                   # 429 answers seen (each was waited out and retried)
    rate_limited_wait_s: float = 0.0
    aborted: str | None = None              # why the run stopped early
    interrupted: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def duration(self) -> float:
        if self.started is None:
            return 0.0
        return (self.ended or time.perf_counter()) - self.started


def arrival_times(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    """Offsets (s) from the run's start at which each request is sent."""
    if math.isinf(rate):
        return [0.0] * n
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n)
    times = np.cumsum(gaps)
    return (times * (n / rate) / times[-1]).tolist()      # the whole run spans n / rate seconds


class WindowLimiter:
    """At most `limit` sends in any 60 s window."""

    def __init__(self, limit: int, window: float = 60.0):
        self.limit, self.window = limit, window
        self.sent: collections.deque[float] = collections.deque()
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            while True:
                now = time.monotonic()
                while self.sent and now - self.sent[0] >= self.window:
                    self.sent.popleft()
                if len(self.sent) < self.limit:
                    self.sent.append(now)
                    return
                await asyncio.sleep(self.window - (now - self.sent[0]))


def fatal(out: RequestOutput) -> bool:
    """Errors no retry fixes: credentials, an unknown model, an endpoint that cannot be reached."""
    return out.status in (401, 403) or out.code in FATAL_CODES or (out.status is None and bool(out.error))


class Sender:
    def __init__(self, ep: Endpoint, opts: RequestOptions, load: LoadConfig, run: Run, progress: bool = True):
        self.ep, self.opts, self.load, self.run = ep, opts, load, run
        self.progress = progress
        self.limiter = WindowLimiter(load.max_requests_per_minute) if load.max_requests_per_minute else None
        self.t0 = time.perf_counter()

    def client(self) -> httpx.AsyncClient:
        limit = self.load.max_concurrency
        return httpx.AsyncClient(timeout=httpx.Timeout(self.load.timeout, connect=10.0),
                                 limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit))

    async def one(self, client: httpx.AsyncClient, sample: SampleRequest) -> RequestOutput:
        """Send, waiting out 429s."""
        for attempt in range(self.load.max_retries + 1):
            if self.limiter is not None:
                await self.limiter.acquire()
            out = await send(client, self.ep, sample, self.opts, self.t0)
            if out.status != 429 or attempt == self.load.max_retries:
                out.retries = attempt
                return out
            wait = out.retry_after if out.retry_after is not None else min(30.0, 2.0 ** attempt)
            self.run.rate_limited += 1
            self.run.rate_limited_wait_s += wait
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def initial_test(self, sample: SampleRequest, ready_timeout: float) -> RequestOutput:
        """The first prompt with max_tokens 1, retried while the endpoint is not up yet (connection refused,
        503) for up to `ready_timeout` seconds: a refusal here stops the run before it spends anything."""
        probe = replace(sample, expected_output_len=1)
        end = time.monotonic() + ready_timeout
        async with self.client() as client:
            while True:
                out = await self.one(client, probe)
                starting = out.status is None or out.status == 503
                if out.success or not starting or time.monotonic() >= end:
                    self.run.initial_test = out
                    return out
                await asyncio.sleep(1.0)

    async def all(self, samples: list[SampleRequest]) -> None:
        run, load = self.run, self.load
        times = arrival_times(len(samples), load.request_rate, load.burstiness, np.random.default_rng(load.seed))
        sem = asyncio.Semaphore(load.max_concurrency) if load.max_concurrency else None
        bar = tqdm(total=len(samples), desc="requests", unit="req", disable=not self.progress, dynamic_ncols=True)
        stop = asyncio.Event()

        async def task(client, sample):
            if sem is not None:
                await sem.acquire()
            try:
                if stop.is_set():
                    return
                out = await self.one(client, sample)
                run.outputs[sample.index] = out
                if fatal(out) and not stop.is_set():
                    run.aborted = out.error
                    stop.set()
                bar.update(1)
                bar.set_postfix_str(f"failed {sum(1 for o in run.outputs if o and not o.success)}, "
                                    f"429s {run.rate_limited}", refresh=False)
            finally:
                if sem is not None:
                    sem.release()

        tasks: list[asyncio.Task] = []
        async with self.client() as client:
            self.t0 = run.started = time.perf_counter()
            try:
                for sample, at in zip(samples, times):
                    delay = run.started + at - time.perf_counter()
                    if delay > 0:
                        try:
                            await asyncio.wait_for(stop.wait(), delay)
                        except TimeoutError:
                            pass
                    if stop.is_set():
                        break
                    tasks.append(asyncio.create_task(task(client, sample)))
                await asyncio.gather(*tasks)
            except asyncio.CancelledError:
                run.interrupted = True
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            finally:
                run.ended = time.perf_counter()
                bar.close()
