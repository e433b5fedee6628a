"""A step's model and sampler inputs, built from persistent state so that the host work per step grows with
the tokens computed, not with the batch's contexts (vLLM v1's InputBatch / BlockTable).

- Block tables: each running request owns a row of one device table [max_num_seqs, blocks per context].
  A step uploads only the blocks a request got since its last step; a row is cleared when its request
  finishes or is preempted. The step's `block_tables` [num_seqs, width] is gathered from the rows on the
  device, zero-padded past each request's blocks as before.
- Token ids are read from each request's token array, only the ids computed this step.
- Slot mapping: computed on the device from the table rows and the positions.
- Penalty statistics: engine/penalty_state.py. Sampling parameters, grammar masks: staged like the rest.
- Everything reaches the device through the staging arena (engine/staging.py); the sampled ids and
  logprobs come back in one copy (`finish`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.block_manager import cdiv
from engine.config import EngineConfig
from engine.forward_context import ForwardContext
from engine.penalty_state import PenaltyState
from engine.request import Request
from engine.sampler import SampledTokens, SamplerOutput, SamplingBatch, uses_penalties
from engine.scheduler import SchedulerOutput
from engine.staging import ReadBack, StagingArena


@dataclass
class StepInputs:
    input_ids: torch.Tensor                 # [num_tokens] int64
    positions: torch.Tensor                 # [num_tokens] int64
    ctx: ForwardContext
    samplers: list[Request]                 # requests sampling a token this step, in scheduled order
    logits_rows: torch.Tensor | None        # [len(samplers)] int64: their last token's row in the flat batch


class BlockTable:
    def __init__(self, max_rows: int, max_blocks: int, device: torch.device):
        self.table = torch.zeros((max_rows, max_blocks), dtype=torch.int32, device=device)
        self.num_blocks = [0] * max_rows            # entries written in each row
        self.row_of: dict[Request, int] = {}
        self._free = list(range(max_rows - 1, -1, -1))

    def add(self, req: Request) -> int:
        if not self._free:
            raise RuntimeError("more running requests than block-table rows (max_num_seqs)")
        row = self.row_of[req] = self._free.pop()
        return row

    def release(self, req: Request) -> None:
        row = self.row_of.pop(req, None)
        if row is not None:
            self.table[row, :self.num_blocks[row]] = 0      # keeps the padding past a request's blocks zero
            self.num_blocks[row] = 0
            self._free.append(row)

    def stage_new_blocks(self, reqs: list[Request], rows: list[int], staging: StagingArena):
        """Stage the blocks each request got since its last step; returns what `apply` writes after the flush."""
        r, c, v = [], [], []
        for req, row in zip(reqs, rows):
            n, have = len(req.block_ids), self.num_blocks[row]
            if n < have:
                raise RuntimeError(f"{req.request_id}: its blocks shrank without leaving the batch")
            if n > have:
                r += [row] * (n - have)
                c += range(have, n)
                v += req.block_ids[have:]
                self.num_blocks[row] = n
        if not v:
            return None
        return staging.put(r, torch.int64), staging.put(c, torch.int64), staging.put(v, torch.int32)

    def apply(self, staged) -> None:
        if staged is not None:
            rows, cols, values = staged
            self.table.index_put_((rows, cols), values)


class InputBatch:
    def __init__(self, config: EngineConfig, vocab_size: int, device: torch.device):
        self.block_size = config.block_size
        self.staging = StagingArena(device)
        self.readback = ReadBack(device)
        self.block_table = BlockTable(config.max_num_seqs, cdiv(config.max_model_len, config.block_size), device)
        self.penalties = PenaltyState(vocab_size, device)
        self._penalized: tuple[torch.Tensor, torch.Tensor] | None = None   # this step's (batch rows, state rows)

    def prepare(self, sched: SchedulerOutput, kv_caches) -> StepInputs | None:
        """Model inputs for the scheduled tokens (`sched.scheduled` order; None when there are none); forgets
        the requests that left the batch."""
        st, bt = self.staging, self.block_table
        st.reset()
        for req in sched.finished + sched.preempted:
            bt.release(req)
            self.penalties.release(req)
        reqs = [s.request for s in sched.scheduled]
        if not reqs:
            return None
        for req in reqs:
            if req not in bt.row_of:
                bt.add(req)
                if uses_penalties(req.params):
                    self.penalties.add(req, st)
        rows = [bt.row_of[r] for r in reqs]
        new_blocks = bt.stage_new_blocks(reqs, rows, st)

        n = len(reqs)
        qlens = np.fromiter((s.num_tokens for s in sched.scheduled), np.int64, n)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, n)
        ends = starts + qlens
        cu = np.zeros(n + 1, np.int64)
        np.cumsum(qlens, out=cu[1:])
        ids_host, input_ids = st.alloc((int(cu[-1]),), torch.int64)
        ids = ids_host.numpy()
        for i, req in enumerate(reqs):
            ids[cu[i]:cu[i + 1]] = req.token_ids(starts[i], ends[i])
        seq = np.repeat(np.arange(n), qlens)                       # each token's sequence
        positions = st.put(np.arange(cu[-1]) - cu[seq] + starts[seq], torch.int64)
        token_rows = st.put(np.asarray(rows)[seq], torch.int64)
        rows_dev = st.put(rows, torch.int64)
        cu_dev, seq_lens = st.put(cu, torch.int32), st.put(ends, torch.int32)
        samplers = [k for k, s in enumerate(sched.scheduled) if s.samples]
        logits_rows = st.put(cu[1:][samplers] - 1, torch.int64) if samplers else None
        st.flush()

        bt.apply(new_blocks)
        self.penalties.apply()
        bs = self.block_size
        slots = bt.table[token_rows, positions // bs].long() * bs + positions % bs
        width = max(len(r.block_ids) for r in reqs)
        ctx = ForwardContext(cu_seqlens_q=cu_dev, seq_lens=seq_lens, slot_mapping=slots,
                             block_tables=bt.table[:, :width].index_select(0, rows_dev), kv_caches=kv_caches,
                             query_lens_cpu=qlens.tolist(), seq_lens_cpu=ends.tolist())
        return StepInputs(input_ids, positions, ctx, [reqs[k] for k in samplers], logits_rows)

    def sampling_batch(self, reqs: list[Request], eos_id: int, vocab_size: int) -> SamplingBatch:
        """The sampler's inputs for `reqs`. Flushes everything staged so far (grammar masks included)."""
        st = self.staging
        batch = SamplingBatch.make([r.params for r in reqs], [r.seed for r in reqs],
                                   [r.num_output_tokens for r in reqs], eos_id, vocab_size, st.put)
        state_rows = self.penalties.rows(reqs)
        penalized = [i for i, row in enumerate(state_rows) if row]
        rows_dev = st.put(state_rows, torch.int64) if penalized else None
        self._penalized = (st.put(penalized, torch.int64), st.put([state_rows[i] for i in penalized],
                                                                 torch.int64)) if penalized else None
        st.flush()
        if penalized:
            batch.seen, batch.counts = self.penalties.gather(rows_dev, batch.use_seen, batch.use_counts)
        return batch

    def finish(self, out: SamplerOutput) -> SampledTokens:
        """Record the sampled ids in the penalty state, and bring the results to the host: the step's one
        device->host copy and its one wait."""
        if self._penalized is not None:
            batch_rows, state_rows = self._penalized
            self.penalties.update(state_rows, out.token_ids.index_select(0, batch_rows))
            self._penalized = None
        return SampledTokens(self.readback.fetch(out.pack()))
