"""Cost of grammar-constrained decoding: host time per token mask and its share of step time.

Runs the same batch of requests twice on the same weights — free text, then every request constrained by
a JSON schema (or a tool-call grammar) — and reports the llguidance mask time per token, the step time per
token, and the grammar's share of it. Seeded; prints one table, writes JSON (+ PNG with matplotlib).

    python benchmarks/bench_grammar.py [--preset tiny|small] [--num-requests 16] [--output-len 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (RESULTS_DIR, format_table, have_matplotlib, model_presets, model_summary,  # noqa: E402
                               result_path, run_metadata, write_json)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0,
                         "maximum": 150}, "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                         "maxItems": 4}, "address": {"type": "object", "additionalProperties": False,
                         "required": ["city", "zip"], "properties": {"city": {"type": "string", "maxLength": 20},
                                                                     "zip": {"type": "string",
                                                                             "pattern": "^[0-9]{5}$"}}}}}
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}}}},
    {"name": "search", "parameters": {"type": "object", "required": ["q"], "properties": {
        "q": {"type": "string", "maxLength": 30}, "limit": {"type": "integer", "minimum": 1, "maximum": 10}}}}]


def run(llm, prompts, params) -> dict:
    runner = llm.engine.runner
    runner.grammar_seconds, runner.grammar_masks = 0.0, 0
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return {"wall_s": wall, "tokens": tokens, "ms_per_token": 1000 * wall / tokens,
            "grammar_masks": runner.grammar_masks, "grammar_s": runner.grammar_seconds,
            "mask_us": 1e6 * runner.grammar_seconds / runner.grammar_masks if runner.grammar_masks else None,
            "grammar_share": runner.grammar_seconds / wall,
            "stop_fraction": sum(o.finish_reason == "stop" for o in outs) / len(outs)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="checkpoint directory (default: a random one of --preset)")
    ap.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)

    from engine import LLM, SamplingParams
    from engine.tiny_checkpoint import write_checkpoint

    model = args.model or write_checkpoint(tempfile.mkdtemp(prefix="bench-grammar-"), model_presets()[args.preset])
    llm = LLM(model, device=args.device, progress=False, kv_cache_memory=256 * 2**20)
    prompts = [f"Request {i}: describe a person as JSON." for i in range(args.num_requests)]
    grammars = {"json_schema": llm.engine.grammars.json_schema(SCHEMA),
                "tool_calls": llm.engine.grammars.tool_calls(TOOLS, "required", parallel=False)}

    def params(grammar=None, free=False):
        return [SamplingParams(max_tokens=args.output_len, temperature=1.0, seed=args.seed + i, grammar=grammar,
                               ignore_eos=free) for i in range(args.num_requests)]

    run(llm, prompts[:2], params()[:2])                       # warm-up
    rows = {"free": run(llm, prompts, params(free=True))}
    for name, g in grammars.items():
        rows[name] = run(llm, prompts, params(g))
    table = [[k, v["tokens"], v["ms_per_token"], v["mask_us"], 100 * v["grammar_share"], v["stop_fraction"]]
             for k, v in rows.items()]
    print(format_table(["mode", "tokens", "step ms/token", "mask us/token", "grammar % of time", "stop frac"],
                       table, "{:.2f}"))
    path = result_path(args.out, "grammar", args.preset if not args.model else "model", args.device)
    write_json(path, {**run_metadata(), "params": {**vars(args), "model": model_summary(llm.config),
                                                    "schema": SCHEMA, "tools": TOOLS},
                      "figures": rows})
    if have_matplotlib():
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names = list(rows)
        ax.bar(names, [rows[n]["ms_per_token"] for n in names], label="step time / token")
        ax.bar(names, [1000 * rows[n]["grammar_s"] / rows[n]["tokens"] for n in names], label="grammar mask / token")
        ax.set_ylabel("ms per generated token")
        ax.set_title(f"grammar cost ({args.preset}, {args.device}, {args.num_requests} requests)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
