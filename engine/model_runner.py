"""Runs a scheduler step: inputs from the persistent InputBatch (engine/input_batch.py), the vision encoder,
the decoder, the sampler.

Owns the model, the KV pool (one tensor, allocated once and never reallocated while serving), the
attention backend (chosen once here, engine/layers/attention), the decode CUDA graphs and the sampler.
Images are encoded once, on the step that first reaches their placeholders; their embeddings stay on the
request until its prefill has passed them (a prompt may be prefilled in several chunks).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from engine.config import EngineConfig, ModelConfig
from engine.cuda_graph import DecodeGraphs
from engine.forward_context import ForwardContext
from engine.guided import apply_bitmask, fill_bitmask
from engine.input_batch import InputBatch
from engine.layers.attention import select_backend, set_backend
from engine.layers.quant_matmul import MAX_ROWS
from engine.models.mistral3 import Mistral3ForConditionalGeneration
from engine.prompt_logprobs import PromptLogprobs
from engine.quant import FP8
from engine.request import Request
from engine.sampler import SampledTokens, Sampler
from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)
CPU_DEFAULT_KV_BYTES = 2 * 2**30
GRAPH_MAX_BATCH = 128       # decode batches up to this size replay a CUDA graph; larger ones run eagerly


class ModelRunner:
    def __init__(self, model: Mistral3ForConditionalGeneration, config: EngineConfig, eos_id: int):
        self.model = model
        self.cfg: ModelConfig = model.cfg
        self.config = config
        self.eos_id = eos_id
        # the model dtype: decoder linears may be quantized, the embedding never is
        p = model.language_model.model.embed_tokens.weight
        self.device, self.dtype = p.device, p.dtype
        self.sampler = Sampler()
        self.inputs = InputBatch(config, self.cfg.text.vocab_size, self.device)   # persistent step inputs
        self.grammar_seconds, self.grammar_masks = 0.0, 0      # host time spent computing grammar masks
        self.failures: dict[str, str] = {}     # request id -> what failed in the last step's per-request work
        fp8_kv = config.kv_cache_dtype == "fp8"
        self.attention = select_backend(config.attention_backend, self.device, fp8_kv)
        set_backend(model, self.attention)
        t = self.cfg.text
        self.kv_dtype = FP8 if fp8_kv else self.dtype
        self.block_bytes = 2 * t.num_hidden_layers * config.block_size * t.num_key_value_heads * t.head_dim \
            * self.kv_dtype.itemsize
        if fp8_kv:     # + one float32 scale per (layer, K/V, block, KV head)
            self.block_bytes += 2 * t.num_hidden_layers * t.num_key_value_heads * 4
        reason = self._no_graphs_reason()
        if reason is not None and self.device.type == "cuda":
            log.info("CUDA graphs off: %s", reason)
        # With CUDA graphs the budget holds one more block than requests get: the scratch block, where the
        # padding rows of graph batches write (and read) their K/V
        self.num_blocks = self._kv_budget() // self.block_bytes - (reason is None)
        if self.num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (one block needs {self.block_bytes} bytes); "
                               "lower max_num_batched_tokens or raise gpu_memory_utilization / kv_cache_memory")
        self.scratch_block = self.num_blocks if reason is None else None
        self.kv_cache, self.kv_scales, self.kv_caches = self._allocate_pool(self.num_blocks + (reason is None))
        self.graphs = None if reason else self.make_graphs(capture=self.device.type == "cuda")

    def _allocate_pool(self, blocks: int):
        """[layers, 2, blocks, block_size, kv_heads, head_dim] (+ fp8 scales [layers, 2, blocks, kv_heads],
        zero: no block holds anything yet) and each layer's (k, v[, k_scale, v_scale]) views of it."""
        t = self.cfg.text
        cache = torch.empty((t.num_hidden_layers, 2, blocks, self.config.block_size, t.num_key_value_heads,
                             t.head_dim), dtype=self.kv_dtype, device=self.device)
        if self.config.kv_cache_dtype != "fp8":
            return cache, None, [(layer[0], layer[1]) for layer in cache]
        scales = torch.zeros((t.num_hidden_layers, 2, blocks, t.num_key_value_heads), dtype=torch.float32,
                             device=self.device)
        return cache, scales, [(kv[0], kv[1], sc[0], sc[1]) for kv, sc in zip(cache, scales)]

    def _no_graphs_reason(self) -> str | None:
        if self.device.type != "cuda":
            return "not a CUDA device"
        if self.config.enforce_eager:
            return "enforce_eager is set"
        if self.config.quantization == "int8":
            return "int8 weights: LLM.int8() picks outlier columns per batch (data-dependent shapes)"
        if not self.attention.graph_safe(self.config.kv_cache_dtype == "fp8"):
            return f"the {self.attention.name} attention backend cannot capture an fp8 KV cache's store"
        return None

    def make_graphs(self, capture: bool) -> DecodeGraphs:
        """Decode CUDA graphs over the ladder of batch sizes; `capture=False` (CPU tests, which let the runner
        use graphs there) runs them eagerly through the same static buffers and padding."""
        start = time.perf_counter()
        # nf4 batches above the Triton kernel's 64 rows go through bitsandbytes, which is not known to be
        # capturable: those batches stay eager
        limit = MAX_ROWS if self.config.quantization == "nf4" else GRAPH_MAX_BATCH
        graphs = DecodeGraphs(self.model, self.kv_caches, self.config.block_size, self.scratch_block,
                              self.config.max_model_len, min(self.config.max_num_seqs, limit), capture)
        if capture:
            log.info("captured decode CUDA graphs for batch sizes %s in %.1f s", graphs.sizes,
                     time.perf_counter() - start)
        return graphs

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.config.block_size

    def _kv_budget(self) -> int:
        if self.config.kv_cache_memory is not None:
            return self.config.kv_cache_memory
        if self.device.type != "cuda":
            return CPU_DEFAULT_KV_BYTES
        return self._profile_gpu()

    @torch.inference_mode()
    def _profile_gpu(self) -> int:
        """Free memory for the pool = utilization × total − (weights + the worst step's activations + what
        other processes hold). The worst step (`worst_step`) is a full token budget at the end of the
        context window, after one maximum-size image."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        free_before, total = torch.cuda.mem_get_info(self.device)
        side = self.cfg.vision.image_size
        image = torch.zeros(3, side, side, dtype=self.dtype, device=self.device)
        embeds = self.model.encode_images([image])[0]
        ids, positions, ctx = self.worst_step(embeds.shape[0])
        hidden = self.model(ids, positions, ctx, embeds[:ids.shape[0]])
        self.model.compute_logits(hidden[-min(ids.shape[0], self.config.max_num_seqs):]).float()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del image, embeds, ids, positions, ctx, hidden
        torch.cuda.empty_cache()
        used_by_others = total - free_before - torch.cuda.memory_reserved(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - peak - max(used_by_others, 0)
        log.info("GPU memory: total %.1f GiB, weights+peak activations %.1f GiB, KV pool %.1f GiB",
                 total / 2**30, peak / 2**30, budget / 2**30)
        return budget

    def worst_step(self, image_tokens: int) -> tuple[torch.Tensor, torch.Tensor, ForwardContext]:
        """The step with the largest activations: one sequence bringing a full chunk of
        max_num_batched_tokens tokens (the first `image_tokens` of them image placeholders) at the end of
        the context window, so attention reads a cached prefix of max_model_len - chunk tokens, whatever
        workspace that costs the backend (the reference one builds [heads, 1024, window] scores).

        The real pool does not exist yet (its size is what is being measured), and a window's worth of
        blocks would be as large as what is measured. So the step gets a temporary pool of just enough
        blocks for the chunk's own slots, shared by every layer, and its block table points the prefix's
        positions at those same blocks over and over: attention reads every position of the window
        (values are irrelevant: zeros) while the pool's memory stays a few MB, counted in the peak."""
        bs, window = self.config.block_size, self.config.max_model_len
        n = min(self.config.max_num_batched_tokens, window)
        start = window - n
        chunk_blocks = -(-window // bs) - start // bs          # logical blocks the chunk writes into
        t = self.cfg.text
        pool = torch.zeros((2, chunk_blocks, bs, t.num_key_value_heads, t.head_dim), dtype=self.kv_dtype,
                           device=self.device)
        layer = (pool[0], pool[1])
        if self.config.kv_cache_dtype == "fp8":
            scales = torch.zeros((2, chunk_blocks, t.num_key_value_heads), dtype=torch.float32, device=self.device)
            layer += (scales[0], scales[1])
        # logical block j -> physical j - start // bs for the chunk's blocks (distinct: the store needs
        # that), cycling over the same blocks for the prefix (only read)
        logical = torch.arange(-(-window // bs), device=self.device)
        table = ((logical - start // bs) % chunk_blocks).to(torch.int32)[None]
        pos = torch.arange(start, window, device=self.device)
        ctx = ForwardContext(
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([window], dtype=torch.int32, device=self.device),
            slot_mapping=table[0, pos // bs].long() * bs + pos % bs, block_tables=table,
            kv_caches=[layer] * t.num_hidden_layers, query_lens_cpu=[n], seq_lens_cpu=[window])
        ids = torch.full((n,), self.eos_id, dtype=torch.long, device=self.device)
        ids[:min(image_tokens, n)] = self.cfg.image_token_id
        return ids, pos, ctx

    # ---- one step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> SampledTokens | None:
        """Compute the step's tokens; sample one token for each request whose known tokens are now all
        cached (in `sched.scheduled` order, skipping those that only prefilled a chunk). Host work is
        O(tokens this step) (engine/input_batch.py); the results come back in one device->host copy."""
        self.failures = {}
        step = self.inputs.prepare(sched, self.kv_caches)
        if step is None:
            return None
        embeds = []
        for s in sched.scheduled:
            start = s.request.num_computed_tokens
            embeds += self._image_embeds(s.request, start, start + s.num_tokens)
        ctx, n = step.ctx, step.input_ids.shape[0]
        if self.graphs is not None and not embeds and n == ctx.num_seqs and self.graphs.fits(n):
            hidden = self.graphs.run(step.input_ids, step.positions, ctx.slot_mapping, ctx.seq_lens,
                                     ctx.block_tables)
        else:
            hidden = self.model(step.input_ids, step.positions, ctx, torch.cat(embeds) if embeds else None)
        prompt_logprobs = PromptLogprobs(self.model, sched, hidden)
        if not step.samplers:
            prompt_logprobs.store()
            return None
        logits = self.model.compute_logits(hidden[step.logits_rows]).float()
        guided = self._stage_grammar_masks(step.samplers, logits.shape[-1])
        batch = self.inputs.sampling_batch(step.samplers, self.eos_id, logits.shape[-1])  # flushes the masks too
        if guided is not None:
            apply_bitmask(logits, *guided)
        sampled = self.inputs.finish(self.sampler(logits, batch))
        prompt_logprobs.store()
        return sampled

    def _stage_grammar_masks(self, reqs: list[Request], vocab_size: int):
        """(rows, bitmask) device tensors for the guided requests, staged for the next flush; None if none.
        The masks are computed on the host while the device runs the forward pass queued before."""
        guided = [i for i, r in enumerate(reqs) if r.matcher is not None]
        if not guided:
            return None
        start = time.perf_counter()
        host, mask = self.inputs.staging.alloc((len(guided), (vocab_size + 31) // 32), torch.int32)
        errors: dict[int, Exception] = {}
        fill_bitmask([reqs[i].matcher for i in guided], vocab_size, out=host, errors=errors)
        for k, e in errors.items():         # that request alone ends, with this error (engine/engine_core.py)
            self.failures[reqs[guided[k]].request_id] = f"its grammar failed: {e!r}"
        self.grammar_seconds += time.perf_counter() - start
        self.grammar_masks += len(guided)
        return self.inputs.staging.put(guided, torch.int64), mask

    def _image_embeds(self, req: Request, start: int, end: int) -> list[torch.Tensor]:
        """Embedding rows for the [IMG] tokens among prompt positions [start, end), in order; encodes each
        image the first time a step reaches it and drops it once the prefill has passed its placeholders."""
        out = []
        for img in req.images:
            if img.end <= start or img.start >= end:
                continue
            lo, hi = np.searchsorted(img.img_positions, [start, end])
            if hi > lo:
                if img.embeds is None:
                    pixels = torch.from_numpy(img.pixels).to(self.device, self.dtype)
                    img.embeds = self.model.encode_images([pixels])[0]
                out.append(img.embeds[lo:hi])
            if end >= img.end:
                img.embeds = None
        return out
