"""The GPU check's results: headline figures with their share of the measured ceilings, the printed table,
and the check against benchmarks/gpu_check.schema.json.

A stage reports figures as items {"name", "value", "unit", "ceiling", "options"} (plus, optionally,
"vs": {"figure": other figure, "name": ratio name}); `summarize` gathers them from every stage into
`results["figures"]`, adds each one's share of its ceiling (copy bandwidth for bytes/s, the bf16 matmul rate
for FLOP/s, both measured by the env stage) and the ratios, and renders the table. It runs after every
stage, so a partial run has a correct partial table.
"""

from __future__ import annotations

from pathlib import Path

CEILINGS = ("copy_gb_s", "matmul_tflop_s")


def summarize(results: dict, stages) -> None:
    env = results["stages"].get("env", {}).get("details", {})
    results["ceilings"] = {k: env.get("ceilings", {}).get(k) for k in CEILINGS}
    if env.get("driver"):
        results["versions"]["driver"] = env["driver"]
    figures = {}
    for name in (s.name for s in stages):
        for item in results["stages"].get(name, {}).get("figures", []):
            ceiling = item.get("ceiling")
            top = results["ceilings"].get(ceiling) if ceiling else None
            value = item["value"]
            figures[item["name"]] = {"value": value, "unit": item["unit"], "stage": name, "ceiling": ceiling,
                                     "share": value / top if top and value is not None else None,
                                     "options": item.get("options", {})}
    for name in (s.name for s in stages):          # ratios, once both sides exist
        for item in results["stages"].get(name, {}).get("figures", []):
            vs = item.get("vs")
            other = figures.get(vs["figure"]) if vs else None
            if other and other["value"] and item["value"] is not None:
                figures[vs["name"]] = {"value": item["value"] / other["value"], "unit": "x", "stage": name,
                                       "ceiling": None, "share": None,
                                       "options": {"numerator": item["name"], "denominator": vs["figure"]}}
    results["figures"] = figures
    results["table"] = table(results, stages)


def _fmt(v, unit: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if unit == "x":
            return f"{v:.2f}x"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def _options(opts: dict) -> str:
    """The options that tell figures of one name apart, briefly (all of them are in the JSON)."""
    out = []
    if "enforce_eager" in opts:
        out.append("eager" if opts["enforce_eager"] else "graphs")
    if opts.get("quantization"):
        out.append(opts["quantization"])
    if opts.get("kv_cache_dtype") not in (None, "auto"):
        out.append(f"kv {opts['kv_cache_dtype']}")
    if opts.get("context"):
        out.append(f"ctx {opts['context']}")
    if opts.get("chunk"):
        out.append(f"chunk {opts['chunk']}")
    if "attn_implementation" in opts:
        out.append(f"{opts['attn_implementation']}{'' if opts.get('compile') else ', eager'}")
    return ", ".join(out)


def table(results: dict, stages) -> str:
    from common import format_table
    p = results["params"]
    rows = []
    for s in stages:
        e = results["stages"].get(s.name)
        if e is None:
            rows.append([s.name, "not run", None, s.budget_s, ""])
            continue
        err = (e.get("error") or "").splitlines()
        rows.append([s.name, e["status"], e.get("wall_s") or e.get("seconds"), s.budget_s,
                     err[-1][:70] if err else ""])
    head = (f"gpu_check ({p['mode']}, {p['device']}, {p['dtype']}, model {p['preset']}) at "
            f"{(results['commit'].get('sha') or '?')[:10]}{' (dirty)' if results['commit'].get('dirty') else ''}"
            f" on {(results.get('gpu') or {}).get('name') or 'CPU'}")
    total = sum(r[2] or 0 for r in rows)
    rows.append(["(stages)", "", total, sum(x.budget_s for x in stages), ""])
    stage_table = format_table(["stage", "status", "wall s", "budget s", "error"], rows)
    figs = [[name, _fmt(f["value"], f["unit"]), f["unit"],
             f"{100 * f['share']:.0f}% {f['ceiling'].split('_')[0]}" if f["share"] is not None else "",
             _options(f["options"])]
            for name, f in results["figures"].items()]
    fig_table = format_table(["figure", "value", "unit", "of ceiling", "options"], figs) if figs else \
        "(no figures)"
    return f"{head}\n\n{stage_table}\n\n{fig_table}"


def validate(results: dict, schema_path: Path) -> list[str]:
    """Every way `results` breaks the schema, as 'path: message' lines (empty: valid)."""
    import json

    import jsonschema
    schema = json.loads(Path(schema_path).read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(results), key=lambda e: list(map(str, e.absolute_path)))]
