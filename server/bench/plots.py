"""The run as one PNG: latency CDFs (TTFT, TPOT, ITL, E2EL), output throughput against requests in flight (one
point per second of the run), TTFT against prompt length. Needs matplotlib (the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

INSTALL_HINT = "pip install 'mistral-small-engine[bench]'"


def plot(result: dict, path: Path) -> Path:
    """Write the PNG; ImportError (with the install hint) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: {INSTALL_HINT} ({e})") from None
    ok = [r for r in result["requests"] if r["success"]]
    series = {"TTFT": [r["ttft_s"] for r in ok], "TPOT": [r["tpot_s"] for r in ok if r["tpot_s"] is not None],
              "ITL": [x for r in ok for x in r["itl_s"]], "E2EL": [r["e2el_s"] for r in ok]}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (name, values) in zip([*axes[0], axes[1][0]], series.items()):
        ms = np.sort(np.array(values) * 1000)
        if len(ms):
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post")
            ax.axvline(np.median(ms), color="grey", ls=":", lw=1)
        ax.set(title=f"{name} CDF (median {np.median(ms) if len(ms) else 0:.1f} ms)", xlabel="ms",
               ylabel="fraction of " + ("gaps" if name == "ITL" else "requests"), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    line = result["timeline"]
    ax = axes[1][1]
    busy = [(x, y) for x, y in zip(line["mean_in_flight"], line["output_tokens_per_s"]) if x > 0]
    ax.scatter([x for x, _ in busy], [y for _, y in busy], s=14, alpha=0.6)
    ax.set(title="output throughput vs requests in flight (1 point = 1 s)", xlabel="requests in flight (mean)",
           ylabel="output tokens / s")
    ax.grid(alpha=0.3)
    ax = axes[1][2]
    lens = [r["prompt_tokens"] if r["prompt_tokens"] is not None else r["prompt_len"] for r in ok]
    ax.scatter(lens, [r["ttft_s"] * 1000 for r in ok], s=14, alpha=0.6)
    ax.set(title="TTFT vs prompt length", xlabel="prompt tokens", ylabel="TTFT (ms)")
    ax.grid(alpha=0.3)
    ep = result["endpoint"]
    fig.suptitle(f"{ep['backend']} {ep['url']} | {result['dataset_name']}, {result['completed']} requests, "
                 f"rate {result['request_rate']}, concurrency {result['max_concurrency']} | "
                 f"{result['output_throughput']:.1f} output tok/s", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
