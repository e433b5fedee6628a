"""The one channel through which engine state reaches the model: a small typed, per-step context.

The model computes over a flat batch of `num_tokens` tokens from one or more sequences. For sequence `i`
the step's tokens are `input_ids[cu_seqlens_q[i]:cu_seqlens_q[i+1]]`; together with the tokens already
cached they make `seq_lens[i]` tokens of context. New K/V rows are written to `slot_mapping` (flat slot
indices into the paged cache: block * block_size + offset) and read back through `block_tables`.
With `kv_caches=None` there is no cache: each sequence attends only to its own tokens of this step
(used for one-shot scoring and tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardContext:
    cu_seqlens_q: torch.Tensor                 # [num_seqs + 1] int32, offsets of each sequence's new tokens
    seq_lens: torch.Tensor                     # [num_seqs] int32, context length including this step
    slot_mapping: torch.Tensor | None = None   # [num_tokens] int64, cache slot of each new token
    block_tables: torch.Tensor | None = None   # [num_seqs, max_blocks] int32
    # per layer (k, v) [blocks, bs, kvh, d]; with an fp8 pool (k, v, k_scales, v_scales), scales [blocks, kvh]
    kv_caches: list[tuple[torch.Tensor, ...]] | None = None
    # Host copies of the lengths, so the reference (pure PyTorch) attention can slice without a device sync.
    query_lens_cpu: list[int] | None = None
    seq_lens_cpu: list[int] | None = None
    # An upper bound on seq_lens that does not change between steps (the context window), set by CUDA
    # graphs: decode attention then sizes its work from it instead of this step's lengths.
    max_seq_len: int | None = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def max_query_len(self) -> int | None:
        """The most tokens one sequence brings this step (host side), when the host lengths are known."""
        return max(self.query_lens_cpu) if self.query_lens_cpu else None

    def context_bound(self, block_size: int) -> int:
        """A host-side upper bound on seq_lens that costs no device sync: `max_seq_len` when set (CUDA graphs),
        else the host lengths, else what the block tables can address."""
        if self.max_seq_len is not None:
            return self.max_seq_len
        if self.seq_lens_cpu:
            return max(self.seq_lens_cpu)
        return self.block_tables.shape[1] * block_size

    @classmethod
    def for_prefill(cls, lens: list[int], device: torch.device | str = "cpu") -> ForwardContext:
        """Cache-less context: each sequence is all new tokens and attends causally to itself only."""
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        return cls(cu_seqlens_q=cu.to(device), seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
                   query_lens_cpu=list(lens), seq_lens_cpu=list(lens))
