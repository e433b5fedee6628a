"""CUDA graphs for decode steps: the decoder forward of a batch of one-token sequences, captured once per
batch size and replayed, so a step costs one launch instead of one per kernel of 40 layers, and
its time is the weights' bytes, not the CPU's. On by default on CUDA; `enforce_eager` turns them off.

What must hold for a step to be replayable, and how it is kept:
- Every tensor the graph reads lives at a fixed address: token ids, positions, slots, sequence lengths and
  block tables are copied into static buffers sized for the largest batch; the KV pool never moves.
- Nothing in the captured forward depends on host values of this step: attention sizes its work from
  `max_seq_len` (the context window), not from the step's lengths, and reads only positions < seq_len;
  the K/V store (fp8 included) is a Triton kernel without data-dependent shapes.
- A batch is padded to the next captured size. Padding rows write their K/V to the pool's scratch block
  (never handed to requests), have length 1 and are dropped from the output.
Not captured: steps with prefill tokens or images, and batches above the largest size (64 with nf4, whose
larger batches go through bitsandbytes; 128 otherwise): those run eagerly. Never captured (ModelRunner logs
why and runs eagerly): int8 weights, whose LLM.int8() picks outlier columns per batch, and an fp8 KV cache
on the reference attention backend (its store finds blocks with torch.unique). A capture that fails
stops the engine with an error naming --enforce-eager.

`capture=False` keeps the static buffers and padding but runs the forward eagerly, attention sized from the
step's lengths: how the CPU tests check everything here except the capture itself (max_seq_len has its own
test in test_cuda_graph.py).
"""

from __future__ import annotations

import torch

from engine.forward_context import ForwardContext


def batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch itself)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch + 1, 8))
    return sorted(set(sizes + [max_batch]))


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, scratch_block: int, max_model_len: int,
                 max_batch: int, capture: bool = True):
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.scratch, self.max_model_len = scratch_block, max_model_len
        self.sizes = batch_sizes(max_batch)
        dev = model.language_model.model.embed_tokens.weight.device
        n, width = self.sizes[-1], -(-max_model_len // block_size)
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), scratch_block * block_size, dtype=torch.long, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.tables = torch.full((n, width), scratch_block, dtype=torch.int32, device=dev)
        self.cu = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def _ctx(self, b: int) -> ForwardContext:
        # Captured: attention sized from the context window. Eager (CPU): from this step's lengths, which
        # cost nothing to read there, where the reference attention would gather the whole window.
        return ForwardContext(cu_seqlens_q=self.cu[:b + 1], seq_lens=self.seq_lens[:b],
                              slot_mapping=self.slots[:b], block_tables=self.tables[:b], kv_caches=self.kv_caches,
                              query_lens_cpu=[1] * b, max_seq_len=self.max_model_len if self.capture else None)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.ids[:b], self.positions[:b], self._ctx(b))

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = None
        for b in reversed(self.sizes):          # largest first: smaller graphs reuse its memory pool
            try:
                self._forward(b)                # warm-up: compiles and tunes the kernels, settles the allocator
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    self.outputs[b] = self._forward(b)
            except Exception as e:
                raise RuntimeError(f"capturing the CUDA graph of decode batch size {b} failed ({type(e).__name__}: "
                                   f"{e}); start with --enforce-eager (EngineConfig(enforce_eager=True)) to run "
                                   "without CUDA graphs") from e
            pool = g.pool()
            self.graphs[b] = g
        torch.cuda.synchronize()

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, seq_lens: torch.Tensor,
            tables: torch.Tensor) -> torch.Tensor:
        """One decode step for `b` sequences (device tensors: ids/positions/slots [b], seq_lens [b] int32,
        tables [b, w] int32): hidden states [b, hidden]."""
        b, w = ids.shape[0], tables.shape[1]
        size = next(s for s in self.sizes if s >= b)
        self.ids[:b].copy_(ids)
        self.positions[:b].copy_(positions)
        self.slots[:b].copy_(slots)
        self.seq_lens[:b].copy_(seq_lens)
        self.tables[:b, :w].copy_(tables)       # columns past w are never read: positions < seq_len only
        # padding rows [b, size): scratch slot, length 1, the scratch block as their whole table
        self.ids[b:size] = 0
        self.positions[b:size] = 0
        self.slots[b:size] = self.scratch * self.block_size
        self.seq_lens[b:size] = 1
        self.tables[b:size, 0] = self.scratch
        if not self.capture:
            return self._forward(size)[:b]
        self.graphs[size].replay()
        return self.outputs[size][:b]
