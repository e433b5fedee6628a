"""Offline throughput/latency benchmark: our engine vs transformers `generate`, same weights, one process.

    python benchmarks/bench_offline.py --preset small                      # random checkpoint, CPU fp32
    python benchmarks/bench_offline.py --model DIR --device cuda --num-requests 64
    python benchmarks/bench_offline.py --preset tiny --paths ours-batched --profile

nano-vllm bench.py style: N seeded random-token prompts (lengths uniform in --input-len-range), each
generating exactly --output-len tokens (EOS ignored and banned), greedy. Four paths:

  ours-batched   our engine, all requests submitted at once (continuous batching, chunked prefill)
  ours-single    our engine, one request at a time
  hf-single      transformers generate, one request at a time
  hf-batched     transformers generate, all requests as one left-padded batch (its best offline case)

Each path is warmed up once on a small run first. Prefix caching is off (unless --prefix-caching) so that
re-running the same prompts in a later path cannot hit the cache. Results: one table on stdout, a JSON
(and a bar chart PNG when matplotlib is installed) under --out. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import itertools
import math
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO_ROOT,
    RESULTS_DIR,
    format_table,
    have_matplotlib,
    model_presets,
    model_summary,
    random_prompts,
    result_path,
    run_metadata,
    stats,
    write_json,
)

PATHS = ("ours-batched", "ours-single", "hf-single", "hf-batched")
PAD_ID = 11          # tekken <pad>
now = time.perf_counter


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=None,
                    help="checkpoint directory (HF format for the transformers paths); default: write a "
                         "random-weight checkpoint of --preset into a temporary directory")
    ap.add_argument("--preset", choices=["tiny", "small", "full"], default="tiny",
                    help="random checkpoint shape when --model is not given (full = real 24B shapes)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--input-len-range", type=int, nargs=2, default=[64, 512], metavar=("MIN", "MAX"))
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--interleave", action="store_true",
                    help="load both models at once and time the paths round-robin (repeat 1 of every path, then "
                         "repeat 2, ...): fairer on a shared CPU; on a GPU our KV pool would leave HF no room")
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed runs per path after the warm-up; the fastest is reported, all are recorded")
    ap.add_argument("--out", default=str(RESULTS_DIR), help="directory for the JSON/PNG results")
    ap.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS), help="which paths to run")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="engine limit (default: engine default)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine limit (default: engine default)")
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="KV pool bytes (default: engine default)")
    ap.add_argument("--prefix-caching", action="store_true", help="leave the engine's prefix cache on")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="our engine runs every step eagerly (default on CUDA: decode steps replay CUDA graphs)")
    ap.add_argument("--quantization", choices=["nf4", "int8", "fp8"], default=None,
                    help="our engine's weights quantized while loading (HF runs the full-precision model)")
    ap.add_argument("--hf-attn", default="sdpa", help="transformers attn_implementation")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, profile one extra ours-batched run (cProfile + torch profiler) "
                         "and write the top entries next to the JSON")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args(argv)
    if args.input_len_range[0] < 1 or args.input_len_range[0] > args.input_len_range[1]:
        ap.error("--input-len-range needs 1 <= MIN <= MAX")
    if min(args.output_len, args.num_requests, args.repeats) < 1:
        ap.error("--output-len, --num-requests and --repeats must be >= 1")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- per-path results --------------------------------------------------------------------------------------
def summarize(name: str, wall: float, prompts: list[list[int]], outputs: list[list[int]],
              first_times: list[float], end_times: list[float], start_times: list[float], output_len: int,
              extra: dict | None = None) -> dict:
    """Throughput over the whole path plus per-request latencies (vLLM definitions: TTFT = submission to
    first token; TPOT = (last - first token time) / (tokens - 1); decode tok/s per request = 1 / TPOT)."""
    for i, toks in enumerate(outputs):
        assert len(toks) == output_len, f"{name}: request {i} produced {len(toks)} tokens, expected {output_len}"
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o) for o in outputs)
    ttft = [f - s for f, s in zip(first_times, start_times)]
    tpot = [(e - f) / (output_len - 1) if output_len > 1 else float("nan") for f, e in zip(first_times, end_times)]
    fig = {"wall_s": wall, "num_requests": len(prompts), "input_tokens": n_in, "output_tokens": n_out,
           "output_tok_s": n_out / wall, "total_tok_s": (n_in + n_out) / wall, "req_s": len(prompts) / wall,
           "ttft_ms": stats(ttft, 1000), "tpot_ms": stats(tpot, 1000),
           "decode_tok_s_per_request": stats([1 / t for t in tpot if t and not math.isnan(t)])}
    fig.update(extra or {})
    return fig


# ---- our engine --------------------------------------------------------------------------------------------
def ours_params(output_len: int, seed: int):
    from engine import SamplingParams
    # ignore_eos: never stop early; min_tokens: ban EOS like transformers' min_new_tokens does, so both
    # engines pick the same greedy token even where EOS would be the argmax
    return SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True, min_tokens=output_len,
                          seed=seed)


def run_ours(engine, prompts, params, batched: bool, device) -> tuple[float, dict]:
    """Drive LLMEngine.step() directly (what LLM.generate does) to time each request's first and last token."""
    n = len(prompts)
    outputs, first, end, start = [None] * n, [None] * n, [None] * n, [None] * n
    steps, decode_steps = 0, []
    sync(device)
    t_begin = now()
    groups = [list(range(n))] if batched else [[i] for i in range(n)]
    for group in groups:
        index = {}
        t0 = now()
        for i in group:
            index[engine.add_request(prompts[i], params)] = i
            start[i] = t0
        while engine.has_unfinished():
            sched = engine.scheduler            # decode-only step: nobody waits, every runner needs 1 token
            decode_only = not sched.waiting and all(r.num_tokens - r.num_computed_tokens == 1
                                                    for r in sched.running)
            t_step = now()
            outs = engine.step()
            t = now()
            steps += 1
            if decode_only:
                decode_steps.append(t - t_step)
            for o in outs:
                i = index[o.request_id]
                if first[i] is None:
                    first[i] = t
                if o.finished:
                    end[i] = t
                    outputs[i] = o
    wall = now() - t_begin
    for o in outputs:
        assert o.finish_reason == "length", f"request finished with {o.finish_reason!r}"
    cached = sum(o.usage.cached_tokens for o in outputs)
    return wall, {"outputs": [list(o.token_ids) for o in outputs], "first": first, "end": end, "start": start,
                  "decode_steps": decode_steps,
                  "extra": {"engine_steps": steps, "decode_only_steps": len(decode_steps),
                            "cached_prompt_tokens": cached}}


def profile_ours(engine, prompts, params, device, base: Path) -> dict:
    """One extra ours-batched run under cProfile, another under torch.profiler; top entries to text files."""
    files = {}
    prof = cProfile.Profile()
    prof.enable()
    run_ours(engine, prompts, params, True, device)
    prof.disable()
    path = base.with_name(base.stem + "-ours-batched.cprofile.txt")
    with open(path, "w") as f:
        for key in ("cumulative", "tottime"):
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats(key).print_stats(45)
            text = s.getvalue()
            for prefix in sorted({str(Path(m.__file__).parent.parent) + "/" for m in (torch, np)
                                  if getattr(m, "__file__", None)} | {str(REPO_ROOT) + "/"}, key=len, reverse=True):
                text = text.replace(prefix, "")       # paths relative to the repo / site-packages
            f.write(f"==== sorted by {key} ====\n{text}\n")
    prof.dump_stats(str(base.with_name(base.stem + "-ours-batched.prof")))
    files["cprofile"] = path.name
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as tp:
        run_ours(engine, prompts, params, True, device)
    path = base.with_name(base.stem + "-ours-batched.torchprof.txt")
    sort = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.write_text(tp.key_averages().table(sort_by=sort, row_limit=40))
    files["torch_profiler"] = path.name
    return files


# ---- transformers ------------------------------------------------------------------------------------------
def hf_load(model_dir, device, dtype, attn):
    import transformers
    from transformers import Mistral3ForConditionalGeneration
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model = Mistral3ForConditionalGeneration.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    return model.to(device).eval()


class _TokenClock:
    """A generate() streamer that only records when each step's tokens reach the host (the first put() is
    the prompt). On GPU `.cpu()` inside generate synchronizes, so the times are real."""

    def __init__(self):
        self.times, self._prompt_seen = [], False

    def put(self, value):
        if self._prompt_seen:
            self.times.append(now())
        self._prompt_seen = True

    def end(self):
        pass


@torch.inference_mode()
def hf_generate(model, batch: list[list[int]], output_len: int, eos_id: int, device):
    """Left-padded greedy generate of exactly output_len tokens; returns (tokens per row, step times)."""
    width = max(len(p) for p in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, p in enumerate(batch):
        ids[r, width - len(p):] = torch.tensor(p)
        mask[r, width - len(p):] = 1
    clock = _TokenClock()
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=output_len,
                         min_new_tokens=output_len, do_sample=False, pad_token_id=PAD_ID, eos_token_id=eos_id,
                         streamer=clock)
    new = out[:, width:].tolist()
    assert out.shape[1] - width == output_len and len(clock.times) == output_len, \
        f"transformers generated {out.shape[1] - width} tokens ({len(clock.times)} steps), expected {output_len}"
    return new, clock.times


def run_hf(model, prompts, output_len, eos_id, batched: bool, device) -> tuple[float, dict]:
    n = len(prompts)
    outputs, first, end, start = [None] * n, [None] * n, [None] * n, [None] * n
    decode_steps = []
    sync(device)
    t_begin = now()
    groups = [list(range(n))] if batched else [[i] for i in range(n)]
    for group in groups:
        t0 = now()
        toks, times = hf_generate(model, [prompts[i] for i in group], output_len, eos_id, device)
        decode_steps += [b - a for a, b in itertools.pairwise(times)]
        for row, i in enumerate(group):
            outputs[i], start[i], first[i], end[i] = toks[row], t0, times[0], times[-1]
    sync(device)
    wall = now() - t_begin
    extra = {}
    if batched:
        width = max(len(p) for p in prompts)
        extra = {"padded_input_tokens": width * n,
                 "padding_fraction": 1 - sum(len(p) for p in prompts) / (width * n)}
    return wall, {"outputs": outputs, "first": first, "end": end, "start": start, "decode_steps": decode_steps,
                  "extra": extra}


# ---- report ------------------------------------------------------------------------------------------------
def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    same = [x == y for x, y in zip(a, b)]
    prefix = []
    for x, y in zip(a, b):
        k = next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(k)
    return {"identical_fraction": sum(same) / len(same), "identical": sum(same), "of": len(same),
            "mean_common_prefix_tokens": sum(prefix) / len(prefix)}


def print_table(figs: dict, ratios: dict) -> str:
    vs = {"ours-batched": ratios.get("ours_batched_vs_hf_batched"),
          "ours-single": ratios.get("ours_single_vs_hf_single")}
    rows = []
    for name in PATHS:
        f = figs.get(name)
        if f is None:
            continue
        def g(k, s="mean", f=f):
            return (f.get(k) or {}).get(s)
        r = vs.get(name)
        rows.append([name, f["wall_s"], f["output_tok_s"], f["total_tok_s"],
                     f"{r:.2f}x" if r is not None else None, g("ttft_ms"), g("ttft_ms", "median"),
                     g("tpot_ms"), g("decode_step_ms", "median"), g("decode_tok_s_per_request")])
    headers = ["path", "wall s", "out tok/s", "total tok/s", "vs HF", "TTFT mean ms", "TTFT p50 ms",
               "TPOT mean ms", "decode step p50 ms", "decode tok/s/req"]
    return format_table(headers, rows, "{:.2f}")


def plot(figs: dict, ratios: dict, title: str, path: Path) -> bool:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in PATHS if n in figs]
    colors = ["#1f77b4" if n.startswith("ours") else "#ff7f0e" for n in names]
    panels = [("output tok/s", [figs[n]["output_tok_s"] for n in names]),
              ("total (in+out) tok/s", [figs[n]["total_tok_s"] for n in names]),
              ("mean TTFT ms", [(figs[n]["ttft_ms"] or {}).get("mean", 0) for n in names]),
              ("mean TPOT ms", [(figs[n]["tpot_ms"] or {}).get("mean", 0) for n in names])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4))
    for ax, (label, vals) in zip(axes, panels):
        bars = ax.bar(names, vals, color=colors)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
    sub = ", ".join(f"{k.replace('_vs_', ' / ').replace('_', '-')} {v:.2f}x" for k, v in ratios.items()
                    if v is not None)
    fig.suptitle(f"{title}\n{sub}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---- main --------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    args = parse_args(argv)
    from engine import LLM
    from engine.config import load_config
    from engine.llm_engine import resolve_device_dtype
    from engine.tiny_checkpoint import write_checkpoint

    device, dtype = resolve_device_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)
    tmp = None
    t = now()
    if args.model is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"bench-{args.preset}-")
        cfg = model_presets()[args.preset]
        print(f"writing a random-weight {args.preset} checkpoint to {tmp.name} ...", flush=True)
        write_checkpoint(tmp.name, cfg, fmt="hf", seed=args.seed,
                         device="cuda" if device.type == "cuda" else "cpu")
        model_dir, label = Path(tmp.name), args.preset
    else:
        model_dir = Path(args.model).expanduser()
        label = model_dir.name or "model"
    write_s = now() - t
    has_hf = (model_dir / "config.json").exists()
    cfg = load_config(model_dir / ("config.json" if has_hf else "params.json"))
    vocab = cfg.text.vocab_size
    paths = [p for p in PATHS if p in args.paths]
    if not has_hf and any(p.startswith("hf") for p in paths):
        print("note: no config.json (HF format) in the model directory: skipping the transformers paths")
        paths = [p for p in paths if not p.startswith("hf")]

    prompts = random_prompts(args.num_requests, tuple(args.input_len_range), vocab, args.seed)
    warm = random_prompts(min(2, args.num_requests), (args.input_len_range[0], args.input_len_range[0]), vocab,
                          args.seed + 1)
    warm_len = min(4, args.output_len)
    out_json = result_path(args.out, "offline", label, device.type)
    figs, runs, extra_info = {}, {}, {"checkpoint_write_s": write_s}
    if os.cpu_count() and os.getloadavg()[0] > 0.5 * os.cpu_count():
        print(f"warning: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs before starting: "
              "other processes compete for the cores and the numbers will be noisy", flush=True)

    attempts: dict[str, list] = {name: [] for name in paths}

    def measure(name, run, k):
        """One timed repeat of a path; greedy, so every repeat must give the same tokens."""
        print(f"running {name}" + (f" ({k + 1}/{args.repeats})" if args.repeats > 1 else "") + " ...", flush=True)
        load = os.getloadavg()[0]
        wall, r = run()
        attempts[name].append((wall, r, load))
        if runs.get(name) is None:
            runs[name] = r
        elif r["outputs"] != runs[name]["outputs"]:
            print(f"  warning: {name} repeat {k + 1} produced different tokens than repeat 1")
        print(f"  {name}: {wall:.2f} s", flush=True)

    def run_all(runners: dict) -> None:
        """runners: name -> (warm-up, timed run). Each path is warmed up once, then timed --repeats times:
        path after path, or round-robin over the paths with --interleave (fairer on a shared machine)."""
        for warmup, _ in runners.values():
            warmup()
        if args.interleave:
            for k in range(args.repeats):
                for name, (_, run) in runners.items():
                    measure(name, run, k)
        else:
            for name, (_, run) in runners.items():
                for k in range(args.repeats):
                    measure(name, run, k)

    def load_ours():
        kw = {k: v for k, v in (("max_num_seqs", args.max_num_seqs),
                                ("max_num_batched_tokens", args.max_num_batched_tokens),
                                ("kv_cache_memory", args.kv_cache_memory),
                                ("quantization", args.quantization)) if v is not None}
        if args.enforce_eager:
            kw["enforce_eager"] = True
        t = now()
        llm = LLM(model_dir, device=device, dtype=dtype, progress=False, enable_prefix_caching=args.prefix_caching,
                  **kw)
        extra_info["ours_load_s"] = now() - t
        eng = llm.engine
        extra_info["engine_config"] = {**vars(eng.config), "kv_blocks": eng.runner.num_blocks,
                                       "kv_capacity_tokens": eng.runner.capacity_tokens}
        runners = {}
        for name, batched in (("ours-batched", True), ("ours-single", False)):
            if name in paths:
                runners[name] = (
                    lambda b=batched: run_ours(eng, warm, ours_params(warm_len, args.seed), b, device),
                    lambda b=batched: run_ours(eng, prompts, ours_params(args.output_len, args.seed), b, device))
        return llm, runners

    def load_hf():
        t = now()
        hf = hf_load(model_dir, device, dtype, args.hf_attn)
        extra_info["hf_load_s"] = now() - t
        runners = {}
        for name, batched in (("hf-single", False), ("hf-batched", True)):
            if name in paths:
                runners[name] = (lambda b=batched: run_hf(hf, warm, warm_len, eos_id, b, device),
                                 lambda b=batched: run_hf(hf, prompts, args.output_len, eos_id, b, device))
        return hf, runners

    def profile(llm):
        print("profiling ours-batched ...", flush=True)
        extra_info["profiles"] = profile_ours(llm.engine, prompts, ours_params(args.output_len, args.seed), device,
                                              out_json)

    from engine.tokenizer import Tokenizer
    eos_id = Tokenizer.from_model_dir(model_dir).eos_id
    want_ours = any(p.startswith("ours") for p in paths) or args.profile
    want_hf = any(p.startswith("hf") for p in paths)
    if args.interleave:         # both models resident at once (fine on CPU; on a GPU our KV pool takes the rest)
        llm, ours_runners = load_ours() if want_ours else (None, {})
        hf, hf_runners = load_hf() if want_hf else (None, {})
        run_all({**ours_runners, **hf_runners})
        if args.profile:
            profile(llm)
        del llm, hf, ours_runners, hf_runners
        free_memory(device)
    else:                       # one model at a time: on a GPU each side gets the whole device
        if want_ours:
            llm, runners = load_ours()
            run_all(runners)
            if args.profile:
                profile(llm)
            # the runners' closures hold the engine too: all of it must go before transformers loads
            del llm, runners
            free_memory(device)
        if want_hf:
            hf, runners = load_hf()
            run_all(runners)
            del hf, runners
            free_memory(device)
    for name, tries in attempts.items():
        if not tries:
            continue
        wall, r, _ = min(tries, key=lambda x: x[0])          # best of N, as timeit
        figs[name] = summarize(name, wall, prompts, r["outputs"], r["first"], r["end"], r["start"],
                               args.output_len, {**r["extra"], "decode_step_ms": stats(r["decode_steps"], 1000),
                                                 "wall_s_repeats": [x[0] for x in tries],
                                                 "loadavg_1m_at_start": [x[2] for x in tries]})

    # ---- ratios, agreement ----
    def ratio(a, b, key="output_tok_s"):
        return figs[a][key] / figs[b][key] if a in figs and b in figs else None

    ratios = {"ours_batched_vs_hf_batched": ratio("ours-batched", "hf-batched"),
              "ours_single_vs_hf_single": ratio("ours-single", "hf-single")}
    ratio_detail = {
        "ours_batched_vs_hf_batched_total_tok_s": ratio("ours-batched", "hf-batched", "total_tok_s"),
        "ours_single_vs_hf_single_total_tok_s": ratio("ours-single", "hf-single", "total_tok_s"),
        "ours_batched_vs_hf_single": ratio("ours-batched", "hf-single"),
        "ours_batched_vs_ours_single": ratio("ours-batched", "ours-single"),
        "hf_batched_vs_hf_single": ratio("hf-batched", "hf-single")}
    agree = {}
    pairs = [("ours-batched", "hf-single"), ("ours-single", "hf-single"), ("ours-batched", "ours-single"),
             ("hf-batched", "hf-single")]
    for a, b in pairs:
        if a in runs and b in runs:
            agree[f"{a}_vs_{b}"] = agreement(runs[a]["outputs"], runs[b]["outputs"])

    table = print_table(figs, ratios)
    t0 = cfg.text
    title = (f"offline {label} ({t0.num_hidden_layers}L h{t0.hidden_size}) {device.type} "
             f"{str(dtype).removeprefix('torch.')}: {args.num_requests} req, in {args.input_len_range[0]}-"
             f"{args.input_len_range[1]}, out {args.output_len}")
    print()
    print(title)
    print(table)
    for k, v in ratios.items():
        print(f"{k}: {'-' if v is None else f'{v:.2f}x'} (output tok/s)")
    for k, v in agree.items():
        print(f"greedy agreement {k}: {v['identical']}/{v['of']} identical "
              f"({100 * v['identical_fraction']:.0f}%), mean common prefix {v['mean_common_prefix_tokens']:.1f}")

    result = {**run_metadata(),
              "params": {**vars(args), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                         "model_dir": None if tmp else str(model_dir), "label": label, "paths": paths,
                         "prompt_lengths": [len(p) for p in prompts], "model_config": model_summary(cfg),
                         **extra_info},
              "figures": {"paths": figs, "ratios": ratios, "ratios_detail": ratio_detail, "agreement": agree},
              "table": table}
    png = out_json.with_suffix(".png")
    if not args.no_plot:
        if have_matplotlib():
            plot(figs, ratios, title, png)
            result["plot"] = png.name
        else:
            print("note: matplotlib is not installed: no plot (pip install matplotlib)")
    write_json(out_json, result)
    print(f"\nwrote {out_json}" + (f" and {png.name}" if result.get("plot") else ""))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
