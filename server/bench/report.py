"""compare's HTML report: one self-contained page (inline CSS, no scripts, nothing fetched), the summary on top,
then one row per request with the text around its first difference."""

from __future__ import annotations

from html import escape

_CSS = """body{font:14px system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;width:100%}
td,th{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}th{background:#f3f3f3}
.same{color:#176a1d}.diff{color:#a4161a;font-weight:600}.err{color:#8a5a00}code{white-space:pre-wrap;
word-break:break-all}.a{background:#fde2e1}.b{background:#dff3e3}.summary td{border:none;padding:2px 12px 2px 0}"""


def _code(text: str, cls: str = "") -> str:
    return f'<code class="{cls}">{escape(text)}</code>' if cls else f"<code>{escape(text)}</code>"


def html(result: dict) -> str:
    a, b = result["a"], result["b"]
    rows = []
    for r in result["requests"]:
        if "error" in r:
            status = f'<span class="err">failed: {escape(str(r["error"]))}</span>'
            detail = ""
        elif r["identical"]:
            status = '<span class="same">identical</span>'
            detail = _code(r["text_a"][:400])
        else:
            ctx = r.get("context") or {}
            status = f'<span class="diff">differs at token {r["first_diff_token"]}</span>'
            detail = (f'…{_code(ctx.get("before", ""))}<br>A: {_code(ctx.get("a", ""), "a")}<br>'
                      f'B: {_code(ctx.get("b", ""), "b")}')
        lp = r.get("logprobs")
        lp_cell = "" if not lp else (f"max |Δ| {lp['max_abs_diff']:.4g}, mean {lp['mean_abs_diff']:.4g} over "
                                     f"{lp['shared_tokens']} shared tokens")
        if lp and "at_first_diff" in lp:
            d = lp["at_first_diff"]
            lp_cell += (f"<br>at the difference: A {escape(repr(d['token_a']))} {d['logprob_a']:.4g}, "
                        f"B {escape(repr(d['token_b']))} {d['logprob_b']:.4g}")
        rows.append(f"<tr><td>{r['index']}</td><td>{escape(r['feature'])}</td><td>{r['prompt_len']}</td>"
                    f"<td>{status}</td><td>{detail}</td><td>{lp_cell}</td></tr>")
    features = "".join(f"<tr><td>{escape(f)}</td><td>{c['identical']} / {c['total']}</td></tr>"
                       for f, c in result["by_feature"].items())
    biggest = result["max_abs_logprob_diff"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>compare: {result['identical']} / {result['total']} identical</title>
<style>{_CSS}</style></head><body>
<h1>{result['identical']} / {result['total']} answers identical ({result['identical_ratio']:.1%})</h1>
<table class="summary">
<tr><td>A</td><td>{escape(a['backend'])} {_code(a['url'])}</td></tr>
<tr><td>B</td><td>{escape(b['backend'])} {_code(b['url'])}</td></tr>
<tr><td>sampling</td><td>temperature {result['temperature']}, seed {result['seed']} (+ request index + 1)</td></tr>
<tr><td>failed</td><td>{result['failed']}</td></tr>
<tr><td>largest |logprob Δ|</td><td>{'—' if biggest is None else f'{biggest:.4g}'}</td></tr>
<tr><td>date (UTC)</td><td>{escape(result['date'])}</td></tr>
</table>
<h2>By request kind</h2><table style="width:auto">{features}</table>
<h2>Requests</h2>
<table><tr><th>#</th><th>kind</th><th>prompt tokens</th><th>result</th><th>text</th><th>logprobs</th></tr>
{''.join(rows)}
</table></body></html>
"""
