"""Quantization: quality, memory and (on a GPU) decode speed of nf4 / int8 / fp8 weights and the fp8 KV cache
against the full-precision model on the same random weights.

Quality (any device), on a seeded set of token-id prompts:
- logits at every position of prompt + the reference's 32 greedy tokens, run through the paged KV cache
  in uneven chunks (7 tokens a step, so fp8 KV blocks fill over several steps): relative distance
  ||L - L_ref|| / ||L_ref|| (Frobenius, all positions) and top-1 agreement at every position;
- greedy agreement over 32 tokens: teacher-forced (top-1 at the 32 continuation positions given the
  reference's tokens), free-running (same token at the same position) and the prefix before the first
  divergence, each as a fraction of 32.
Memory: weight bytes of each mode on the loaded model, and for the real 24B shapes (computed on the meta
device); KV bytes per token.
Speed (--speed; on by default with CUDA): decode tokens/s of each mode vs the reference at the preset's
shapes with random weights (no checkpoint needed: `--preset full` is the real 24B model, which fits an H200
in bf16), batch sizes --batch-sizes, context --context; one step = forward + logits + argmax.

    python benchmarks/bench_quant.py --preset tiny                      # CPU: quality + memory, ~1 min
    python benchmarks/bench_quant.py --preset small                     # hidden 512, 4 layers
    python benchmarks/bench_quant.py --preset full --device cuda --no-quality --speed   # H100/H200
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import (RESULTS_DIR, format_table, model_presets, model_summary, random_prompts,  # noqa: E402
                               result_path, run_metadata, write_json)

# name -> (quantization, kv_cache_dtype, kernel). kernel None: the engine's default (on CUDA, decode batches
# of nf4/fp8 through our Triton kernels); "library": bitsandbytes' own nf4 path, to compare; "w8a8": every
# fp8 matmul through torch._scaled_mm with fp8 activations (the prefill path; on CPU too, to check its math).
MODES = {"ref": (None, "auto", None), "nf4": ("nf4", "auto", None), "nf4-bnb": ("nf4", "auto", "library"),
         "int8": ("int8", "auto", None), "fp8": ("fp8", "auto", None), "fp8-w8a8": ("fp8", "auto", "w8a8"),
         "kv-fp8": (None, "fp8", None), "nf4+kv-fp8": ("nf4", "fp8", None)}
CHUNK = 7


@torch.inference_mode()
def paged_logits(llm, ids: list[int], chunk: int = CHUNK) -> torch.Tensor:
    """Float32 logits at every position of one sequence, run through the engine's paged KV pool `chunk`
    tokens per step. Uses the pool's first blocks directly: call it only on an idle engine without prefix
    caching (cached blocks would be overwritten)."""
    from engine.forward_context import ForwardContext
    runner, model = llm.engine.runner, llm.model
    dev, bs, n = runner.device, runner.config.block_size, len(ids)
    assert -(-n // bs) <= runner.num_blocks, "KV pool too small for this sequence"
    table = torch.arange(-(-n // bs), dtype=torch.int32, device=dev)[None]
    out = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        ctx = ForwardContext(cu_seqlens_q=torch.tensor([0, end - start], dtype=torch.int32, device=dev),
                             seq_lens=torch.tensor([end], dtype=torch.int32, device=dev),
                             slot_mapping=torch.arange(start, end, device=dev), block_tables=table,
                             kv_caches=runner.kv_caches, query_lens_cpu=[end - start], seq_lens_cpu=[end])
        h = model(torch.tensor(ids[start:end], device=dev), torch.arange(start, end, device=dev), ctx)
        out.append(model.compute_logits(h).float())
    return torch.cat(out)


def load(ckpt, mode: str, device, dtype, **kw):
    from engine import LLM
    q, kv, _ = MODES[mode]
    llm = LLM(ckpt, device=device, dtype=dtype, progress=False, quantization=q, kv_cache_dtype=kv,
              enable_prefix_caching=False, **kw)
    set_mode_kernel(llm.model, mode)
    return llm


def set_mode_kernel(model, mode: str) -> None:
    from engine.quant import quantized_linears, set_kernel
    kernel = MODES[mode][2]
    if kernel == "library":
        set_kernel(model, "library")
    elif kernel == "w8a8":      # torch implements _scaled_mm on CPU too: the Hopper path's math, off the GPU
        set_kernel(model, "library")
        for m in quantized_linears(model).values():
            if m.method.name == "fp8":
                m.use_scaled_mm = True


def quality(ckpt, modes, device, dtype, prompts, gen_len: int) -> dict:
    from engine import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True)
    kw = {"max_model_len": 1024, "kv_cache_memory": 64 * 2**20}
    ref = load(ckpt, "ref", device, dtype, **kw)
    ref_gen = [o.token_ids for o in ref.generate(prompts, params)]
    ref_logits = [paged_logits(ref, p + g) for p, g in zip(prompts, ref_gen)]
    out = {"ref": {"weights_bytes": sum(p.nbytes for p in ref.model.parameters()),
                   "kv_bytes_per_block": ref.engine.runner.block_bytes}}
    del ref
    for mode in modes:
        if mode == "ref":
            continue
        start = time.perf_counter()
        llm = load(ckpt, mode, device, dtype, **kw)
        load_s = time.perf_counter() - start
        gen = [o.token_ids for o in llm.generate(prompts, params)]
        num = den = top1 = positions = forced = 0.0
        for p, g, r in zip(prompts, ref_gen, ref_logits):
            lg = paged_logits(llm, p + g)
            num += float((lg - r).pow(2).sum())
            den += float(r.pow(2).sum())
            top1 += float((lg.argmax(-1) == r.argmax(-1)).sum())
            positions += len(lg)
            # position len(p)-1+j predicts continuation token j
            forced += float((lg[len(p) - 1:len(p) - 1 + gen_len].argmax(-1).cpu() == torch.tensor(g)).sum())
        n = len(prompts) * gen_len
        prefix = [next((j for j, (a, b) in enumerate(zip(x, y)) if a != b), gen_len)
                  for x, y in zip(gen, ref_gen)]
        same = sum(a == b for x, y in zip(gen, ref_gen) for a, b in zip(x, y))
        out[mode] = {"rel_logits_error": (num / den) ** 0.5, "top1_all_positions": top1 / positions,
                     "greedy_teacher_forced": forced / n,
                     "greedy_free_running": same / n, "greedy_prefix": sum(prefix) / n,
                     "weights_bytes": sum(p.nbytes for p in llm.model.parameters()),
                     "kv_bytes_per_block": llm.engine.runner.block_bytes, "load_s": load_s}
        del llm
        gc.collect()
    return out


def memory_24b() -> dict:
    """Weight bytes of each mode at the real shapes (exact: the quantized storage, allocated on meta)."""
    from engine.config import ModelConfig
    from engine.weights import materialize
    out = {}
    for q in (None, "nf4", "int8", "fp8"):
        m = materialize(ModelConfig(), "meta", torch.bfloat16, q)
        out[q or "bf16"] = sum(p.nbytes for p in m.parameters())
    t = ModelConfig().text
    per_token = 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim
    out["kv_per_token_bf16"] = per_token * 2
    # + one float32 scale per (layer, K/V, KV head) per block of 16 tokens
    out["kv_per_token_fp8"] = per_token + 2 * t.num_hidden_layers * t.num_key_value_heads * 4 / 16
    return out


# ---- speed ------------------------------------------------------------------------------------------------
def random_model(cfg, device, dtype, quantization):
    """The model at `cfg`'s shapes with random weights made on the device, each tensor quantized as it is
    made: the same streaming as loading a checkpoint, without one."""
    from engine.tiny_checkpoint import random_weights
    from engine.weights import materialize, targets
    model = materialize(cfg, device, dtype, quantization)
    where = targets(model)
    with torch.no_grad():
        for name, w in random_weights(cfg, 0, dtype, str(device)):
            t = where[name]
            t.linear.load_shard(t.shard, w) if t.linear is not None else t.param.copy_(w)
            del w
    return model


@torch.inference_mode()
def decode_speed(model, mode, batch: int, context: int, steps: int, device, eager: bool = False) -> dict:
    from engine.config import EngineConfig
    from engine.forward_context import ForwardContext
    from engine.model_runner import ModelRunner
    t, bs = model.cfg.text, 16
    nb = -(-(context + steps + 4) // bs)
    kv = MODES[mode][1]
    itemsize = 1 if kv == "fp8" else model_dtype(model).itemsize
    per_block = 2 * t.num_hidden_layers * bs * t.num_key_value_heads * (t.head_dim * itemsize + 4)
    # + the pool's scratch block (engine/model_runner.py)
    runner = ModelRunner(model, EngineConfig(kv_cache_memory=(batch * nb + 1) * per_block, block_size=bs,
                                             kv_cache_dtype=kv, max_num_seqs=batch, max_model_len=nb * bs,
                                             enforce_eager=eager), eos_id=2)
    assert runner.num_blocks >= batch * nb
    tables = torch.arange(batch * nb, dtype=torch.int32, device=device).view(batch, nb)
    gen = torch.Generator().manual_seed(0)

    def step(start: int, qlen: int, rows: list[int]) -> torch.Tensor:
        n = len(rows)
        p = torch.arange(start, start + qlen, device=device)
        # sequence r owns blocks r*nb .. r*nb+nb-1, so its slot for position p is r*nb*bs + p
        slots = (torch.tensor(rows, device=device)[:, None] * (nb * bs) + p[None]).flatten()
        cu = torch.arange(0, n * qlen + 1, qlen, dtype=torch.int32, device=device)
        ctx = ForwardContext(cu_seqlens_q=cu,
                             seq_lens=torch.full((n,), start + qlen, dtype=torch.int32, device=device),
                             slot_mapping=slots, block_tables=tables[rows], kv_caches=runner.kv_caches,
                             query_lens_cpu=[qlen] * n, seq_lens_cpu=[start + qlen] * n)
        ids = torch.randint(1000, t.vocab_size, (n * qlen,), generator=gen).to(device)
        if qlen == 1 and runner.graphs is not None:
            h = runner.graphs.run(ids, p.repeat(n), slots, ctx.seq_lens, ctx.block_tables)
        else:
            h = model(ids, p.repeat(n), ctx)
        return model.compute_logits(h[qlen - 1::qlen]).argmax(-1)

    for s in range(0, context, 2048):                      # prefill the context, one sequence at a time
        for r in range(batch):
            step(s, min(2048, context - s), [r])
    for i in range(3):                                     # warm-up
        step(context + i, 1, list(range(batch)))
    sync(device)
    start = time.perf_counter()
    for i in range(steps):
        step(context + 3 + i, 1, list(range(batch))).cpu()   # a host copy per step, as the engine does
    sync(device)
    wall = time.perf_counter() - start
    return {"batch": batch, "context": context, "steps": steps, "cuda_graphs": runner.graphs is not None,
            "ms_per_step": 1000 * wall / steps,
            "tokens_per_s": batch * steps / wall}


def model_dtype(model) -> torch.dtype:
    return model.language_model.model.embed_tokens.weight.dtype


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def speed(cfg, modes, device, dtype, batches, context, steps, eager=False) -> dict:
    out = {}
    for mode in modes:
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = random_model(cfg, device, dtype, MODES[mode][0])
        set_mode_kernel(model, mode)
        rec = {"weights_bytes": sum(p.nbytes for p in model.parameters())}
        if torch.device(device).type == "cuda":
            rec["load_peak_bytes"] = torch.cuda.max_memory_allocated(device)
        rec["runs"] = [decode_speed(model, mode, b, context, steps, device, eager) for b in batches]
        out[mode] = rec
        del model
        gc.collect()
    ref = out.get("ref")
    if ref:
        for rec in out.values():
            for run, base in zip(rec["runs"], ref["runs"]):
                run["speedup_vs_ref"] = run["tokens_per_s"] / base["tokens_per_s"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random one of --preset)")
    ap.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--prompt-len", default="16,48", help="min,max prompt tokens")
    ap.add_argument("--gen-len", type=int, default=32)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--speed", action=argparse.BooleanOptionalAction, default=None,
                    help="decode tokens/s (default: on with CUDA)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--enforce-eager", action="store_true",
                    help="decode steps run eagerly (default on CUDA: they replay CUDA graphs; never with int8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else \
        (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(modes) - set(MODES):
        ap.error(f"unknown modes {sorted(unknown)}; choose from {list(MODES)}")
    cfg = model_presets()[args.preset]
    lo, hi = map(int, args.prompt_len.split(","))
    prompts = random_prompts(args.num_prompts, (lo, hi), cfg.text.vocab_size, args.seed)
    params = {**vars(args), "dtype": str(dtype), "modes": modes, "chunk": CHUNK, "model": model_summary(cfg)}
    result = {**run_metadata(), "params": params, "figures": {"memory_24b": memory_24b()}}
    try:
        import bitsandbytes
        result["versions"]["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:                 # nf4/int8 modes will say so; the others still run
        result["versions"]["bitsandbytes"] = None
    if not args.no_quality:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = args.model
            if ckpt is None:
                if args.preset == "full":
                    ap.error("quality at --preset full needs --model (a 48 GB checkpoint); use --no-quality")
                from engine.tiny_checkpoint import write_checkpoint
                ckpt = write_checkpoint(Path(tmp) / args.preset, cfg, "hf", seed=args.seed)
            result["figures"]["quality"] = quality(ckpt, modes, device, dtype, prompts, args.gen_len)
        rows = [[m, q.get("rel_logits_error"), q.get("top1_all_positions"), q.get("greedy_teacher_forced"),
                 q.get("greedy_free_running"), q.get("greedy_prefix"), q["weights_bytes"] / 2**20]
                for m, q in result["figures"]["quality"].items()]
        print(format_table(["mode", "rel. logits err", "top-1 (all pos.)", "greedy TF", "greedy free",
                            "greedy prefix", "weights MiB"], rows, "{:.4f}"))
    if args.speed or (args.speed is None and device.type == "cuda"):
        sp = speed(cfg, modes, device, dtype, [int(b) for b in args.batch_sizes.split(",")], args.context,
                   args.steps, args.enforce_eager)
        result["figures"]["speed"] = sp
        print(format_table(["mode", "batch", "context", "ms/step", "tok/s", "vs ref"],
                           [[m, r["batch"], r["context"], r["ms_per_step"], r["tokens_per_s"],
                             r.get("speedup_vs_ref")] for m, rec in sp.items() for r in rec["runs"]],
                           "{:.2f}"))
    label = f"{args.preset}-{str(dtype).removeprefix('torch.')}"
    path = write_json(result_path(args.out, "quant", label, device.type), result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
