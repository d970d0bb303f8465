"""--keep-softmax K: exact softmax in the K layers with the largest transfer error, saved, reloaded, decoded."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import linearize
from linearize.cli import main
from linearize.layers.linear_attention import LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM, make_student_attention
from linearize.convert.stages import choose_softmax_layers

from conftest import decode_stepwise, tiny_llama_config, write_word_jsonl


def four_layer_teacher():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=4)).eval()


@pytest.mark.parametrize("window", [0, 6])
def test_decoding_with_softmax_layers_equals_full_forward(window, tmp_path):
    model = LinearizedForCausalLM.from_teacher(four_layer_teacher(), LinearAttentionConfig(window=window, chunk_size=8),
                                               keep_softmax=[1, 3])
    assert [a.config.linear for a in model.attention_modules()] == [True, False, True, False]
    assert [a.config.window for a in model.attention_modules()][1::2] == [None, None]
    x = torch.randint(0, 320, (1, 37), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=x).logits
        stepwise, state = decode_stepwise(model, x, 10)
    torch.testing.assert_close(stepwise, full, rtol=1e-4, atol=1e-5)
    assert len(state[1].win) == 37 and state[1].kv is None  # softmax layers: a growing KV cache
    model.save_pretrained(tmp_path)
    loaded, _ = linearize.load(tmp_path)
    assert loaded.config.keep_softmax == [1, 3]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, full)


def test_all_layers_kept_is_the_teacher():
    teacher = four_layer_teacher()
    x = torch.randint(0, 320, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = teacher(x).logits
        model = LinearizedForCausalLM.from_teacher(teacher, LinearAttentionConfig(window=4), keep_softmax=[0, 1, 2, 3])
        torch.testing.assert_close(model(input_ids=x).logits, expected, rtol=1e-4, atol=1e-5)


def test_choose_softmax_layers_takes_the_largest_errors():
    students = make_student_attention(four_layer_teacher(), LinearAttentionConfig(window=4))
    assert choose_softmax_layers([0.1, 0.5, 0.05, 0.3], students, 2) == [1, 3]
    assert choose_softmax_layers([0.1, 0.5, 0.05, 0.3], students, 0) == []
    with pytest.raises(linearize.LinearizeError, match="--keep-softmax 5"):
        choose_softmax_layers([0.1] * 4, students, 5)


@pytest.fixture
def model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "teacher"
    four_layer_teacher().save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_convert_keep_softmax_end_to_end(model_dir, tmp_path):
    data = write_word_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = ["convert", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--tokens", "128", "--lora-tokens", "64", "--eval-tokens", "64", "--window", "8", "--keep-softmax", "2",
            "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "convert.json").read_text())
    mse = summary["layer_mse"]
    kept = summary["keep_softmax"]
    assert len(kept) == 2 and min(mse[i] for i in kept) >= max(mse[i] for i in range(4) if i not in kept)
    model, _ = linearize.load(out)
    assert model.config.keep_softmax == kept
    assert [not a.config.linear for a in model.attention_modules()] == [i in kept for i in range(4)]


def test_choose_softmax_layers_as_given():
    students = make_student_attention(four_layer_teacher(), LinearAttentionConfig(window=4))
    assert choose_softmax_layers([0.1, 0.5, 0.05, 0.3], students, 0, [2, 0]) == [0, 2]  # not the largest errors
    with pytest.raises(linearize.LinearizeError, match=r"--softmax-layers \[4\] are not linearized layers"):
        choose_softmax_layers([0.1] * 4, students, 0, [1, 4])


def test_convert_softmax_layers_end_to_end(model_dir, tmp_path, capsys):
    data = write_word_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = ["convert", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--seq-len", "32",
            "--tokens", "128", "--lora-tokens", "64", "--eval-tokens", "64", "--window", "8", "--no-progress"]
    assert main(argv + ["--softmax-layers", "0,2"]) == 0
    assert json.loads((out / "convert.json").read_text())["keep_softmax"] == [0, 2]
    model, _ = linearize.load(out)
    assert [not a.config.linear for a in model.attention_modules()] == [True, False, True, False]
    capsys.readouterr()
    assert main(argv + ["--out", str(tmp_path / "x"), "--softmax-layers", "1", "--keep-softmax", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: usage line + one error line
        main(argv + ["--out", str(tmp_path / "y"), "--softmax-layers", "1,x"])
    assert e.value.code == 2 and "comma-separated integers" in capsys.readouterr().err
