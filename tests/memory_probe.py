"""Loads a checkpoint in a fresh process and reports its anonymous memory as JSON: before, the peak while
loading (sampled every 0.5 ms), after, the loaded model's bytes and the checkpoint's largest tensor.

    python tests/memory_probe.py CKPT [none|nf4|int8|fp8]

Run it through `util.measure_load`: memory must be measured in a process that has loaded nothing else."""

import json
import sys
import threading
import time

import torch


def anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(path: str, quantization: str) -> None:
    quantization = None if quantization == "none" else quantization
    if quantization in ("nf4", "int8"):
        import bitsandbytes  # noqa: F401  (its import allocates; not part of the load)
    from engine.models.mistral3 import Mistral3ForConditionalGeneration
    from engine.weights import load_model, plan, resolve
    ckpt = resolve(path)
    with torch.device("meta"):
        largest = max(e.nbytes for e in plan(ckpt, Mistral3ForConditionalGeneration(ckpt.config())))
    before, peak, done = anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    model = load_model(ckpt, "cpu", torch.bfloat16, progress=False, quantization=quantization)
    done.set()
    t.join()
    after = anon()
    print(json.dumps({"before": before, "peak": max(peak[0], after), "after": after, "largest": largest,
                      "model_bytes": sum(p.nbytes for p in model.parameters())}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "none")
