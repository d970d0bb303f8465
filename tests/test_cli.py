"""The `linearize` command end to end on a tiny local model, and one clear error line for every bad input."""

import json
import subprocess
import sys

import torch
from safetensors import safe_open
from transformers import BertConfig, GPT2Config

from linearize.cli import main

SMALL = ["--seq-len", "32", "--tokens", "256", "--lora-tokens", "128", "--eval-tokens", "64", "--window", "8",
         "--no-progress"]


def one_error_line(capsys, argv, match):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("linearize: error:")]
    assert len(lines) == 1 and err.strip().endswith(lines[0]), err
    assert match in lines[0], lines[0]


def test_convert_generate_and_resume(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL]) == 0
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "convert.json", "curves.json"} <= names
    summary = json.loads((out / "convert.json").read_text())
    for key in ("teacher_ppl", "stage1_ppl", "stage2_ppl"):
        assert summary[key] > 1.0
    assert summary["transfer"]["tokens"] == 256 and summary["lora"]["tokens"] == 128
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["transfer"]) == 8 and len(curves["lora"]) == 4 and len(curves["layer_mse"]) == 2
    capsys.readouterr()
    assert main(["generate", str(out), "hello", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.strip() != ""
    # an existing run is never overwritten by accident; --resume continues (here: already finished)
    one_error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL],
                   "--resume")
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL,
                 "--resume"]) == 0


def test_convert_in_bfloat16(model_dir, data_file, tmp_path):
    """--dtype bfloat16 (the default on CUDA) runs the teacher in bfloat16; trained parameters stay float32."""
    out = tmp_path / "bf16"
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL,
                 "--dtype", "bfloat16", "--device", "cpu"]) == 0
    summary = json.loads((out / "convert.json").read_text())
    assert summary["settings"]["dtype"] == "bfloat16" and 1.0 < summary["stage2_ppl"] < 1e4
    with safe_open(out / "model.safetensors", "pt") as f:
        dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes["model.model.layers.0.self_attn.q_proj.weight"] == "BF16"
    assert dtypes["model.model.layers.0.self_attn.feature_map_q.weight"] == "F32"


def test_lora_only_baseline_runs(model_dir, data_file, tmp_path):
    out = tmp_path / "lora-only"
    argv = ["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL, "--skip-transfer"]
    assert main(argv) == 0
    summary = json.loads((out / "convert.json").read_text())
    assert "transfer" not in summary and summary["lora"]["tokens"] == 128


def test_bad_inputs_give_one_clear_line(model_dir, data_file, tmp_path, capsys):
    m, d = ["--model", str(model_dir)], ["--data", str(data_file), "--out", str(tmp_path / "out")]
    one_error_line(capsys, ["convert", "--model", str(tmp_path / "nope.gguf"), *d], "not found")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    one_error_line(capsys, ["convert", "--model", str(tmp_path / "junk.gguf"), *d],
                   "is truncated or not a GGUF file")
    BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64).save_pretrained(tmp_path / "bert")
    one_error_line(capsys, ["convert", "--model", str(tmp_path / "bert"), *d], "'bert' is not supported")
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    one_error_line(capsys, ["convert", "--model", str(tmp_path / "gpt2"), *d], "supported: gemma3_text, llama, mistral, qwen2, qwen3")
    (tmp_path / "empty.txt").write_text("")
    one_error_line(capsys, ["convert", *m, "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "out"), *SMALL],
                   "no text")
    one_error_line(capsys, ["convert", *m, *d, "--seq-len", "16"], "leaves the linear memory nothing to learn")
    one_error_line(capsys, ["convert", *m, "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")],
                   "not found")
    one_error_line(capsys, ["convert", *m, *d, "--dtype", "float8"], "--dtype 'float8' is not supported")
    one_error_line(capsys, ["convert", *m, *d, "--device", "gpu0"], "is not a device")
    one_error_line(capsys, ["convert", *m, *d, "--device", "mps"], "only cpu and cuda")
    if not torch.cuda.is_available():
        one_error_line(capsys, ["convert", *m, *d, "--device", "cuda"], "use --device cpu")
    assert not (tmp_path / "out").exists()  # failed starts leave nothing that would block a corrected re-run


def test_corrupt_safetensors_is_one_line_from_a_real_process(model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL]) == 0
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = subprocess.run([sys.executable, "-m", "linearize.cli", "generate", str(out), "hi"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("linearize: error:") and "corrupt" in proc.stderr


def test_convert_with_no_adapters_keeps_the_teachers_projections(model_dir, data_file, tmp_path, capsys):
    """--lora-targets none: stage 2 trains the feature maps and mixing factors alone (--lora-train-attention is on
    by default without adapters); the saved q/k/v/o are the teacher's own. With --no-lora-train-attention: one clear
    error line (nothing to train)."""
    from linearize.loading.student import load

    out = tmp_path / "none"
    one_error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL,
                            "--lora-targets", "none", "--no-lora-train-attention"], "nothing to train")
    assert main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL,
                 "--lora-targets", "none"]) == 0
    summary = json.loads((out / "convert.json").read_text())
    assert summary["lora"]["tokens"] == 128 and 1.0 < summary["stage2_ppl"] < 1e4
    student, _ = load(out)
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"model.layers.0.self_attn.{name}.weight"
            torch.testing.assert_close(student.state_dict()[f"model.{key}"], f.get_tensor(key))


def test_convert_switches_the_sparse_cache_on_after_training(model_dir, data_file, tmp_path, capsys):
    """--cache M has no parameters: the stages train without it (the weights are those of a run without --cache) and
    the saved model has it in every layer with a memory; convert.json has the saved model's perplexity, the summary a
    row for it. --train-with-cache trains with it in place (other weights)."""
    from safetensors.torch import load_file

    from linearize.loading.student import load
    from linearize.run_folder import student_ppl

    base = ["convert", "--model", str(model_dir), "--data", str(data_file), *SMALL]
    outs = {name: tmp_path / name for name in ("plain", "cache", "trained")}
    assert main([*base, "--out", str(outs["plain"]), "--cache", "0"]) == 0
    capsys.readouterr()
    assert main([*base, "--out", str(outs["cache"]), "--cache", "4"]) == 0
    assert "saved: + sparse cache" in capsys.readouterr().out
    assert main([*base, "--out", str(outs["trained"]), "--cache", "4", "--train-with-cache"]) == 0
    weights = {name: load_file(out / "model.safetensors") for name, out in outs.items()}
    for key, value in weights["plain"].items():
        torch.testing.assert_close(weights["cache"][key], value, rtol=0, atol=0)
    assert any(not torch.equal(weights["trained"][k], v) for k, v in weights["plain"].items() if "feature_map" in k)
    summary = json.loads((outs["cache"] / "convert.json").read_text())
    assert student_ppl(summary) == summary["saved_ppl"] != summary["stage2_ppl"]
    # trained with the cache in place, then saved with its fitted score (the default where the cache sits at the
    # window's edge): measured as saved too
    trained = json.loads((outs["trained"] / "convert.json").read_text())
    assert trained["saved_ppl"] and trained["cache_score"]["rows"] >= 1 and trained["cache_score"]["top"] == 0.02
    student, _ = load(outs["cache"])
    assert student.config.attention["cache"] == 4 and student.config.attention["cache_score"] == "learned"
    extra = set(weights["cache"]) - set(weights["plain"])  # the fitted score's weights, nothing else
    assert extra and all("cache_scorer" in k for k in extra)
    assert all(m.config.cache == 4 and m.spec.cache == 4 for m in student.attention_modules() if m.config.linear)
