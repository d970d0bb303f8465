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
         "--no-progress"]


def test_compare_two_families_and_reuse(inputs, tmp_path, capsys):
    model, data = inputs
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(model), "--data", str(data), "--out", str(out), "--attention", "hedgehog,liger",
            *SMALL]
    assert main(argv) == 0
    res = json.loads((out / "compare.json").read_text())
    assert set(res["variants"]) == {"hedgehog", "liger"}
    for r in res["variants"].values():
        assert r["student_ppl"] > 1 and r["kl"] >= 0 and 0 <= r["passkey"] <= 1 and r["decode_tokens_per_s"] > 0
    assert res["variants"]["hedgehog"]["teacher_ppl"] == res["variants"]["liger"]["teacher_ppl"]  # same rows
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
            "--keep-softmax", "0,1", "--window", "8", *SMALL, "--skip", "passkey,decode"]
    assert main(argv) == 0
    res = json.loads((out / "compare.json").read_text())
    assert [r["keep_softmax"] for r in res["variants"].values()] == [[], [res["variants"]["lolcats-k1"]["keep_softmax"][0]]]
    # stage 1 is trained once: K = 1 loads K = 0's transfer result instead of training its own
    k1 = json.loads((out / "lolcats-k1" / "convert.json").read_text())
    assert "transfer" not in k1 and k1["settings"]["transfer_state"].startswith(str(out / "lolcats-k0"))
    k0 = json.loads((out / "lolcats-k0" / "convert.json").read_text())
    assert k1["stage1_ppl"] != k1["teacher_ppl"] and k1["layer_mse"] == k0["layer_mse"]
    assert "reuse the stage 1" in (out / "compare.md").read_text()


def test_compare_rejects_unknown_family(inputs, tmp_path, capsys):
    model, data = inputs
    assert main(["compare", "--model", str(model), "--attention", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "unknown attention 'nope'" in capsys.readouterr().err
