"""The offline entry point: `LLM(...).generate(prompts, SamplingParams(...))` over the batching engine."""

from __future__ import annotations

import os

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from engine.weights import DEFAULT_MODEL

class LLM:
    """`LLM("dir-or-hub-id", device="cpu", dtype="float32")`. The model directory (or hub snapshot) must hold
    one checkpoint format and tekken.json (weights.md). Engine limits (max_model_len, max_num_seqs,
    max_num_batched_tokens, kv_cache_memory, ...) are EngineConfig fields passed as keywords, among them
    `quantization="nf4"|"int8"|"fp8"` (decoder linears; nf4/int8 need the `quant` extra) and
    `kv_cache_dtype="fp8"` (weights.md, "Quantization")."""

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, device=None, dtype=None,
                 load_format: str = "auto", progress: bool = True, **engine_kwargs):
        self.engine = LLMEngine(model, device, dtype, load_format, progress, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer
        self.config = self.engine.model_config
        self.device, self.dtype = self.engine.device, self.engine.dtype

    @property
    def model(self):
        return self.engine.model

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Exact prompt ids of a chat (Workers AI / OpenAI message dicts), image placeholders expanded."""
        return self.tokenizer.encode_chat(messages, tools).token_ids

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 raw: bool = False) -> list[RequestOutput]:
        """prompts: a string (one user message, chat template applied; `raw=True` uses it verbatim), a list
        of message dicts (one chat), a list of token ids, or a list of any of these. All run together with
        continuous batching; outputs come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and
                                        isinstance(prompts[0], (dict, int))):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(self.engine.add_request(prompt, p or SamplingParams(), raw=raw))
        except BaseException:
            for rid in ids:
                self.engine.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[rid] for rid in ids]
