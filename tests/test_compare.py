"""`linearize compare` on a tiny local model: one run per family at the same budget, one table."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from linearize.cli import main

from conftest import tiny_llama_config, write_word_jsonl


@pytest.fixture
def inputs(tmp_path, tiny_tokenizer):
    torch.manual_seed(0)
    model = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=3)).save_pretrained(model)
    tiny_tokenizer.save_pretrained(model)
    data = write_word_jsonl(tmp_path / "data.jsonl")
    return model, data


SMALL = ["--seq-len", "32", "--tokens", "64", "--lora-tokens", "32", "--eval-tokens", "64", "--kl-sequences", "1",
         "--passkey-length", "48", "--passkey-trials", "1", "--decode-context", "40", "--decode-tokens", "2",
         "--layer-sequences", "1", "--texts", "sharegpt,shakespeare", "--no-progress"]


@torch.no_grad()
def by_hand(teacher_dir, run, data) -> dict:
    """What compare should report for the student saved in `run`, computed here without compare's measuring code
    (save for passkey_accuracy): its held-out perplexity (the conversion's own rows: --eval-tokens 64 at
    --seq-len 32), KL(teacher || student) and top-1 agreement on the first held-out row (--kl-sequences 1), the
    passkey accuracy at 48 tokens (1 trial) and its decoding state after a 40-token prefill."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from linearize.generate.decoding import Decoder
    from linearize.evaluate.passkey import passkey_accuracy
    from linearize.evaluate.texts import eval_sequences
    from linearize.loading.student import load

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student = load(run)[0]
    heldout = eval_sequences("sharegpt", tokenizer, 32, 2, data=str(data))
    ppl = torch.exp(torch.stack([student(input_ids=row[None], labels=row[None]).loss for row in heldout]).mean())
    row = heldout[:1, :-1]
    logp_t, logp_s = (F.log_softmax(m(input_ids=row).logits[0], -1) for m in (teacher, student))
    decoder = Decoder(student)
    decoder.prefill(torch.randint(300, (1, 40)))
    return {"student_ppl": ppl.item(), "kl": F.kl_div(logp_s, logp_t, log_target=True, reduction="batchmean").item(),
            "top1": (logp_t.argmax(-1) == logp_s.argmax(-1)).float().mean().item(),
            "passkey": passkey_accuracy(student, tokenizer, [48], 1)["accuracy"][0],
            "state_bytes": decoder.cache_bytes()}


def test_compare_two_families_and_reuse(inputs, tmp_path, capsys):
    model, data = inputs
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(model), "--data", str(data), "--out", str(out), "--attention",
            "nalaformer,liger", "--window", "8", *SMALL]
    assert main(argv) == 0
    res = json.loads((out / "compare.json").read_text())
    assert set(res["variants"]) == {"nalaformer", "liger"} and res["device"]["name"] == "cpu"
    for name, r in res["variants"].items():
        expected = by_hand(model, out / name, data)
        assert r["student_ppl"] == pytest.approx(expected["student_ppl"], rel=1e-4)
        assert r["kl"] == pytest.approx(expected["kl"], rel=1e-3, abs=1e-7)
        assert r["top1"] == pytest.approx(expected["top1"])
        assert r["passkey"] == expected["passkey"] and r["state_bytes"] == expected["state_bytes"]
        assert r["decode_tokens_per_s"] > 0  # a time: no known value
        assert set(r["texts"]) == {"sharegpt", "shakespeare"} and r["kl"] == r["texts"]["sharegpt"]["kl"]
        for t in r["texts"].values():
            assert t["ppl_ratio"] == t["student_ppl"] / t["teacher_ppl"] and 0 <= t["top1"] <= 1
        assert len(r["layer_relative_error"]) == 3 and all(e > 0 for e in r["layer_relative_error"])
    assert res["variants"]["nalaformer"]["config"]["feature_map"] == "nala"
    assert res["variants"]["nalaformer"]["teacher_ppl"] == res["variants"]["liger"]["teacher_ppl"]  # same rows
    assert "| liger |" in (out / "compare.md").read_text()
    assert "liger" in capsys.readouterr().out
    # finished variants are reused, not retrained
    stamp = (out / "liger" / "model.safetensors").stat().st_mtime_ns
    assert main(argv + ["--skip", "kl,passkey,decode"]) == 0
    assert (out / "liger" / "model.safetensors").stat().st_mtime_ns == stamp


def test_compare_keep_softmax_values(inputs, tmp_path):
    model, data = inputs
    out = tmp_path / "k"
    argv = ["compare", "--model", str(model), "--data", str(data), "--out", str(out), "--attention", "lolcats",
            "--keep-softmax", "0,1", "--window", "8", "--heavy", "0", *SMALL, "--skip", "passkey,decode"]
    assert main(argv) == 0
    res = json.loads((out / "compare.json").read_text())
    assert [r["keep_softmax"] for r in res["variants"].values()] == [[], [res["variants"]["lolcats-k1"]["keep_softmax"][0]]]
    # stage 1 is trained once: K = 1 loads K = 0's transfer result instead of training its own
    k1 = json.loads((out / "lolcats-k1" / "convert.json").read_text())
    assert "transfer" not in k1 and k1["settings"]["transfer_state"].startswith(str(out / "lolcats-k0"))
    k0 = json.loads((out / "lolcats-k0" / "convert.json").read_text())
    assert k1["stage1_ppl"] != k1["teacher_ppl"] and k1["layer_mse"] == k0["layer_mse"]
    assert "reuse the stage 1" in (out / "compare.md").read_text()


def test_families_table_from_compare(tmp_path):
    """compare.families (what scripts/families_table.py writes) turns a compare.json into docs/results/families.json
    rows."""
    from linearize.compare import families as table

    texts = {"sharegpt": {"teacher_ppl": 2.0, "student_ppl": 3.0, "ppl_ratio": 1.5, "kl": 0.1, "top1": 0.8}}
    variant = {"attention": "nalaformer", "config": {"feature_map": "nala"}, "teacher_ppl": 2.0, "student_ppl": 2.5,
               "texts": texts, "layer_relative_error": [0.1, 0.3], "passkey": 0.4, "decode_tokens_per_s": 50.0,
               "state_bytes": 1024, "convert_seconds": 9.0, "keep_softmax": []}
    settings = {"convert": {"transfer_tokens": 64, "lora_tokens": 32, "seq_len": 32, "eval_tokens": 64},
                "compare": {"texts": ["sharegpt"], "kl_sequences": 1, "layer_sequences": 1, "passkey_length": 48,
                            "passkey_trials": 1, "decode_context": 16384, "decode_tokens": 2}}
    row = table.families({"settings": settings, "teacher": {"ppl": 2.0}, "variants": {"nalaformer": variant}},
                         "x")["rows"][0]
    assert row["heldout_ppl_ratio"] == 1.25 and row["ppl_ratio"] == {"sharegpt": 1.5} and row["top1"]["sharegpt"] == 0.8
    assert row["layer_relative_error_mean"] == pytest.approx(0.2) and row["layer_relative_error_max"] == 0.3


def test_compare_rejects_unknown_family(inputs, tmp_path, capsys):
    model, data = inputs
    assert main(["compare", "--model", str(model), "--attention", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown attention 'nope'" in capsys.readouterr().err
