"""docs/results/families.json rows (issue 16) from `linearize compare` results: one row per attention family.

Each row: the resolved attention config, per evaluation text the ppl ratio (student / teacher), top-1 agreement
and KL, the held-out ppl ratio of the conversion, the per-layer transfer error relative to the teacher layer's
output power (and its mean and max), passkey accuracy, decode tokens/s after the compare's --decode-context prefill,
the decoding state's bytes there, and the conversion's wall time. `streaming` is the training-free baseline.
`scripts/families_table.py` writes the file from finished compare folders.
"""

ROW_KEYS = ("passkey", "decode_tokens_per_s", "state_bytes", "convert_seconds", "keep_softmax", "stage1_from")


def family_row(name: str, r: dict) -> dict:
    """One compare.json variant as a families.json row."""
    texts = r.get("texts", {})
    errors = r.get("layer_relative_error")
    return {
        "variant": name, "attention": r["attention"], "config": r.get("config"),
        "heldout_ppl_ratio": r["student_ppl"] / r["teacher_ppl"],
        "ppl_ratio": {t: v["ppl_ratio"] for t, v in texts.items()},
        "top1": {t: v["top1"] for t, v in texts.items()},
        "kl": {t: v["kl"] for t, v in texts.items()},
        "layer_relative_error": errors,
        "layer_relative_error_mean": errors and sum(errors) / len(errors),
        "layer_relative_error_max": errors and max(errors),
        **{k: r.get(k) for k in ROW_KEYS},
    }


def families(compare: dict, source: str) -> dict:
    """families.json from one compare.json (several, run in parallel with the same settings, joined beforehand)."""
    s = compare["settings"]
    return {
        "source": source, "device": compare.get("device"),
        "budget": {k: s["convert"][k] for k in ("transfer_tokens", "lora_tokens", "seq_len", "eval_tokens")},
        "measured": {k: s["compare"][k] for k in ("texts", "kl_sequences", "layer_sequences", "passkey_length",
                                                  "passkey_trials", "decode_context", "decode_tokens")},
        "teacher": compare["teacher"],
        "rows": [family_row(name, r) for name, r in compare["variants"].items()],
    }
