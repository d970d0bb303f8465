"""`linearize report DIR`: one self-contained HTML page (figures embedded as base64 PNG) plus the PNGs.

Reads whatever the folder has: convert.json + curves.json (convert), eval.json (eval), bench.json (bench);
sections without data say which command fills them. Writes DIR/report.html and DIR/report/*.png.
"""

import base64
import html
import io
import time
from pathlib import Path

from ..errors import LinearizeError
from ..options import fmt
from ..run_folder import BENCH, CONVERT, CURVES, EVAL, REPORT, REPORT_FIGURES, read_json, write_text
from .plots import FIGURES

SOURCES = {"convert": CONVERT, "curves": CURVES, "results": EVAL, "bench": BENCH}
STYLE = """body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 10px;text-align:right}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}.missing{color:#888}.met{color:#1a7f37}
.missed{color:#c62828}"""


def _table(header: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _rounded(value) -> str:
    """A target's measured value: a number, a list of numbers or None."""
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(_rounded(v) for v in value)
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary_tables(convert: dict | None, results: dict | None, bench: dict | None) -> str:
    parts = []
    if convert and "teacher_ppl" in convert:
        from ..convert.stages import stage_rows

        rows = [[name, fmt(tokens, ""), fmt(seconds, ""), fmt(ppl, ".2f")]
                for name, tokens, seconds, _, ppl in stage_rows(convert, convert.get("settings") or {})]
        parts.append("<h2>Conversion</h2>" + _table(["", "tokens", "wall s", "held-out ppl"], rows))
    if results and results.get("texts"):
        rows = []
        base = results.get("baseline") or {}
        for n, r in results["texts"].items():
            rows.append([n, r["tokens"], fmt(r["teacher_ppl"], ".2f"), fmt(r["student_ppl"], ".2f"),
                         fmt(r["kl"], ".3f"), fmt(r["top1"], ".1%")])
            if b := base.get("texts", {}).get(n):  # the training-free baseline of equal state bytes
                rows.append([f"{n}: streaming {base['sinks']}+{base['window']} (untrained teacher)", b["tokens"],
                             fmt(b["teacher_ppl"], ".2f"), fmt(b["student_ppl"], ".2f"), fmt(b["kl"], ".3f"),
                             fmt(b["top1"], ".1%")])
            if off := base.get("memory_off", {}).get("texts", {}).get(n):  # what the linear memory adds
                rows.append([f"{n}: the student with its memory off", off["tokens"], fmt(off["teacher_ppl"], ".2f"),
                             fmt(off["student_ppl"], ".2f"), fmt(off["kl"], ".3f"), fmt(off["top1"], ".1%")])
        parts.append("<h2>Quality vs teacher</h2>" + _table(
            ["text", "tokens", "teacher ppl", "student ppl", "KL(teacher||student)", "top-1 agreement"], rows))
    if results and results.get("generation"):
        g = results["generation"]
        parts.append(f"<p>Greedy answers to {g['prompts']} {html.escape(g.get('source', 'held-out'))} prompts "
                     f"({g['max_new_tokens']} tokens): repeated "
                     f"4-grams teacher {g['repetition']['teacher']:.1%}, student {g['repetition']['student']:.1%}; the "
                     f"student's first {g['prefix']} tokens match the teacher's for {g['prefix_match']:.1f} tokens on "
                     f"average</p>")
    if results and (results.get("passkey") or results.get("multikey") or results.get("realrecall")):
        rows = []
        if pk := results.get("passkey"):
            rows += [["passkey", n, fmt(t, ".0%"), fmt(s, ".0%")]
                     for n, t, s in zip(pk["lengths"], pk["teacher"], pk["student"])]
        if mk := results.get("multikey"):
            rows += [[f"{k} keys, one asked", n, fmt(t, ".0%"), fmt(s, ".0%")] for k in map(str, mk["keys"])
                     for n, t, s in zip(mk["lengths"], mk["teacher"][k], mk["student"][k])]
        if rr := results.get("realrecall"):  # facts in real text (the rows above: in a repeated filler, the easy case)
            models = rr["models"]
            rows += [[f"real text, {k} key{'s, one asked' if k != '1' else ''}", n, fmt(t, ".0%"), fmt(s, ".0%")]
                     for k in map(str, rr["keys"]) for n, t, s in zip(rr["lengths"], models["teacher"]["accuracy"][k],
                                                                        models["student"]["accuracy"][k])]
        parts.append("<h2>Recall</h2><p>passkey and keys: facts in a repeated filler (the easy case); real text: in "
                     "spans of real documents</p>" + _table(["test", "length (tokens)", "teacher", "student"], rows))
    if results and results.get("mmlu"):
        m = results["mmlu"]
        parts.append(f"<p>MMLU {m['num_fewshot']}-shot (lm-eval, {m['questions']} questions, limit {m['limit']} per "
                     f"subject): teacher {m['teacher']['acc']:.1%}, student {m['student']['acc']:.1%}</p>")
    if bench and bench.get("targets"):
        rows = [[name, _rounded(r["value"]),
                 r["target"], {True: "met", False: "missed", None: "not measured"}[r["met"]]]
                for name, r in bench["targets"].items()]
        m = bench.get("machine", {})
        linears = bench.get("settings", {}).get("linears", "stock")
        parts.append(f"<h2>Speed targets ({m.get('cpus')} CPUs, {m.get('threads')} threads, {linears} linear layers "
                     f"in both models)</h2>" + _table(["target", "measured", "goal", ""], rows))
    return "\n".join(parts)


def build_report(path: str | Path) -> Path:
    """Write DIR/report.html (+ DIR/report/*.png); returns the HTML path."""
    path = Path(path)
    data = {key: read_json(path / name) for key, name in SOURCES.items()}
    if not any(data.values()):
        raise LinearizeError(f"{path} has none of {', '.join(SOURCES.values())}; run `linearize convert` "
                             "(then `linearize eval` and `linearize bench`) first")
    png_dir = path / REPORT_FIGURES
    png_dir.mkdir(exist_ok=True)
    figures = []
    for stem, (caption, make) in FIGURES.items():
        fig = make(data["curves"], data["results"], data["bench"])
        if fig is None:
            figures.append(f'<p class="missing">{html.escape(caption)}: no data yet (see the commands above).</p>')
            continue
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        fig.clf()
        (png_dir / f"{stem}.png").write_bytes(buf.getvalue())
        b64 = base64.b64encode(buf.getvalue()).decode()
        figures.append(f'<figure><img alt="{stem}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    teacher = next((d.get("teacher") for d in (data["results"], data["bench"]) if d and d.get("teacher")), None)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>linearize report: {html.escape(path.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>linearize report: {html.escape(str(path))}</h1>"
            f"<p>teacher: {html.escape(str(teacher or 'bundled SmolLM2-135M-Instruct'))}; generated "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Commands: <code>linearize convert</code> "
            f"(curves), <code>linearize eval</code> (quality), <code>linearize bench</code> (speed).</p>"
            f"{summary_tables(data['convert'], data['results'], data['bench'])}<h2>Figures</h2>{''.join(figures)}"
            "</body></html>")
    out = path / REPORT
    write_text(page, out)
    return out
