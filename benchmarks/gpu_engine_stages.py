"""Stages 4-7 of the GPU check: our engine at the real 24B shapes on dummy weights made on the device
(decode, prefill, quantization modes), then transformers `generate` on the same weights in its own process.
Conventions as in gpu_stages.py.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from common import model_presets, random_prompts
from gpu_stages import QUANT_MODES, StageContext, _status
from gpu_workloads import (
    decode_bytes_per_step,
    decode_figures,
    decode_prompt_seed,
    decode_run,
    hf_dummy_model,
    kv_bytes_per_token,
    model_dir,
    prefill_run,
    sync,
    with_engine,
)

BLOCK = 16          # the engine's default block size, which these stages keep


def _decode_options(p, batches, **extra) -> dict:
    """Engine options sized for `batches` at p.context: a window just large enough (CUDA-graph decode
    attention is sized from it) and an explicit KV pool (no profiling pass)."""
    cfg = model_presets()[p.preset]
    longest = p.context + p.decode_steps + math.ceil(max(batches) * p.context / (p.chunk - max(batches))) + 2
    window = -(-longest // BLOCK) * BLOCK
    itemsize = 1 if extra.get("kv_cache_dtype") == "fp8" else getattr(torch, p.dtype).itemsize
    per_seq = window * kv_bytes_per_token(cfg, extra.get("kv_cache_dtype", "auto"), itemsize, BLOCK)
    return {"max_model_len": window, "max_num_seqs": max(batches), "max_num_batched_tokens": p.chunk,
            "kv_cache_memory": int(max(batches) * per_seq * 1.05) + 2**20, **extra}


def _decode_batches(ctx: StageContext, prefix: str, batches, options: dict, vs=None, **load):
    """One engine, a decode run per batch size, figures after each (partial results survive)."""
    p = ctx.params
    runs = ctx.details.setdefault(prefix, {"options": options, "runs": []})

    def work(llm, out):
        itemsize = llm.dtype.itemsize
        per_token = kv_bytes_per_token(llm.config, options.get("kv_cache_dtype", "auto"), itemsize, BLOCK)
        weights = decode_bytes_per_step(llm.model)
        runs.update(load_s=out["load_s"], weight_bytes_per_step=weights, kv_bytes_per_token=per_token)
        for b in batches:
            r = decode_run(llm, b, p.context, p.decode_steps, p.chunk, p.seed)
            runs["runs"].append(r)
            ctx.figures += decode_figures(prefix, r, weights, per_token, options, vs)
            ctx.save()

    _, err = with_engine_dummy(ctx, options, work, **load)
    runs["error"] = err
    ctx.save()
    return err


def with_engine_dummy(ctx: StageContext, options: dict, work, **load):
    return with_engine(model_dir(ctx.work, ctx.params.preset), ctx.params, options, work, **load)


# ---- 4: decode, bf16 ----------------------------------------------------------------------------------------
def stage_decode(ctx: StageContext):
    options = _decode_options(ctx.params, ctx.params.batches, enforce_eager=False)
    err = _decode_batches(ctx, "decode", ctx.params.batches, options, vs=("hf_b{b}_tok_s", "hf"))
    return _status([err] if err else [])


# ---- 5: prefill ------------------------------------------------------------------------------------------------
def stage_prefill(ctx: StageContext):
    """A warm-up prompt, the 8k prompt (FLOP rate vs the matmul ceiling), then the long prompts: the first
    always, each later one only if T(L) = a·L + b·L², fitted to what was measured, says it ends before the
    stage's budget runs out. An out-of-memory ends the series and is recorded."""
    p = ctx.params
    longest = max(p.long_lens)
    cfg = model_presets()[p.preset]
    itemsize = getattr(torch, p.dtype).itemsize
    options = {"max_model_len": longest + 1, "max_num_seqs": 1, "max_num_batched_tokens": p.chunk,
               "kv_cache_memory": int((longest + 2 * BLOCK) * kv_bytes_per_token(cfg, "auto", itemsize, BLOCK))}
    runs = ctx.details.setdefault("runs", [])
    ctx.details["options"] = options
    errors = []

    def add(r: dict, opts: dict) -> None:
        runs.append(r)
        L = r["length"]
        ctx.figure(f"prefill_{L}_ttft_s", r["ttft_s"], "s", length=L, **opts)
        ctx.figure(f"prefill_{L}_tflop_s", r["tflop_s"], "TFLOP/s", "matmul_tflop_s", length=L, **opts)
        ctx.save()

    def work(llm, out):
        ctx.details["load_s"] = out["load_s"]
        ctx.details["warmup"] = prefill_run(llm, p.warmup_len, p.seed)
        opts = {"chunk": p.chunk}
        add(prefill_run(llm, p.prefill_len, p.seed), opts)
        for i, L in enumerate(p.long_lens):
            if i:
                predicted = _predict(runs, L)
                if predicted > ctx.time_left():
                    ctx.details["skipped"] = {"length": L, "predicted_s": predicted, "time_left_s": ctx.time_left()}
                    ctx.save()
                    return
            try:
                add(prefill_run(llm, L, p.seed), opts)
            except torch.cuda.OutOfMemoryError as e:
                runs.append({"length": L, "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"})
                errors.append(runs[-1]["error"])
                ctx.save()
                return

    _, err = with_engine_dummy(ctx, options, work)
    return _status(errors + ([err] if err else []))


def _predict(runs: list[dict], length: int) -> float:
    """Seconds for a prompt of `length` from the measured ones: linear layers grow with L, attention with L²."""
    pts = [(r["length"], r["ttft_s"]) for r in runs if "ttft_s" in r]
    (l0, t0), (l1, t1) = pts[-2], pts[-1]
    b = max(0.0, (t1 / l1 - t0 / l0) / (l1 - l0))
    a = max(0.0, t1 / l1 - b * l1)
    return a * length + b * length ** 2


# ---- 6: quantization modes ------------------------------------------------------------------------------------
def stage_quant(ctx: StageContext):
    """Each mode in its own engine, freed before the next loads. CUDA graphs wherever the engine allows them
    (not int8, which the engine runs eagerly); the options are recorded with every figure."""
    errors = []
    for mode in ctx.params.quant_modes:
        q, kv = QUANT_MODES[mode]
        options = _decode_options(ctx.params, ctx.params.quant_batches, quantization=q, kv_cache_dtype=kv,
                                  enforce_eager=q == "int8")
        err = _decode_batches(ctx, f"quant_{mode}", ctx.params.quant_batches, options,
                              vs=("decode_b{b}_tok_s", "bf16"))
        if err:
            errors.append(f"{mode}: {err}")
    return _status(errors)


# ---- 7: transformers generate, same weights -------------------------------------------------------------------
def stage_hf(ctx: StageContext):
    """Mistral3ForConditionalGeneration.generate (sdpa attention, no compile, dynamic cache), batch 1, on the
    decode stage's batch-1 prompt and the same dummy weights; our engine ran in an earlier process, which has
    exited. Its greedy tokens are compared with ours from the decode stage (measured, not asserted)."""
    from bench_offline import hf_generate

    from engine.config import load_config
    p = ctx.params
    d = model_dir(ctx.work, p.preset)
    cfg = load_config(d / "config.json")
    dtype, dev = getattr(torch, p.dtype), torch.device(p.device)
    t = time.perf_counter()
    model = hf_dummy_model(d, dev, dtype, "sdpa", p.seed)
    sync(dev)
    ctx.details["load_s"] = time.perf_counter() - t
    prompt = random_prompts(1, (p.context, p.context), cfg.text.vocab_size, decode_prompt_seed(p.seed, 1))[0]
    hf_generate(model, [prompt[:32]], 2, cfg.eos_token_id, dev)          # warm-up: kernels, allocator
    t0 = time.perf_counter()
    tokens, times = hf_generate(model, [prompt], p.hf_new_tokens, cfg.eos_token_id, dev)
    steps = np.diff(times)
    step = float(np.median(steps))
    weights = decode_bytes_per_step(model)
    per_token = kv_bytes_per_token(cfg, "auto", dtype.itemsize, 1)
    gb_s = (weights + (p.context + p.hf_new_tokens / 2) * per_token) / step / 1e9
    opts = {"attn_implementation": "sdpa", "compile": False, "batch": 1, "context": p.context,
            "new_tokens": p.hf_new_tokens}
    ctx.details.update(ttft_s=times[0] - t0, step_ms=1000 * step, step_ms_p90=1000 * float(np.percentile(steps, 90)),
                       tok_s=1 / step, gb_s=gb_s, weight_bytes_per_step=weights, options=opts)
    ctx.figure("hf_b1_tok_s", 1 / step, "tok/s", **opts)
    ctx.figure("hf_b1_step_ms", 1000 * step, "ms", **opts)
    ctx.figure("hf_b1_gb_s", gb_s, "GB/s", "copy_gb_s", **opts)
    ctx.figure("hf_b1_ttft_s", times[0] - t0, "s", **opts)
    ours = next((r for r in ctx.stage_details("decode").get("decode", {}).get("runs", []) if r["batch"] == 1), None)
    if ours is not None and ours["prompt_seed"] == decode_prompt_seed(p.seed, 1):
        a, b = ours["tokens_first"][:len(tokens[0])], tokens[0][:len(ours["tokens_first"])]
        prefix = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
        ctx.details["greedy_vs_ours"] = {"compared": len(a), "common_prefix": prefix,
                                         "same_position": sum(x == y for x, y in zip(a, b))}
        ctx.figure("hf_vs_ours_greedy_common_prefix", prefix, "tokens", compared=len(a))
    ctx.save()
    return "ok", None
