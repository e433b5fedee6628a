"""Batched token sampling with per-row parameters (vLLM/OpenAI order):

min_tokens ban -> repetition penalty -> frequency/presence penalties -> (greedy rows: argmax)
-> temperature -> top-k -> top-p -> exponential-race sampling with counter-based noise.

Per-row parameters are built on the host in `SamplingBatch.make` and uploaded through the engine's staging
arena; token statistics for penalties stay on the device (engine/penalty_state.py). `Sampler.__call__` never
reads a device value back, so it neither stalls the GPU nor blocks CUDA graphs; the engine brings a step's
results to the host with one copy (`SamplerOutput.pack`). The noise for (seed, step, token)
comes from a stateless integer hash, so a request's tokens do not depend on the batch it shares, on its row,
on preemption/recompute, or on the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from engine.sampling_params import SamplingParams

GREEDY_BELOW = 1e-5   # temperatures this small are argmax in practice and overflow logits/T: treat as greedy (vLLM)
TOP_P_SLACK = 1e-6    # float32 cumsums are off by ~1e-7: a set whose mass is within this of top_p counts as reaching it
M32 = 0xFFFFFFFF


@dataclass
class SamplingBatch:
    """One row per sequence that samples this step."""
    temperature: torch.Tensor          # [B] float32 (1.0 on greedy rows, whose value is unused)
    top_p: torch.Tensor                # [B] float32, >= 1 = off
    top_k: torch.Tensor                # [B] int64, 0 = off
    repetition_penalty: torch.Tensor   # [B] float32, 1 = off
    frequency_penalty: torch.Tensor    # [B] float32
    presence_penalty: torch.Tensor     # [B] float32
    seeds: torch.Tensor                # [B] int64, the request's seed (two's complement of seed mod 2**64)
    steps: torch.Tensor                # [B] int64, index of the token being sampled within the request's output
    greedy: torch.Tensor               # [B] bool
    ban_idx: torch.Tensor | None       # [N] flat indices (row * vocab_size + token) of EOS/stop ids banned by
    #                                    min_tokens; None = none
    vocab_size: int
    all_greedy: bool                   # host-side flags: skip whole stages without asking the device
    use_top_k: bool
    use_top_p: bool
    num_logprobs: int                  # -1 = no row wants logprobs; else the largest `logprobs` in the batch
    use_seen: bool                     # some row has a repetition penalty: `seen` must be set
    use_counts: bool                   # some row has a frequency/presence penalty: `counts` must be set
    # Token statistics (rows without the penalty may hold anything: a penalty of 1 / 0 leaves them unchanged)
    seen: torch.Tensor | None = None   # [B, V] bool, tokens in the prompt or output (repetition penalty)
    counts: torch.Tensor | None = None  # [B, V] float32, times each token was generated (frequency/presence)

    @classmethod
    def make(cls, params: list[SamplingParams], seeds: list[int], num_outputs: list[int], eos_id: int,
             vocab_size: int, put: Callable[[np.ndarray, torch.dtype], torch.Tensor]) -> SamplingBatch:
        """Per-row parameters, uploaded by `put(values, dtype) -> device tensor` (the engine's staging arena).
        The token statistics are not set here: the engine gathers them from its PenaltyState."""
        V = vocab_size
        greedy = [p.greedy or p.temperature < GREEDY_BELOW for p in params]
        banned = [r * V + t for r, (p, n) in enumerate(zip(params, num_outputs)) if n < p.min_tokens
                  for t in sorted({eos_id, *p.stop_token_ids}) if 0 <= t < V]
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=put([1.0 if g else p.temperature for p, g in zip(params, greedy)], torch.float32),
            top_p=put([p.top_p for p in params], torch.float32),
            top_k=put([min(max(p.top_k, 0), V) for p in params], torch.int64),
            repetition_penalty=put([repetition_penalty(p) for p in params], torch.float32),
            frequency_penalty=put([p.frequency_penalty for p in params], torch.float32),
            presence_penalty=put([p.presence_penalty for p in params], torch.float32),
            # any Python int maps onto int64 by its low 64 bits, so engine seeds beyond 2**63 still work
            seeds=put([((s + 2**63) % 2**64) - 2**63 for s in seeds], torch.int64),
            steps=put(num_outputs, torch.int64),
            greedy=put(greedy, torch.bool),
            ban_idx=put(banned, torch.int64) if banned else None, vocab_size=V,
            all_greedy=all(greedy),
            use_top_k=any(0 < p.top_k < V and not g for p, g in zip(params, greedy)),
            use_top_p=any(p.top_p < 1 and not g for p, g in zip(params, greedy)),
            num_logprobs=max(wanted, default=-1),
            use_seen=any(repetition_penalty(p) != 1.0 for p in params),
            use_counts=any(counts_outputs(p) for p in params))

    @classmethod
    def build(cls, params: list[SamplingParams], seeds: list[int], prompt_ids: list[list[int]],
              output_ids: list[list[int]], eos_id: int, vocab_size: int, device) -> SamplingBatch:
        """From token lists, statistics computed from scratch: for tests, and the reference that the engine's
        incremental PenaltyState must equal."""
        batch = cls.make(params, seeds, [len(o) for o in output_ids], eos_id, vocab_size,
                         lambda v, dtype: torch.tensor(np.asarray(v), dtype=dtype).to(device))
        if batch.use_seen:
            batch.seen = torch.zeros((len(params), vocab_size), dtype=torch.bool)
            for r, (prompt, out) in enumerate(zip(prompt_ids, output_ids)):
                batch.seen[r, list(prompt) + list(out)] = True
            batch.seen = batch.seen.to(device)
        if batch.use_counts:
            batch.counts = torch.zeros((len(params), vocab_size), dtype=torch.float32)
            for r, out in enumerate(output_ids):
                batch.counts[r].index_add_(0, torch.tensor(out, dtype=torch.int64), torch.ones(len(out)))
            batch.counts = batch.counts.to(device)
        return batch


def repetition_penalty(p: SamplingParams) -> float:
    # repetition_penalty 0 is documented as "off", like 1
    return p.repetition_penalty if p.repetition_penalty not in (0.0, 1.0) else 1.0


def counts_outputs(p: SamplingParams) -> bool:
    return bool(p.frequency_penalty or p.presence_penalty)


def uses_penalties(p: SamplingParams) -> bool:
    """Whether sampling for `p` reads token statistics (so the engine keeps them for the request)."""
    return repetition_penalty(p) != 1.0 or counts_outputs(p)


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor             # [B] int64
    # Logprobs are "raw" (vLLM's default): log_softmax of the model's logits before the min_tokens ban,
    # penalties, temperature and truncation, so they describe the model, not the sampling knobs.
    logprobs: torch.Tensor | None       # [B] float32 at the chosen token; None when no row asked
    top_ids: torch.Tensor | None        # [B, K] int64, K = the batch's largest `logprobs`; rows asking less slice
    top_logprobs: torch.Tensor | None   # [B, K] float32

    def pack(self) -> torch.Tensor:
        """[B, 1 (+1 + 2K)] float64 on the device: ids, logprobs, top ids, top logprobs side by side, so one
        copy brings everything to the host (float64 holds the int ids and the float32 values exactly)."""
        cols = [self.token_ids[:, None]]
        if self.logprobs is not None:
            cols.append(self.logprobs[:, None])
        if self.top_ids is not None:
            cols += [self.top_ids, self.top_logprobs]
        return torch.cat([c.double() for c in cols], dim=1)


class SampledTokens:
    """A step's sampler output on the host, as Python lists (the inverse of SamplerOutput.pack)."""

    def __init__(self, packed: np.ndarray):
        k = (packed.shape[1] - 2) // 2
        self.token_ids: list[int] = packed[:, 0].astype(np.int64).tolist()
        self.logprobs: list[float] | None = packed[:, 1].tolist() if packed.shape[1] > 1 else None
        self.top_ids: list[list[int]] | None = packed[:, 2:2 + k].astype(np.int64).tolist() if k > 0 else None
        self.top_logprobs: list[list[float]] | None = packed[:, 2 + k:].tolist() if k > 0 else None


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """min_tokens ban, repetition penalty, frequency/presence penalties; returns a new [B, V] tensor."""
    logits = logits.float().clone()
    if batch.ban_idx is not None:
        logits.view(-1).index_fill_(0, batch.ban_idx, float("-inf"))
    if batch.use_seen:
        p = batch.repetition_penalty[:, None]
        logits = torch.where(batch.seen, torch.where(logits > 0, logits / p, logits * p), logits)
    if batch.use_counts:
        counts = batch.counts      # float counts: exact up to 2**24
        logits = logits - (batch.frequency_penalty[:, None] * counts
                           + batch.presence_penalty[:, None] * (counts > 0).float())
    return logits


def top_k_top_p_mask(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, V] bool keep-mask. top_k [B] int64 (0 = off) keeps the k largest logits (ties with the k-th are
    kept); top_p [B] (>= 1 = off) then keeps the smallest most-likely set whose renormalized mass reaches p.
    At least the top token always survives."""
    V = logits.shape[-1]
    vals, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)
    kth = vals.gather(1, (k - 1)[:, None])
    keep = vals >= kth
    probs = vals.masked_fill(~keep, float("-inf")).softmax(-1)
    before = torch.nn.functional.pad(probs.cumsum(-1)[:, :-1], (1, 0))   # mass strictly above each token
    p = top_p[:, None]
    keep &= (before < p - TOP_P_SLACK) | (p >= 1)
    keep[:, 0] = True
    return torch.empty_like(keep).scatter_(1, order, keep)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # low 32 bits of h * c with h, c < 2**32, split so no int64 product overflows (signed overflow is UB)
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    # murmur3's finalizer: a bijection on 32-bit words with full avalanche
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _row_key(seeds: torch.Tensor, steps: torch.Tensor, salt: int) -> torch.Tensor:
    h = torch.full_like(seeds, salt)
    for word in (seeds & M32, (seeds >> 32) & M32, steps & M32, (steps >> 32) & M32):
        h = _fmix32(((h ^ word) + 0x9E3779B9) & M32)
    return h


def _random_uniform_cpu(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The same numbers as the tensor path below, in numpy uint32 arithmetic (wrapping multiplies make it
    several times faster on a CPU than int64 tensors split into 16-bit halves)."""
    def fmix(h):
        h ^= h >> np.uint32(16)
        h *= np.uint32(0x85EBCA6B)
        h ^= h >> np.uint32(13)
        h *= np.uint32(0xC2B2AE35)
        return h ^ (h >> np.uint32(16))

    s = seeds.numpy().astype(np.uint64)
    t = steps.numpy().astype(np.uint64)
    words = [(s & 0xFFFFFFFF), (s >> np.uint64(32)), (t & 0xFFFFFFFF), (t >> np.uint64(32))]
    words = [w.astype(np.uint32) for w in words]

    def key(salt):
        h = np.full(len(s), salt, dtype=np.uint32)
        for w in words:
            h = fmix((h ^ w) + np.uint32(0x9E3779B9))
        return h[:, None]

    with np.errstate(over="ignore"):
        k1, k2 = key(0x243F6A88), key(0x13198A2E)
        weyl = np.arange(vocab_size, dtype=np.uint32) * np.uint32(0x9E3779B9)
        h = fmix((weyl[None, :] + k1) ^ k2)
    return torch.from_numpy(((h >> np.uint32(8)) | np.uint32(1)).astype(np.float32) * np.float32(2.0**-24))


def random_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed, step, token index), on any device."""
    if seeds.device.type == "cpu":
        return _random_uniform_cpu(seeds, steps, vocab_size)
    return _random_uniform_tensor(seeds, steps, vocab_size)


def _random_uniform_tensor(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Device-side version: elementwise int64 tensor ops only (no host sync, capturable in a CUDA graph)."""
    k1 = _row_key(seeds, steps, 0x243F6A88)[:, None]   # two independent 32-bit keys: 64 bits per (seed, step)
    k2 = _row_key(seeds, steps, 0x13198A2E)[:, None]
    # SplitMix-style: a Weyl sequence over the token index, keyed per row, then one finalizer per element
    weyl = _mul32(torch.arange(vocab_size, device=seeds.device, dtype=torch.int64), 0x9E3779B9)
    h = _fmix32(((weyl + k1) & M32) ^ k2)
    # the top 23 bits as (2j + 1) / 2**24: exact in float32's 24-bit significand, never 0 or 1
    return ((h >> 8) | 1).float() * 2.0**-24


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits [B, V] float32 -> one token per row, plus logprobs for the batch's largest request."""
        logits = logits.float()
        x = apply_penalties(logits, batch)
        tokens = x.argmax(-1)
        if not batch.all_greedy:
            x = x / batch.temperature[:, None]
            if batch.use_top_k or batch.use_top_p:
                x = x.masked_fill(~top_k_top_p_mask(x, batch.top_k, batch.top_p), float("-inf"))
            # exponential race: argmax p / E with E = -log(u) ~ Exp(1) draws exactly from p (= Gumbel-max);
            # in log space, and x need not be normalized since argmax ignores a per-row shift
            u = random_uniform(batch.seeds, batch.steps, x.shape[-1])
            sampled = (x - torch.log(-torch.log(u))).argmax(-1)
            tokens = torch.where(batch.greedy, tokens, sampled)
        if batch.num_logprobs < 0:
            return SamplerOutput(tokens, None, None, None)
        raw = torch.log_softmax(logits, -1)
        chosen = raw.gather(1, tokens[:, None])[:, 0]
        if batch.num_logprobs == 0:
            return SamplerOutput(tokens, chosen, None, None)
        top = raw.topk(min(batch.num_logprobs, raw.shape[-1]), dim=-1)
        return SamplerOutput(tokens, chosen, top.indices, top.values)
