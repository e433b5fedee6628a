"""The engine core (vLLM v1's EngineCore): the step loop over token ids, nothing about text.

Owns the scheduler, the block manager and the model runner. A step: schedule -> the runner computes the
scheduled tokens and samples (one device->host copy) -> each request that sampled gets its token appended
and, if it must stop at it, is finished here, its blocks released at once.

Token-level endings live here: EOS (unless ignore_eos), a stop token id, max_tokens, and a completed
grammar. The grammar's matcher is advanced here too, not in output processing: it must have consumed a token
before the next step computes the request's mask, and its completion ends the request like EOS does.
Text-level endings (stop strings) are found by the output processor, which then calls `finish`.
"""

from __future__ import annotations

import time

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.outputs import CoreOutput
from engine.request import Request
from engine.sampler import SampledTokens
from engine.scheduler import Scheduler


class EngineCore:
    def __init__(self, config: EngineConfig, runner: ModelRunner, eos_id: int):
        self.config, self.runner, self.eos_id = config, runner, eos_id
        self.block_manager = BlockManager(runner.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, Request] = {}      # unfinished requests by id

    def add(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.requests[req.request_id] = req
        self.scheduler.add(req)

    def finish(self, request_id: str, reason: str) -> Request | None:
        """End a request wherever it is (its blocks are free at once); None if unknown or already finished."""
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req, reason)
        return req

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[CoreOutput]:
        """One step; returns a CoreOutput for every request that sampled a token in it, in batch order."""
        sched = self.scheduler.schedule()
        sampled = self.runner.execute(sched)
        outputs = []
        for s in sched.scheduled:
            req, samples = s.request, s.samples
            req.num_computed_tokens += s.num_tokens
            self.block_manager.cache_full_blocks(req, req.num_computed_tokens)
            if samples:
                outputs.append(self._append(req, sampled, len(outputs)))
        return outputs

    def _append(self, req: Request, sampled: SampledTokens, row: int) -> CoreOutput:
        token = sampled.token_ids[row]
        req.append_output(token)
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        reason = self._stop_reason(req, token)
        if reason is not None:
            self.finish(req.request_id, reason)
        out = CoreOutput(req.request_id, token, reason, req.num_cached_tokens)
        if sampled.logprobs is not None:
            out.logprob = sampled.logprobs[row]
        if sampled.top_ids is not None:
            out.top_ids, out.top_logprobs = sampled.top_ids[row], sampled.top_logprobs[row]
        return out

    def _stop_reason(self, req: Request, token: int) -> str | None:
        p = req.params
        if req.matcher is not None:
            if not req.matcher.consume_token(token):
                raise RuntimeError(f"{req.request_id}: sampled token {token} violates the grammar "
                                   f"({req.matcher.get_error()})")
            if req.matcher.is_stopped():
                return "stop"
        if (token == self.eos_id and not p.ignore_eos) or token in p.stop_token_ids:
            return "stop"
        if req.num_output_tokens >= req.max_tokens:
            return "length"
        return None
