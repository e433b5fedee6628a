"""The synchronous engine: requests in, one scheduler step at a time, outputs out.

A facade over vLLM v1's split: engine/input_processor.py (prompt -> Request; thread-safe), engine/engine_core.py
(the step loop over token ids) and engine/output_processor.py (token ids -> text and RequestOutputs). Apart
from `process` (and `encode`, `make_request`, `grammars`), it is single-threaded by design: AsyncLLM runs it on
its own thread and is the only caller while serving.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future

import torch

from engine.config import EngineConfig
from engine.engine_core import EngineCore
from engine.guided import GrammarCompiler
from engine.input_processor import ContextWindowError  # noqa: F401 - re-exported: callers catch it from here
from engine.input_processor import InputProcessor
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.request import Request
from engine.sampling_params import SamplingParams
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


class LLMEngine:
    """The engine as one object: input processing -> engine core -> output processing.

    `add_request` runs the input processor on the caller's thread; `step` runs one core step and turns its
    sampled ids into RequestOutputs. `runner`, `block_manager`, `scheduler` are the core's (tests, metrics and
    benchmarks read them)."""

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
        runner = ModelRunner(model, self.config, self.tokenizer.eos_id)
        self.core = EngineCore(self.config, runner, self.tokenizer.eos_id)
        self.input_processor = InputProcessor(self.tokenizer, self.config, runner.num_blocks,
                                              self.model_config.image)
        self.output_processor = OutputProcessor(self.tokenizer)
        self.load_seconds = time.perf_counter() - start

    runner = property(lambda self: self.core.runner)
    block_manager = property(lambda self: self.core.block_manager)
    scheduler = property(lambda self: self.core.scheduler)
    model = property(lambda self: self.core.runner.model)

    # ---- requests (input processing: any thread) ---------------------------------------------------------------
    def process(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                raw: bool = False, tools: list[dict] | None = None) -> Request:
        """All the CPU work of a request, without touching engine state (safe from any thread)."""
        return self.input_processor.process(prompt, params, request_id, raw, tools)

    def encode(self, prompt, raw: bool = False, tools: list[dict] | None = None) -> EncodedPrompt:
        return self.input_processor.encode(prompt, raw, tools)

    def make_request(self, enc: EncodedPrompt, params: SamplingParams | None = None,
                     request_id: str | None = None) -> Request:
        return self.input_processor.make_request(enc, params, request_id)

    @property
    def grammars(self) -> GrammarCompiler:
        return self.input_processor.grammars

    def warm_grammars(self) -> Future:
        return self.input_processor.warm_grammars()

    # ---- requests (the engine's thread) ------------------------------------------------------------------------
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    raw: bool = False, tools: list[dict] | None = None) -> str:
        """Queue a request; it joins the batch at the next step. Raises before queueing anything when the
        request can never run (ContextWindowError) or is malformed (ValueError)."""
        req = self.process(prompt, params, request_id, raw, tools)
        self.submit(req)
        return req.request_id

    def submit(self, req: Request) -> None:
        """Queue a request built by `process`."""
        self.core.add(req)
        self.output_processor.add(req)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; its blocks are released at once. Unknown or finished ids are ignored."""
        req = self.core.finish(request_id, "cancelled")
        if req is None:
            return None
        return self.output_processor.abort(request_id, req.num_cached_tokens)

    def has_unfinished(self) -> bool:
        return self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; returns the outputs of requests that produced tokens or finished in it.
        Finished requests are forgotten after being returned."""
        outputs, stopped = self.output_processor.process(self.core.step())
        for request_id in stopped:
            self.core.finish(request_id, "stop")
        return outputs

    def check_integrity(self) -> None:
        sched = self.scheduler
        self.block_manager.check_integrity(sched.running + list(sched.waiting))
        if not sched.has_unfinished():
            assert self.block_manager.num_free_blocks == self.block_manager.num_blocks, "blocks leaked"
            assert not self.core.requests and not self.output_processor.states, "requests leaked"
