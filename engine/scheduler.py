"""Token-accounting scheduler: each step gives tokens to requests until the step's token budget is spent.

Running requests go first, each getting what it lacks (one token when decoding, a chunk when its prefill is
unfinished), so a long prompt is prefilled in chunks between other requests' decode steps. Waiting requests
are admitted afterwards in arrival order, reusing cached prefix blocks. When the pool cannot hold a running
request's next tokens, the most recently admitted running request is preempted: its blocks are released and
it waits again at the head of the queue, to be recomputed later (same tokens, same random stream).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_tokens: int                         # tokens computed this step, from request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the request's known tokens, so a new token is sampled."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)     # blocks released this step; they wait again
    # requests that ended (finished, aborted) since the last step: the runner forgets their per-request state
    finished: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        """Reads config.max_num_seqs (requests running at once) and config.max_num_batched_tokens (tokens per
        step: the prefill chunk size when decodes are few)."""
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._finished: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished=self._finished)
        self._finished = []
        budget = self.config.max_num_batched_tokens
        running = list(self.running)
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.block_manager.allocate(req, n):
                victim = running.pop()          # the most recently admitted request gives way
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                i += 1
        if out.preempted:                       # the pool is full: admitting anyone would thrash
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
            return out
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            prefix = self.block_manager.lookup(req) if req.num_computed_tokens == 0 else []
            n = min(req.num_tokens - len(prefix) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate(req, n, prefix):
                break
            self.waiting.popleft()
            if req.status == RequestStatus.WAITING:   # first admission: report cached prompt tokens
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def _preempt(self, req: Request) -> None:
        self.block_manager.release(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: str) -> None:
        """Remove a request wherever it is and release its blocks at once."""
        if req.is_finished:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.block_manager.release(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self._finished.append(req)
