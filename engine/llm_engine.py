"""The synchronous engine: requests in, one scheduler step at a time, outputs out.

Single-threaded by design: AsyncLLM runs it on its own thread and is the only caller while serving.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.block_manager import BlockManager, cdiv
from engine.config import EngineConfig
from engine.guided import TOOL_CALLS_ID, GrammarCompiler
from engine.image_processor import image_hash
from engine.model_runner import ModelRunner
from engine.outputs import OutputProcessor, RequestOutput, TokenLogprob, Usage
from engine.request import ImageInput, Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.tokenizer import EncodedPrompt, Tokenizer
from engine.weights import CheckpointError, load_model, resolve

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


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


class ContextWindowError(ValueError):
    """prompt tokens + max_tokens exceed the context window, or the request can never fit the KV pool."""

    def __init__(self, message: str, prompt_tokens: int, max_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit


class _HostSamples:
    """A step's sampler output as Python lists."""

    def __init__(self, out):
        self.token_ids = out.token_ids.tolist()
        self.logprobs = None if out.logprobs is None else out.logprobs.tolist()
        self.top_ids = None if out.top_ids is None else out.top_ids.tolist()
        self.top_logprobs = None if out.top_logprobs is None else out.top_logprobs.tolist()


@dataclass
class _Tracked:
    request: Request
    processor: OutputProcessor
    output: RequestOutput


class LLMEngine:
    def __init__(self, model: str | os.PathLike, device=None, dtype=None, load_format: str = "auto",
                 progress: bool = True, **engine_kwargs):
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        start = time.perf_counter()
        self.checkpoint = resolve(model, load_format)
        self.model_config = self.checkpoint.config()
        self.tokenizer = Tokenizer.from_model_dir(self.checkpoint.directory)
        if self.tokenizer.vocab_size != self.model_config.text.vocab_size:
            raise CheckpointError(f"{self.checkpoint.directory}: tekken.json has {self.tokenizer.vocab_size} "
                                  f"tokens but the model has vocab_size {self.model_config.text.vocab_size}")
        limit = self.model_config.text.max_position_embeddings
        self.config = EngineConfig(**engine_kwargs)
        if self.config.max_model_len > limit:
            raise ValueError(f"max_model_len {self.config.max_model_len} exceeds the model's {limit} positions")
        model = load_model(self.checkpoint, self.device, self.dtype, progress=progress,
                           quantization=self.config.quantization)
        self.runner = ModelRunner(model, self.config, self.tokenizer.eos_id)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(self.config.max_num_seqs, self.config.max_num_batched_tokens,
                                                   self.config.max_model_len), self.block_manager)
        self.requests: dict[str, _Tracked] = {}
        self._grammars: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self._ids = itertools.count()
        self.load_seconds = time.perf_counter() - start

    @property
    def model(self):
        return self.runner.model

    # ---- requests ----------------------------------------------------------------------------------------------
    def encode(self, prompt, raw: bool = False, tools: list[dict] | None = None) -> EncodedPrompt:
        """str: one user message through the chat template (raw=True: verbatim); a list of message dicts: a chat;
        an EncodedPrompt or a list of token ids: used as is."""
        if isinstance(prompt, EncodedPrompt):
            return prompt
        if isinstance(prompt, str):
            if raw:
                ids = self.tokenizer.encode_raw(prompt)
                if self.tokenizer.image_token_id in ids:
                    # raw text can name [IMG] but carries no pixels to fill it
                    raise ValueError("a raw prompt cannot contain [IMG] tokens: images need the chat format")
                return EncodedPrompt(ids)
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}], tools)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            return self.tokenizer.encode_chat(prompt, tools)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if self.tokenizer.image_token_id in prompt:
                raise ValueError("token-id prompts cannot contain [IMG] tokens: images need the chat format")
            return EncodedPrompt(list(prompt))
        raise TypeError("a prompt is a string, a list of message dicts, a list of token ids or an EncodedPrompt")

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    raw: bool = False, tools: list[dict] | None = None) -> str:
        """Queue a request; it joins the batch at the next step. Raises before queueing anything when the
        request can never run (ContextWindowError) or is malformed (ValueError)."""
        req = self.make_request(self.encode(prompt, raw, tools), params, request_id)
        self.submit(req)
        return req.request_id

    def make_request(self, enc: EncodedPrompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        """Validate and build a request without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        request_id = request_id or f"req-{next(self._ids)}"
        n, window = len(enc.token_ids), self.config.max_model_len
        if n == 0:
            raise ValueError("the prompt is empty")
        if n + params.max_tokens > window:
            raise ContextWindowError(
                f"The estimated number of input and maximum output tokens ({n + params.max_tokens}) exceeded "
                f"this model context window limit ({window}): {n} prompt tokens + max_tokens "
                f"{params.max_tokens}", n, params.max_tokens, window)
        need = cdiv(n + params.max_tokens, self.config.block_size)
        if need > self.block_manager.num_blocks:
            raise ContextWindowError(
                f"{n} prompt tokens + max_tokens {params.max_tokens} need {need} KV blocks but the whole cache "
                f"holds {self.block_manager.num_blocks} ({self.runner.capacity_tokens} tokens)",
                n, params.max_tokens, self.runner.capacity_tokens)
        return Request(request_id, list(enc.token_ids), params,
                       seed=params.seed if params.seed is not None else secrets.randbits(63),
                       images=self._image_inputs(enc), max_tokens=params.max_tokens,
                       matcher=self.grammars.matcher(params.grammar) if params.grammar else None)

    @property
    def grammars(self) -> GrammarCompiler:
        """Built on first use (about 2 s for the 131k vocabulary); safe to call from any thread."""
        with self._grammar_lock:
            if self._grammars is None:
                self._grammars = GrammarCompiler(self.tokenizer)
            return self._grammars

    def warm_grammars(self) -> threading.Thread:
        """Build the grammar compiler in the background now, so that the first constrained request does not
        wait for it."""
        thread = threading.Thread(target=lambda: self.grammars, name="grammar-warmup", daemon=True)
        thread.start()
        return thread

    def submit(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        p = req.params
        self.requests[req.request_id] = _Tracked(
            req, OutputProcessor(self.tokenizer, p.stop),
            RequestOutput(req.request_id, req.prompt_token_ids, logprobs=[] if p.logprobs is not None else None))
        self.scheduler.add(req)

    def _image_inputs(self, enc: EncodedPrompt) -> list[ImageInput]:
        ids = np.asarray(enc.token_ids)
        img_id, end_id = self.tokenizer.image_token_id, self.tokenizer.image_end_id
        starts = np.flatnonzero((ids == img_id) & np.r_[True, ids[:-1] != img_id] &
                                np.r_[True, ids[:-1] != self.tokenizer.image_break_id])
        ends = np.flatnonzero(ids == end_id) + 1
        if not (len(starts) == len(ends) == len(enc.images)):
            raise ValueError(f"prompt has {len(starts)} image placeholder spans for {len(enc.images)} images")
        out = []
        for pixels, s, e in zip(enc.images, starts, ends):
            positions = s + np.flatnonzero(ids[s:e] == img_id)
            m = self.model_config.image.token_pixels
            if len(positions) != (pixels.shape[1] // m) * (pixels.shape[2] // m):
                raise ValueError("image placeholder count does not match the image size")
            out.append(ImageInput(pixels, image_hash(pixels), int(s), int(e), positions))
        return out

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its blocks are released at once. Unknown or finished ids are ignored."""
        tracked = self.requests.get(request_id)
        if tracked is None:
            return None
        self._finish(tracked, "cancelled")
        return self.requests.pop(request_id).output

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping ----------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of requests that produced tokens or finished in it.
        Finished requests are forgotten after being returned."""
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return []
        sampled = self.runner.execute(sched)
        if sampled is not None:     # one device->host copy per step, not one per request
            sampled = _HostSamples(sampled)
        changed = []
        row = 0
        for s in sched.scheduled:
            req, samples = s.request, s.samples
            req.num_computed_tokens += s.num_tokens
            self.block_manager.cache_full_blocks(req, req.num_computed_tokens)
            if not samples:
                continue
            tracked = self.requests[req.request_id]
            self._append(tracked, sampled, row)
            row += 1
            changed.append(tracked.output)
        for out in changed:
            if out.finished:
                del self.requests[out.request_id]
        return changed

    def _append(self, tracked: _Tracked, sampled, row: int) -> None:
        req, out, p = tracked.request, tracked.output, tracked.request.params
        token = sampled.token_ids[row]
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_token_ids.append(token)
        out.delta_text, out.delta_token_ids, out.delta_logprobs = "", [token], []
        out.token_ids.append(token)
        if p.logprobs is not None:
            top = [] if not p.logprobs else \
                list(zip(sampled.top_ids[row][:p.logprobs], sampled.top_logprobs[row][:p.logprobs]))
            lp = TokenLogprob(token, sampled.logprobs[row], top)
            out.logprobs.append(lp)
            out.delta_logprobs = [lp]
        grammar_done = False
        if req.matcher is not None:
            if not req.matcher.consume_token(token):
                raise RuntimeError(f"{req.request_id}: sampled token {token} violates the grammar "
                                   f"({req.matcher.get_error()})")
            grammar_done = req.matcher.is_stopped()
        if token == TOOL_CALLS_ID and out.tool_calls_offset is None:
            out.tool_calls_offset = tracked.processor.text_length
        is_eos = token == self.tokenizer.eos_id and not p.ignore_eos
        text, stopped = ("", False) if is_eos else tracked.processor.push(token)
        out.delta_text = text
        out.text += text
        out.usage = Usage(req.num_prompt_tokens, len(req.output_token_ids), req.num_cached_tokens)
        if stopped:
            self._finish(tracked, "stop", flush=False)     # the text was cut where the stop string begins
        elif is_eos or token in p.stop_token_ids or grammar_done:
            self._finish(tracked, "stop")
        elif len(req.output_token_ids) >= req.max_tokens:
            self._finish(tracked, "length")

    def _finish(self, tracked: _Tracked, reason: str, flush: bool = True) -> None:
        req, out = tracked.request, tracked.output
        if flush:
            rest = tracked.processor.finish()
            out.delta_text += rest
            out.text += rest
        self.scheduler.finish(req, reason)
        out.finish_reason = reason
        out.usage = Usage(req.num_prompt_tokens, len(req.output_token_ids), req.num_cached_tokens)

    def check_integrity(self) -> None:
        self.block_manager.check_integrity(self.scheduler.running + list(self.scheduler.waiting))
        if not self.scheduler.has_unfinished():
            assert self.block_manager.num_free_blocks == self.block_manager.num_blocks, "blocks leaked"
