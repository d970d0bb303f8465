"""The report's figures, one function per plot. Each takes the run's JSON dicts and returns a matplotlib Figure,
or None when the data it needs is missing (e.g. no eval.json yet).

    curves  = DIR/curves.json   (linearize convert)
    results = DIR/eval.json     (linearize eval)
    bench   = DIR/bench.json    (linearize bench)
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"teacher": "#4c72b0", "student": "#dd8452"}
MIB = 1 / 2**20


def _figure(ncols: int = 1, width: float = 5.5):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.6), squeeze=False, layout="constrained")
    return fig, axes[0]


def loss_curves(curves: dict | None):
    """Training loss vs tokens: stage 1 (attention-transfer MSE, log scale) and stage 2 (its --lora-loss)."""
    titles = {"transfer": "stage 1: attention transfer (sum of layer MSE)",
              "lora": "stage 2 (--lora-loss: KL to the teacher by default)"}
    stages = [(k, title) for k, title in titles.items() if curves and curves.get(k)]
    if not stages:
        return None
    fig, axes = _figure(len(stages))
    for ax, (key, title) in zip(axes, stages):
        rows = curves[key]
        ax.plot([r["tokens"] for r in rows], [r["loss"] for r in rows], color=COLORS["student"])
        ax.set(title=title, xlabel="training tokens", ylabel="loss", yscale="log" if key == "transfer" else "linear")
        ax.grid(alpha=0.3)
    return fig


def layer_error(curves: dict | None, results: dict | None):
    """Attention output MSE of the student vs the teacher, per layer: after transfer (convert) and per eval text."""
    lines = {}
    if curves and curves.get("layer_mse"):
        lines["after transfer (held-out, convert)"] = curves["layer_mse"]
    for name, values in (results or {}).get("layer_mse", {}).items():
        lines[f"final model: {name}"] = values
    if not lines:
        return None
    fig, (ax,) = _figure(width=7)
    for label, values in lines.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.set(title="per-layer attention-transfer error", xlabel="layer", ylabel="output MSE", yscale="log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def perplexity(results: dict | None):
    """Teacher vs student perplexity per evaluation text (grouped bars)."""
    texts = (results or {}).get("texts")
    if not texts:
        return None
    fig, (ax,) = _figure(width=7)
    names = list(texts)
    for i, who in enumerate(("teacher", "student")):
        values = [texts[n][f"{who}_ppl"] for n in names]
        bars = ax.bar([x + (i - 0.5) * 0.38 for x in range(len(names))], values, 0.38, label=who, color=COLORS[who])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), names)
    ax.set(title="perplexity on held-out text (lower is better)", ylabel="perplexity")
    ax.legend()
    return fig


def _series(bench: dict, who: str, key: str, scale: float = 1.0):
    points = sorted((p["context"], p[key] * scale) for p in bench["points"]
                    if p["which"] == who and p.get(key) is not None)
    return [c for c, _ in points], [v for _, v in points]


def speed(bench: dict | None):
    """Prefill tokens/s, decode latency and memory vs context length, teacher and student on each panel."""
    if not bench or not any("error" not in p for p in bench.get("points", [])):
        return None
    fig, axes = _figure(3, width=4.6)
    panels = [
        (axes[0], "prefill speed", "tokens / s", [("prefill_tokens_per_s", 1, "-", "")]),
        (axes[1], "decode latency (after a prefill of that length)", "ms / token",
         [("decode_ms_per_token", 1, "-", "")]),
        (axes[2], "decoding memory", "MiB", [("cache_bytes", MIB, "-", " cache"),
                                            ("decode_peak_bytes", MIB, "--", " peak RSS (decode)")]),
    ]
    for ax, title, ylabel, keys in panels:
        for key, scale, style, suffix in keys:
            for who in ("teacher", "student"):
                x, y = _series(bench, who, key, scale)
                if x:
                    ax.plot(x, y, style, marker="o", markersize=3, color=COLORS[who], label=who + suffix)
        ax.set(title=title, xlabel="context (tokens)", ylabel=ylabel, xscale="log", yscale="log")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return fig


def recall(results: dict | None):
    """Recall accuracy vs prompt length, teacher and student: one panel for passkey retrieval, one per number of
    keys of the multi-key test."""
    results = results or {}
    panels = []
    if pk := results.get("passkey"):
        panels.append((f"passkey ({pk['trials']} trials per length)", pk["tokens"], pk["teacher"], pk["student"]))
    if mk := results.get("multikey"):
        for k in mk["keys"]:
            k = str(k)
            panels.append((f"{k} keys, one asked ({mk['trials']} per length)", mk["tokens"][k], mk["teacher"][k],
                           mk["student"][k]))
    if not panels:
        return None
    fig, axes = _figure(len(panels), width=4.6)
    for ax, (title, tokens, teacher, student) in zip(axes, panels):
        for who, accuracy in (("teacher", teacher), ("student", student)):  # None: not asked (beyond a context)
            asked = [(n, a) for n, a in zip(tokens, accuracy) if n is not None and a is not None]
            ax.plot([n for n, _ in asked], [100 * a for _, a in asked], marker="o", color=COLORS[who], label=who)
        ax.set(title=title, xlabel="prompt length (tokens)", ylabel="accuracy (%)", ylim=(-5, 105))
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


LONG_STYLES = {"teacher": ("#4c72b0", "--"), "student": ("#dd8452", "-"), "memory_off": ("#55a868", "-"),
               "streaming": ("#8172b3", "-")}


def long_context(results: dict | None):
    """Perplexity ratio to the teacher against position on long documents, one line per model: one panel pooled
    over the documents, one per document (eval.json's "long")."""
    long = (results or {}).get("long")
    if not long or not long.get("texts"):
        return None
    panels = [("all documents", long["all"])] + [(name.rsplit("/", 1)[-1], r["models"])
                                                 for name, r in long["texts"].items()]
    fig, axes = _figure(len(panels), width=4.6)
    ends = [end for _, end in long["bands"]]
    for ax, (title, models) in zip(axes, panels):
        for who, r in models.items():
            color, style = LONG_STYLES.get(who, (None, "-"))
            label = f"{who.replace('_', ' ')} ({long['state_bytes'].get(who, 0) * MIB:.2f} MiB state)"
            points = [(x, y) for x, y in zip(ends, r["ratio"]) if y is not None]
            ax.plot(*zip(*points), style, marker="o", markersize=3, color=color, label=label)
        ax.set(title=title, xlabel="position (tokens; each band ends at its mark)", ylabel="ppl / teacher's ppl")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ends, [f"{e // 1024}k" if e % 1024 == 0 else str(e) for e in ends])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


FIGURES = {  # file stem -> (caption, function of (curves, results, bench))
    "loss_curves": ("Training loss of both stages", lambda c, r, b: loss_curves(c)),
    "layer_error": ("Per-layer attention-transfer error (predicts final quality)", lambda c, r, b: layer_error(c, r)),
    "perplexity": ("Perplexity, teacher vs student, per text", lambda c, r, b: perplexity(r)),
    "speed": ("Speed and memory vs context length", lambda c, r, b: speed(b)),
    "recall": ("Long-context recall vs length: passkey retrieval and multi-key look-up", lambda c, r, b: recall(r)),
    "long": ("Perplexity by position on long documents, as a ratio to the teacher's (state bytes in the legend)",
             lambda c, r, b: long_context(r)),
}
