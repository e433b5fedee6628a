"""Token-accounting scheduler: each step gives tokens to requests until the step's token budget is spent.

Running requests go first, each getting what it lacks (one token when decoding, a chunk when its prefill is
unfinished), so a long prompt is prefilled in chunks between other requests' decode steps. Waiting requests
are admitted afterwards in arrival order, reusing cached prefix blocks; the later choices of one prompt (OpenAI's
`n`) are held until the first has computed the prompt, so it is prefilled once. When the pool cannot hold a running
request's next tokens, the most recently admitted running request is preempted: its blocks are released and
it waits again at the head of the queue, to be recomputed later (same tokens, same random stream).

Fairness (vLLM's --long-prefill-token-threshold T): a "long" prefill has more than T tokens left to compute.
While anything else runs or waits, long prefills together get at most T tokens a step, so every step keeps
max_num_batched_tokens - T for decodes and short prefills; a long waiting prompt that finds no share this
step is passed over (it keeps its place) by shorter ones behind it. The bound this gives: a request whose
prompt fits in max_num_batched_tokens - T - (the running decodes and short prefills), that finds a free
slot, room in the pool and no other request waiting ahead of it, is prefilled in the first step after it
arrives and samples its first token in that step, however long the prompts being prefilled beside it.
Alone, a long prompt gets the whole budget.
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
        long_budget = self._long_prefill_budget(budget)
        running = list(self.running)
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            left = req.num_tokens - req.num_computed_tokens
            long = self._is_long(left)
            n = min(left, budget, long_budget if long else budget)
            if n == 0:              # the long prefills' share of this step is spent
                i += 1
                continue
            while not self.block_manager.allocate(req, n):
                victim = running.pop()          # the most recently admitted request gives way
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, n))
                budget -= n
                long_budget -= n if long else 0
                i += 1
        if out.preempted:                       # the pool is full: admitting anyone would thrash
            self.running = [r for r in self.running if r.status == RequestStatus.RUNNING]
            return out
        k = 0
        while k < len(self.waiting) and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[k]
            if self._awaits_leader(req) or \
                    (long_budget == 0 and self._is_long(req.num_tokens - req.num_computed_tokens)):
                k += 1      # a later choice whose prompt is being prefilled, or no long share left: those
                continue    # behind it may go; it keeps its place
            # prompt logprobs are computed by the model, never taken from the cache (the K/V such a request
            # computes is what any request would, so its blocks are offered to the cache as usual)
            cached = req.num_computed_tokens == 0 and req.params.prompt_logprobs is None
            prefix = self.block_manager.lookup(req) if cached else []
            left = req.num_tokens - len(prefix) * self.block_manager.block_size
            long = self._is_long(left)
            n = min(left, budget, long_budget if long else budget)
            if n == 0 or not self.block_manager.allocate(req, n, prefix):
                break
            del self.waiting[k]
            long_budget -= n if long else 0
            if req.status == RequestStatus.WAITING:   # first admission: report cached prompt tokens
                req.num_cached_tokens = req.num_computed_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, n))
            budget -= n
        return out

    def _is_long(self, tokens_left: int) -> bool:
        t = self.config.long_prefill_token_threshold
        return 0 < t < tokens_left

    def _long_prefill_budget(self, budget: int) -> int:
        """What long prefills may take this step: T while other work (a decode, a short prefill) runs or waits,
        else all of it."""
        t = self.config.long_prefill_token_threshold
        if not t or not any(not self._is_long(r.num_tokens - r.num_computed_tokens)
                            for r in (*self.running, *self.waiting)):
            return budget
        return min(t, budget)

    def _awaits_leader(self, req: Request) -> bool:
        """Whether a later choice of a prompt (OpenAI's `n`) must wait: until its first choice has prefilled the
        prompt (and so produced its first output, prompt logprobs included), whose full blocks it then finds
        in the prefix cache."""
        leader = req.prefill_leader
        if leader is None or req.status != RequestStatus.WAITING:
            return False
        return leader.first_token_time is None and not leader.is_finished

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
