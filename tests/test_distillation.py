"""Stage 2 by distillation: the teacher view of the student is its teacher, KL vanishes only for the teacher itself,
and a distilling stage 2 resumes exactly."""

import copy
from dataclasses import replace

import pytest
import torch

from linearize.errors import LinearizeError
from linearize.finetune.lora import LoraSettings, add_lora, distillation_loss, finetune_lora, teacher_view
from linearize.layers.linear_attention import FULL_SOFTMAX, LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM

from conftest import interrupted_at_step

CONFIG = LinearAttentionConfig(window=4, sinks=2, chunk_size=8)


def ids(n=6, T=24, seed=0):
    return torch.randint(0, 320, (n, T), generator=torch.Generator().manual_seed(seed))


def test_distillation_loss_is_zero_only_for_equal_logits():
    a = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    b = a + 0.5 * torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(1))
    assert distillation_loss(a, a).abs() < 1e-6
    assert distillation_loss(a + 3.0, a).abs() < 1e-6  # a shift of all logits is the same distribution
    p, q = a.softmax(-1), b.softmax(-1)
    expected = (q * (q.log() - p.log())).sum(-1).mean()  # KL(teacher b || student a), mean over tokens
    torch.testing.assert_close(distillation_loss(a, b), expected)
    assert distillation_loss(a, b, temperature=2.0) > 0


def test_kl_is_zero_when_the_student_is_the_teacher(tiny_teacher):
    x = ids()
    with torch.no_grad():
        teacher = tiny_teacher(input_ids=x).logits
        student = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), FULL_SOFTMAX)(input_ids=x).logits
    assert distillation_loss(student, teacher) < 1e-9


@pytest.mark.parametrize("config", [CONFIG, replace(CONFIG, local_layers=1, norm="rms")], ids=["lolcats", "diag"])
def test_teacher_view_reproduces_the_teacher(tiny_teacher, config):
    """Also with a DiagAttention layer (local_layers): it has no linear part, yet it is not the teacher's attention."""
    x = ids()
    with torch.no_grad():
        expected = tiny_teacher(input_ids=x).logits
    model = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), config)
    peft_model = add_lora(model, LoraSettings(rank=2))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # adapters that matter
        student = peft_model(input_ids=x).logits
        with teacher_view(peft_model):
            viewed = peft_model(input_ids=x).logits
        after = peft_model(input_ids=x).logits
    torch.testing.assert_close(viewed, expected, rtol=1e-5, atol=1e-5)
    assert (student - expected).abs().max() > 1e-2  # outside the view: the student
    torch.testing.assert_close(after, student)  # the view is left cleanly


def _run(teacher, data, ckpt=None, settings=LoraSettings(rank=2, loss="kl", temperature=2.0)):
    torch.manual_seed(0)
    model = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), CONFIG)
    merged, result = finetune_lora(model, data, settings, lr=1e-2, checkpoint_dir=ckpt, progress=False,
                                   checkpoint_every_s=0)
    return merged, result


def test_distilling_stage_2_lowers_kl_and_resumes_exactly(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)  # larger weights than the default init: peaked attention, a student far from its teacher
    tiny_teacher = AutoModelForCausalLM.from_config(tiny_llama_config(initializer_range=0.3)).eval()
    data = ids(n=8, T=48)
    straight, result = _run(tiny_teacher, data)
    assert {"kl", "teacher_s"} <= set(result.history[0]) and "ce" not in result.history[0]
    with torch.no_grad():
        base = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), CONFIG)
        teacher = tiny_teacher(input_ids=data).logits
        assert distillation_loss(straight(input_ids=data).logits, teacher) < distillation_loss(
            base(input_ids=data).logits, teacher)

    interrupted_at_step(monkeypatch, 5, lambda: _run(tiny_teacher, data, tmp_path / "ckpt"))
    resumed, result = _run(tiny_teacher, data, tmp_path / "ckpt")
    assert result.tokens == 4 * data.shape[1]  # only the 4 unfinished steps ran again
    for (n, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_train_attention_trains_the_mixing_factors(tiny_teacher):
    data = ids(n=4)
    model = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), CONFIG)
    before = {n: p.clone() for n, p in model.named_parameters() if "mix_logit" in n or "feature_map_" in n}
    merged, _ = finetune_lora(model, data, LoraSettings(rank=2, loss="kl", train_attention=True), lr=1e-2,
                              progress=False)
    after = dict(merged.named_parameters())
    assert before and all(not torch.equal(after[n], p) for n, p in before.items() if "mix_logit" in n)


def test_bad_loss_settings_are_clear():
    with pytest.raises(LinearizeError, match="--lora-loss"):
        LoraSettings(loss="mse")
    with pytest.raises(LinearizeError, match="--lora-init default"):
        LoraSettings(loss="kl+ce", init="pissa")
    with pytest.raises(LinearizeError, match="--lora-temperature"):
        LoraSettings(temperature=0)


def test_attention_only_stage_2_keeps_the_teachers_exact_part(tmp_path, monkeypatch):
    """--lora-targets none: no adapters, the feature maps and mixing factors are trained end to end. The teacher's
    weights are untouched, so every position whose keys all lie in the window or the sinks is the teacher's own
    prediction; the KL falls; an interrupted run resumes to the same parameters."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    tiny_teacher = AutoModelForCausalLM.from_config(tiny_llama_config(initializer_range=0.3)).eval()
    data = ids(n=8, T=48)
    settings = LoraSettings(target_modules=(), train_attention=True, loss="kl")
    trained, result = _run(tiny_teacher, data, settings=settings)
    assert not any("lora_" in n for n, _ in trained.named_parameters())
    teacher_weights = dict(tiny_teacher.named_parameters())
    for n, p in trained.named_parameters():
        if "feature_map_" not in n and "mix_logit" not in n:
            torch.testing.assert_close(p, teacher_weights[n.removeprefix("model.")])
    with torch.no_grad():
        base = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), CONFIG)
        teacher = tiny_teacher(input_ids=data).logits
        student = trained(input_ids=data).logits
        assert distillation_loss(student, teacher) < distillation_loss(base(input_ids=data).logits, teacher)
    near = CONFIG.window + CONFIG.sinks  # positions 0 .. near - 1 read no memory
    torch.testing.assert_close(student[:, :near], teacher[:, :near], rtol=1e-4, atol=1e-4)
    assert (student[:, near:] - teacher[:, near:]).abs().max() > 1e-3

    interrupted_at_step(monkeypatch, 5, lambda: _run(tiny_teacher, data, tmp_path / "ckpt", settings))
    resumed, result = _run(tiny_teacher, data, tmp_path / "ckpt", settings)
    assert result.tokens == 4 * data.shape[1]
    for (n, a), (_, b) in zip(trained.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_no_adapters_needs_trained_attention():
    """Without adapters stage 2 trains the attention (on by default there); turned off, one clear error."""
    from linearize.convert.settings import ConvertSettings

    with pytest.raises(LinearizeError, match="nothing to train"):
        LoraSettings(target_modules=())
    assert ConvertSettings(lora_targets="none").lora_settings().train_attention
    assert not ConvertSettings(lora_targets="attention").lora_settings().train_attention
    assert ConvertSettings(lora_targets="attention", lora_train_attention=True).lora_settings().train_attention
    with pytest.raises(LinearizeError, match="nothing to train"):
        ConvertSettings(lora_targets="none", lora_train_attention=False).check()
    with pytest.raises(LinearizeError, match="--lora-init"):
        LoraSettings(target_modules=(), train_attention=True, init="pissa")
