"""Host cost of preparing a step's inputs at long contexts: the model is a stub, only the engine's own work
is timed.

B requests of L context tokens each sit in the tiny checkpoint's engine with fake block tables; every step
each request decodes one token (a new block every block_size steps), through `ModelRunner.execute` with the
model and the sampler replaced by stubs. Per step, medians over `--steps` steps after two warm-up steps:

- `prep`: from `execute()` entry to the forward call (block tables, slot mapping, token ids, positions);
- `sampling inputs`: from the logits to the sampler call (per-row parameters, penalty statistics);
- `execute`: the whole call, results brought to the host included.

On a CPU the "device" work (gathers of the block table and penalty rows) is host work too, and is counted.
Run against another checkout (e.g. `git archive main`) to compare: the script uses only APIs both keep.

    python benchmarks/bench_step_inputs.py [--batch 64] [--contexts 8192 32768] [--steps 20]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, format_table, result_path, run_metadata, write_json  # noqa: E402


class StubModel:
    """Stands in for the model: records when the forward and the sampler are reached."""

    def __init__(self, vocab_size: int, batch: int):
        self.marks = {}
        self.logits = torch.zeros(batch, vocab_size)       # allocated once: its cost is not the engine's

    def __call__(self, input_ids, positions, ctx, embeds=None):
        self.marks["forward"] = time.perf_counter()
        return torch.zeros(input_ids.shape[0], 8)

    def compute_logits(self, hidden):
        self.marks["logits"] = time.perf_counter()
        return self.logits[:hidden.shape[0]]

    def sample(self, logits, batch):
        from engine.sampler import SamplerOutput
        self.marks["sampler"] = time.perf_counter()
        return SamplerOutput(torch.zeros(logits.shape[0], dtype=torch.long), None, None, None)


def run(engine, batch: int, context: int, steps: int, penalties: bool) -> dict:
    from engine.request import RequestStatus
    from engine.sampling_params import SamplingParams
    from engine.scheduler import ScheduledRequest, SchedulerOutput
    from engine.tokenizer import EncodedPrompt

    runner, bs = engine.runner, engine.config.block_size
    stub = StubModel(engine.model_config.text.vocab_size, batch)
    runner.model, runner.sampler = stub, stub.sample
    knobs = {"repetition_penalty": 1.1, "frequency_penalty": 0.5} if penalties else {}
    params = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True, **knobs)
    rng = np.random.default_rng(0)
    reqs = []
    for i in range(batch):
        ids = rng.integers(1000, 100_000, size=context).tolist()
        req = engine.make_request(EncodedPrompt(ids), params, f"bench-{context}-{penalties}-{i}")
        req.block_ids = list(range(-(-context // bs)))          # fake: nothing reads the KV pool
        req.num_computed_tokens, req.status = context - 1, RequestStatus.RUNNING
        reqs.append(req)
    times = {"prep": [], "sampling inputs": [], "execute": []}
    for step in range(steps + 2):
        sched = SchedulerOutput([ScheduledRequest(r, 1) for r in reqs])
        start = time.perf_counter()
        runner.execute(sched)
        end = time.perf_counter()
        if step >= 2:
            times["prep"].append(stub.marks["forward"] - start)
            times["sampling inputs"].append(stub.marks["sampler"] - stub.marks["logits"])
            times["execute"].append(end - start)
        for r in reqs:                  # the engine core's bookkeeping, as after a real step
            r.num_computed_tokens += 1
            if hasattr(r, "append_output"):
                r.append_output(1000 + step)
            else:
                r.output_token_ids.append(1000 + step)
            if r.num_computed_tokens + 1 > len(r.block_ids) * bs:
                r.block_ids.append(len(r.block_ids))
    if "finished" in SchedulerOutput.__dataclass_fields__:     # they leave the batch, as when they finish
        runner.execute(SchedulerOutput(finished=reqs))
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--label", default="tiny")
    ap.add_argument("--out", default=str(RESULTS_DIR))
    args = ap.parse_args()
    torch.set_num_threads(1)

    from engine.llm_engine import LLMEngine
    from engine.tiny_checkpoint import TINY, write_checkpoint
    from engine.tokenizer import write_tekken_v7
    with tempfile.TemporaryDirectory() as tmp:
        write_tekken_v7(Path(tmp) / "tekken.json")
        write_checkpoint(Path(tmp), TINY, "hf", "4.50", "4.50", 0)
        engine = LLMEngine(tmp, device="cpu", dtype="float32", progress=False,
                           kv_cache_memory=64 * 2**20, max_num_seqs=max(args.batch, 256))
    rows, figures = [], {}
    for context in args.contexts:
        for penalties in (False, True):
            r = run(engine, args.batch, context, args.steps, penalties)
            name = f"{args.batch}x{context}{' penalties' if penalties else ''}"
            figures[name] = r
            rows.append([name, r["prep"], r["sampling inputs"], r["execute"]])
            print(format_table(["batch x context", "prep ms", "sampling inputs ms", "execute ms"], rows[-1:],
                               "{:.2f}"), flush=True)
    print(format_table(["batch x context", "prep ms", "sampling inputs ms", "execute ms"], rows, "{:.2f}"))
    path = result_path(args.out, "step-inputs", args.label, "cpu")
    write_json(path, {**run_metadata(), "params": vars(args), "figures": figures})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
