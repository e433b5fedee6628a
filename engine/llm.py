"""The offline entry point: load a checkpoint, encode prompts exactly as mistral-common does, generate.

`generate` here runs a batch of prompts to completion over the paged KV layout (one flat prefill step, then
one decode step per token for the unfinished sequences). Continuous batching, prefix caching and the full
sampler belong to the scheduler; this loop is the smallest correct user of the same model interface.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch

from engine.forward_context import ForwardContext
from engine.sampling_params import SamplingParams
from engine.tokenizer import EncodedPrompt, IncrementalDetokenizer, Tokenizer
from engine.weights import DEFAULT_MODEL, CheckpointError, load_model, resolve

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
BLOCK_SIZE = 16


def resolve_device_dtype(device: str | torch.device | None, dtype: str | torch.dtype | None):
    """Defaults: the GPU when there is one, in bfloat16; else the CPU in float32. Nothing is changed behind
    the caller's back: an explicit choice is used as given or refused."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA device")
    if dtype in (None, "auto"):
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
        dtype = _DTYPES[dtype]
    return device, dtype


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None      # "stop" (EOS) or "length" (max_tokens / context window)

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_token_ids), len(self.token_ids))


class LLM:
    """`LLM("dir-or-hub-id", device="cpu", dtype="float32")`. The model directory (or hub snapshot) must hold
    one checkpoint format and tekken.json; see weights.md."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None,
                 load_format: str = "auto", max_model_len: int | None = None, progress: bool = True):
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        start = time.perf_counter()
        self.checkpoint = resolve(model, load_format)
        self.config = self.checkpoint.config()
        self.tokenizer = Tokenizer.from_model_dir(self.checkpoint.directory)
        if self.tokenizer.vocab_size != self.config.text.vocab_size:
            raise CheckpointError(f"{self.checkpoint.directory}: tekken.json has {self.tokenizer.vocab_size} "
                                  f"tokens but the model has vocab_size {self.config.text.vocab_size}")
        self.model = load_model(self.checkpoint, self.device, self.dtype, progress=progress)
        limit = self.config.text.max_position_embeddings
        self.max_model_len = min(max_model_len or limit, limit)
        log.info("loaded %s (%s format) on %s as %s in %.1f s", self.checkpoint.directory, self.checkpoint.format,
                 self.device, str(self.dtype).removeprefix("torch."), time.perf_counter() - start)

    # ---- prompts ---------------------------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Exact prompt ids of a chat (Workers AI / OpenAI message dicts), image placeholders expanded."""
        return self.tokenizer.encode_chat(messages, tools).token_ids

    def _encode(self, prompt, raw: bool) -> EncodedPrompt:
        if isinstance(prompt, str):
            if raw:
                ids = self.tokenizer.encode_raw(prompt)
                if self.tokenizer.image_token_id in ids:
                    # raw text can name [IMG] but carries no pixels to fill it
                    raise ValueError("a raw prompt cannot contain [IMG] tokens: images need the chat format")
                return EncodedPrompt(ids)
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt)
        raise TypeError("a prompt is a string or a list of message dicts")

    # ---- generation --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts, sampling_params: SamplingParams | None = None, raw: bool = False
                 ) -> list[RequestOutput]:
        """prompts: a string (one user message, chat template applied; `raw=True` uses it verbatim), a list
        of message dicts (one chat), or a list of either."""
        params = sampling_params or SamplingParams()
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        encoded = [self._encode(p, raw) for p in prompts]
        for e in encoded:
            if len(e.token_ids) >= self.max_model_len:
                raise ValueError(f"prompt has {len(e.token_ids)} tokens; the context window is "
                                 f"{self.max_model_len}")
        outs = [RequestOutput(e.token_ids) for e in encoded]
        budgets = [min(params.max_tokens, self.max_model_len - len(e.token_ids)) for e in encoded]
        blocks_per_seq = [-(-(len(e.token_ids) + b) // BLOCK_SIZE) for e, b in zip(encoded, budgets)]
        caches = self._allocate_cache(sum(blocks_per_seq))
        first = torch.tensor([0] + blocks_per_seq).cumsum(0)
        tables = [torch.arange(first[i], first[i + 1], dtype=torch.int32) for i in range(len(encoded))]
        gens = [self._generator(params, i) for i in range(len(encoded))]
        image_embeds = self._encode_images([img for e in encoded for img in e.images])

        # one prefill step over all prompts, then decode steps for the sequences still running
        active = list(range(len(encoded)))
        step_ids = [e.token_ids for e in encoded]
        while active:
            ctx, positions = self._context(active, step_ids, outs, tables, caches)
            ids = torch.tensor([t for i in active for t in step_ids[i]], device=self.device)
            hidden = self.model(ids, positions, ctx, image_embeds)
            image_embeds = None
            last = ctx.cu_seqlens_q[1:].long() - 1
            logits = self.model.compute_logits(hidden[last]).float()
            still = []
            for row, i in enumerate(active):
                tok = self._sample(logits[row], params, gens[i])
                outs[i].token_ids.append(tok)
                if tok == self.tokenizer.eos_id and not params.ignore_eos:
                    outs[i].finish_reason = "stop"
                elif len(outs[i].token_ids) >= budgets[i]:
                    outs[i].finish_reason = "length"
                else:
                    still.append(i)
                step_ids[i] = [tok]
            active = still
        for o in outs:
            detok = IncrementalDetokenizer(self.tokenizer)
            o.text = "".join(detok.push(t) for t in o.token_ids if t != self.tokenizer.eos_id) + detok.flush()
        return outs

    def _allocate_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.config.text
        shape = (num_blocks, BLOCK_SIZE, t.num_key_value_heads, t.head_dim)
        return [(torch.empty(shape, dtype=self.dtype, device=self.device),
                 torch.empty(shape, dtype=self.dtype, device=self.device)) for _ in range(t.num_hidden_layers)]

    def _context(self, active, step_ids, outs, tables, caches):
        qlens = [len(step_ids[i]) for i in active]
        # cached tokens + this step's: the prompt and every token generated so far (the last one is new)
        slens = [len(outs[i].prompt_token_ids) + len(outs[i].token_ids) for i in active]
        positions = torch.cat([torch.arange(s - q, s) for q, s in zip(qlens, slens)])
        slots = torch.cat([tables[i].long()[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
                           for i, p in zip(active, positions.split(qlens))])
        width = max(len(tables[i]) for i in active)
        block_tables = torch.zeros(len(active), width, dtype=torch.int32)
        for row, i in enumerate(active):
            block_tables[row, :len(tables[i])] = tables[i]
        dev = self.device
        ctx = ForwardContext(
            cu_seqlens_q=torch.tensor([0] + qlens).cumsum(0).to(dev, torch.int32),
            seq_lens=torch.tensor(slens, dtype=torch.int32, device=dev), slot_mapping=slots.to(dev),
            block_tables=block_tables.to(dev), kv_caches=caches, query_lens_cpu=qlens, seq_lens_cpu=slens)
        return ctx, positions.to(dev)

    def _encode_images(self, images) -> torch.Tensor | None:
        if not images:
            return None
        pixels = [torch.from_numpy(img).to(self.device, self.dtype) for img in images]
        return torch.cat(self.model.encode_images(pixels))

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        if params.greedy:
            return None
        g = torch.Generator(device=self.device)
        g.manual_seed(params.seed + index if params.seed is not None else torch.seed())
        return g

    @staticmethod
    def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
        if gen is None:
            return int(logits.argmax())
        logits = logits / params.temperature
        if params.top_k > 0:
            kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if params.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the top token)
            drop = sorted_p.cumsum(0) - sorted_p >= params.top_p
            probs = probs.scatter(0, order, sorted_p.masked_fill(drop, 0.0))
        return int(torch.multinomial(probs, 1, generator=gen))
