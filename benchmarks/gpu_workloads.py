"""Workloads of the GPU check. They reach the engine only through its public entry points (`LLM`,
`LLMEngine.add_request/step/abort`, EngineConfig options as keywords, `load_format="dummy"`), so they keep
working while the engine's insides change.

Step times are host wall times around `LLMEngine.step()`, which returns only after the step's sampled
tokens reached the host: each is a whole step as a user sees it (scheduling, the forward pass, sampling).
"""

from __future__ import annotations

import gc
import json
import math
import time
import traceback
import weakref
from pathlib import Path

import numpy as np
import torch
from common import model_presets, random_prompts

now = time.perf_counter


# ---- models --------------------------------------------------------------------------------------------------
def model_dir(work: Path, preset: str) -> Path:
    """config.json + tekken.json of a preset: all that load_format='dummy' reads (written once per machine)."""
    from engine.tokenizer import write_tekken_v7
    d = work / f"model-{preset}"
    if not (d / "config.json").is_file():
        d.mkdir(parents=True, exist_ok=True)
        write_tekken_v7(d / "tekken.json")
        (d / "config.json").write_text(json.dumps(model_presets()[preset].to_hf_dict("4.50"), indent=2))
    return d


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]


def with_engine(model: Path, params, options: dict, work, **load) -> tuple[dict, str | None]:
    """Load our engine (dummy weights unless `load` says otherwise), call work(llm, out) to fill `out`, then
    free the engine and check it is gone: no closure, frame or traceback may keep its weights and KV pool
    alive into the next load. An exception is recorded with what `out` had so far."""
    from engine import LLM
    out: dict = {"options": dict(options)}
    load = {"device": params.device, "dtype": params.dtype, "load_format": "dummy", **load}
    llm, error = None, None
    try:
        t = now()
        llm = LLM(model, progress=False, enable_prefix_caching=False, **load, **options)
        sync(load["device"])
        out["load_s"] = now() - t
        work(llm, out)
    except Exception as e:        # recorded as this part's result; the caller goes on with the next part
        traceback.print_exc()
        error = describe(e)
    ref = weakref.ref(llm.engine) if llm is not None else None
    llm = None
    free_memory(load["device"])
    if ref is not None and ref() is not None:
        error = error or "the engine is still referenced after its work ended: its memory was not freed"
    return out, error


def decode_bytes_per_step(model) -> int:
    """Weight bytes a decode step reads: every decoder and lm_head tensor (quantized storage as stored);
    not the embedding (one row per token), the vision tower or the projector."""
    skip = ("vision_tower", "multi_modal_projector", "embed_tokens")
    return sum(p.nbytes for n, p in model.named_parameters() if not any(s in n for s in skip))


def kv_bytes_per_token(cfg, kv_cache_dtype: str, itemsize: int, block_size: int = 16) -> float:
    t = cfg.text
    per = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    if kv_cache_dtype == "fp8":          # + one float32 scale per (layer, K/V, block, KV head)
        return per + 2 * t.num_hidden_layers * t.num_key_value_heads * 4 / block_size
    return per * itemsize


def prefill_flops(cfg, length: int) -> float:
    """performance.md §1: 2 FLOPs per linear weight per token, causal attention 4·(heads·head_dim)·layers·L²/2,
    and the lm_head once (the prompt's last token)."""
    t = cfg.text
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_layer = t.hidden_size * (q + 2 * kv) + q * t.hidden_size + 3 * t.hidden_size * t.intermediate_size
    return (2.0 * per_layer * t.num_hidden_layers * length + 2.0 * q * t.num_hidden_layers * length ** 2
            + 2.0 * t.hidden_size * t.vocab_size)


# ---- decode ------------------------------------------------------------------------------------------------
def decode_prompt_seed(seed: int, batch: int) -> int:
    return seed + 1000 * batch


def decode_run(llm, batch: int, context: int, steps: int, chunk: int, seed: int) -> dict:
    """`batch` requests of `context` random prompt tokens, greedy, EOS ignored; times the decode-only steps
    (every request already has a token and every one gets one: no prefill mixed in). Each request runs
    long enough that at least `steps` such steps happen after the last prompt's prefill."""
    from engine import SamplingParams
    eng, cfg = llm.engine, llm.config
    prompts = random_prompts(batch, (context, context), cfg.text.vocab_size, decode_prompt_seed(seed, batch))
    prefill_steps = math.ceil(batch * context / max(1, chunk - batch))
    n = steps + prefill_steps + 2
    sp = SamplingParams(max_tokens=n, min_tokens=n, temperature=0.0, ignore_eos=True, seed=seed)
    ids = [eng.add_request(p, sp) for p in prompts]
    tokens = {rid: [] for rid in ids}
    times, kv_tokens = [], []
    start = now()
    while eng.has_unfinished():
        started = all(tokens[r] for r in ids)
        in_flight = sum(context + len(tokens[r]) for r in ids if len(tokens[r]) < n)
        t0 = now()
        outs = eng.step()
        dt = now() - t0
        for o in outs:
            tokens[o.request_id] += o.delta_token_ids
        if started and len(outs) == batch:
            times.append(dt)
            kv_tokens.append(in_flight)
    if not times:
        raise RuntimeError(f"batch {batch}: no decode-only step happened in {n} tokens per request")
    step = float(np.median(times))
    return {"batch": batch, "context": context, "decode_steps_timed": len(times), "step_ms": 1000 * step,
            "step_ms_p90": 1000 * float(np.percentile(times, 90)), "tok_s": batch / step,
            "kv_tokens_mean": float(np.mean(kv_tokens)), "wall_s": now() - start,
            "prompt_seed": decode_prompt_seed(seed, batch), "tokens_first": tokens[ids[0]]}


def decode_figures(prefix: str, run: dict, weight_bytes: int, kv_per_token: float, options: dict,
                   vs: tuple[str, str] | None = None) -> list[dict]:
    """tok/s, step time, and bytes moved per step (weights + the KV cache read) over the step time. `vs`:
    (figure name template with {b}, label): the tok/s ratio to that figure, named <prefix>_b<b>_vs_<label>."""
    b = run["batch"]
    gb_s = (weight_bytes + run["kv_tokens_mean"] * kv_per_token) / (run["step_ms"] / 1000) / 1e9
    run["gb_s"] = gb_s
    opts = {**options, "batch": b, "context": run["context"]}
    tok = {"name": f"{prefix}_b{b}_tok_s", "value": run["tok_s"], "unit": "tok/s", "ceiling": None,
           "options": opts}
    if vs:
        tok["vs"] = {"figure": vs[0].format(b=b), "name": f"{prefix}_b{b}_vs_{vs[1]}"}
    return [tok, {"name": f"{prefix}_b{b}_step_ms", "value": run["step_ms"], "unit": "ms", "ceiling": None,
                  "options": opts},
            {"name": f"{prefix}_b{b}_gb_s", "value": gb_s, "unit": "GB/s", "ceiling": "copy_gb_s", "options": opts}]


# ---- prefill -----------------------------------------------------------------------------------------------
def prefill_run(llm, length: int, seed: int) -> dict:
    """One prompt of `length` random tokens, one output token: time to first token, all prefill chunks."""
    from engine import SamplingParams
    eng = llm.engine
    prompt = random_prompts(1, (length, length), llm.config.text.vocab_size, seed + length)[0]
    sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    t0 = now()
    rid = eng.add_request(prompt, sp)
    steps = 0
    try:
        while eng.has_unfinished():
            eng.step()
            steps += 1
    except BaseException:
        eng.abort(rid)              # its blocks go back to the pool before the error is recorded
        raise
    ttft = now() - t0
    flops = prefill_flops(llm.config, length)
    return {"length": length, "ttft_s": ttft, "steps": steps, "flops": flops, "tflop_s": flops / ttft / 1e12}


# ---- transformers on the same dummy weights ------------------------------------------------------------------
def hf_dummy_model(model: Path, device, dtype: torch.dtype, attn: str = "sdpa", seed: int = 0):
    """transformers' Mistral3ForConditionalGeneration holding exactly the tensors load_format='dummy' gives our
    engine: built without weights (accelerate's init_empty_weights keeps the computed buffers, e.g. RoPE
    frequencies), then each parameter made on `device` from the same (seed, checkpoint name) generator."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, Mistral3ForConditionalGeneration

    from engine.config import load_config
    from engine.dummy_weights import checkpoint_tensors, dummy_tensor
    from engine.weights import _HF_PREFIXES
    config = AutoConfig.from_pretrained(model)
    with init_empty_weights():
        hf = Mistral3ForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation=attn)
    shapes = checkpoint_tensors(load_config(Path(model) / "config.json"), "hf")
    used = set()
    for name, p in list(hf.named_parameters()):
        # transformers >= 4.52 names (model.language_model.*) -> the 4.50 checkpoint keys the dummy tensors use
        key = next((old + name[len(new):] for new, old in _HF_PREFIXES if name.startswith(new)), name)
        if key not in shapes or tuple(shapes[key]) != tuple(p.shape) or key in used:
            raise RuntimeError(f"transformers parameter {name} {list(p.shape)} has no dummy checkpoint tensor")
        used.add(key)
        module_name, _, attr = name.rpartition(".")
        module = hf.get_submodule(module_name)
        module._parameters[attr] = torch.nn.Parameter(dummy_tensor(key, shapes[key], seed, device).to(dtype),
                                                      requires_grad=False)
    if unused := set(shapes) - used:
        raise RuntimeError(f"{len(unused)} dummy tensors have no transformers parameter, e.g. {sorted(unused)[:3]}")
    return hf.to(device).eval()
