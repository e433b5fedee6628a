"""What the tokens cost: the hosted price beside a local GPU's, from the measured throughput.

Hosted: $0.35 per million input tokens and $0.56 per million output tokens (the model page; the pricing page's
neurons give $0.351 / $0.555, contract.md §6). Local: `--gpu-hourly-price` dollars per GPU hour spread over the
tokens the run produced per second. Break-even utilisation is the share of the hour the GPU must be kept this
busy for its hourly price to equal what the same tokens cost hosted: above 100% it never pays off at this
throughput.
"""

from __future__ import annotations

HOSTED_INPUT_PER_M = 0.35
HOSTED_OUTPUT_PER_M = 0.56
DEFAULT_THRESHOLD = 1.00                # USD: a hosted run expected to cost more needs --yes


def hosted_cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * HOSTED_INPUT_PER_M + output_tokens * HOSTED_OUTPUT_PER_M) / 1e6


def planned_cost(samples, initial_test: bool = True) -> tuple[int, int, float]:
    """(input tokens, output tokens, dollars) of a workload if every request runs to its max_tokens."""
    tin = sum(s.prompt_len for s in samples) + (samples[0].prompt_len if initial_test and samples else 0)
    tout = sum(s.expected_output_len for s in samples) + (1 if initial_test and samples else 0)
    return tin, tout, hosted_cost(tin, tout)


def cost_report(summary: dict, gpu_hourly_price: float | None) -> dict:
    tin, tout, dur = summary["total_input_tokens"], summary["total_output_tokens"], summary["duration"]
    rep = {"hosted_price_per_m": {"input": HOSTED_INPUT_PER_M, "output": HOSTED_OUTPUT_PER_M},
           "hosted_usd": hosted_cost(tin, tout),
           "hosted_usd_per_m_output": hosted_cost(tin, tout) / tout * 1e6 if tout else None}
    if gpu_hourly_price is not None:
        # the same mix of input and output tokens at the hosted price, per hour at this throughput
        hosted_per_hour = hosted_cost(tin, tout) / dur * 3600 if dur > 0 else 0.0
        rep.update({
            "gpu_hourly_price": gpu_hourly_price,
            "local_usd": gpu_hourly_price * dur / 3600,
            "local_usd_per_m_output": gpu_hourly_price / (summary["output_throughput"] * 3600) * 1e6
            if summary["output_throughput"] else None,
            "break_even_utilisation": gpu_hourly_price / hosted_per_hour if hosted_per_hour else None,
        })
    return rep


def cost_lines(rep: dict) -> list[str]:
    lines = [f"Hosted price of these tokens:    ${rep['hosted_usd']:.6f}"]
    if rep["hosted_usd_per_m_output"] is not None:
        lines.append(f"Hosted $ per M output tokens:    {rep['hosted_usd_per_m_output']:.4f} (input included)")
    if "gpu_hourly_price" in rep:
        lines.append(f"Local GPU cost (${rep['gpu_hourly_price']:.2f}/h):    ${rep['local_usd']:.6f}")
        if rep["local_usd_per_m_output"] is not None:
            lines.append(f"Local $ per M output tokens:     {rep['local_usd_per_m_output']:.4f}")
        if rep["break_even_utilisation"] is not None:
            u = rep["break_even_utilisation"]
            lines.append(f"Break-even utilisation:          {u:.1%}" + (" (never, at this throughput)" if u > 1 else ""))
    return lines
