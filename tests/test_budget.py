"""`linearize convert --minutes N`: the plan fits the budget, a too-small budget is a clear error, resume keeps it."""

import json

import pytest
import torch

from linearize.convert import budget
from linearize.errors import LinearizeError
from linearize.layers.linear_attention import attention_preset
from linearize.convert import stages
from linearize.finetune.lora import LoraSettings
from linearize.models.linearized import LinearizedForCausalLM
from linearize.convert.run_state import RunState
from linearize.convert.settings import ConvertSettings
from linearize.convert.stages import Conversion, finetune, load_inputs

from conftest import write_word_jsonl

T = 32


def test_plan_fills_the_budget_and_splits_it():
    p = budget.plan(minutes=10, elapsed_s=30, teacher_s=1.0, transfer_s=2.0, eval_rows=4, seq_len=T, kl=True)
    lora_s = 1.0 + budget.LORA_STEP_IN_TRANSFER_STEPS * 2.0
    assert p.lora_row_s == lora_s and p.overhead_s == 30 + 4 * 1.0 * (1 + budget.EVALUATIONS) + budget.SAVE_S
    spent = p.overhead_s + p.transfer_tokens / T * 2.0 + p.lora_tokens / T * lora_s
    assert 600 - 2.0 - lora_s < spent <= 600  # within one step of each stage of the budget, never over it
    share = (p.transfer_tokens / T * 2.0) / (spent - p.overhead_s)
    assert share == pytest.approx(budget.TRANSFER_SHARE, abs=0.02)
    ce = budget.plan(minutes=10, elapsed_s=30, teacher_s=1.0, transfer_s=2.0, eval_rows=4, seq_len=T, kl=False)
    assert ce.lora_tokens > p.lora_tokens  # no teacher forward in a ce step
    skip = budget.plan(minutes=10, elapsed_s=30, teacher_s=1.0, transfer_s=2.0, eval_rows=4, seq_len=T, kl=True,
                       transfer_share=0.0)
    assert skip.transfer_tokens == 0 and skip.lora_tokens > p.lora_tokens
    assert budget.plan(20, 30, 1.0, 2.0, 4, T, True).lora_tokens > 2 * p.lora_tokens - T  # more minutes, more tokens
    fit = budget.plan(minutes=10, elapsed_s=30, teacher_s=1.0, transfer_s=2.0, eval_rows=4, seq_len=T, kl=True,
                      after_rows=32)  # the cache's score fitted after training: 32 teacher rows' time reserved
    assert fit.overhead_s == p.overhead_s + 32 and fit.lora_tokens < p.lora_tokens


def test_a_budget_too_small_for_one_step_is_a_clear_error():
    with pytest.raises(LinearizeError, match=r"--minutes 0.5 is too small .* give at least --minutes \d+"):
        budget.plan(minutes=0.5, elapsed_s=20, teacher_s=1.0, transfer_s=2.0, eval_rows=4, seq_len=T, kl=True)
    with pytest.raises(LinearizeError, match="--minutes must be > 0"):
        ConvertSettings(minutes=0).check()


def test_transfer_share_divides_a_minutes_budget_and_nothing_else():
    with pytest.raises(LinearizeError, match="--transfer-share divides a --minutes budget"):
        ConvertSettings(transfer_share=0.5).check()
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(LinearizeError, match="--transfer-share must be between 0 and 1"):
            ConvertSettings(minutes=5, transfer_share=bad).check()
    ConvertSettings(minutes=5, transfer_share=0.5).check()


def test_convert_plans_the_split_it_is_given(model_dir, tmp_path, monkeypatch):
    data = write_word_jsonl(tmp_path / "data.jsonl", lines=3000)
    monkeypatch.setattr(budget, "probe", lambda *a: (1.0, 2.0))
    plans = {}
    for share in (None, 2 / 3):
        settings = ConvertSettings(model=str(model_dir), data=str(data), seq_len=T, eval_tokens=2 * T, minutes=3,
                                   device="cpu", transfer_share=share, cache_score="recall")  # (no fit to reserve)
        out = tmp_path / f"run-{share}"
        load_inputs(Conversion(settings, out, RunState(out, settings, resume=False), None, None, False,
                               lambda *a: None))
        plan = json.loads((out / "progress.json").read_text())["results"]["plan"]
        stage1_s = plan["transfer_tokens"] // T * plan["transfer_row_s"]
        plans[share] = stage1_s / (stage1_s + plan["lora_tokens"] // T * plan["lora_row_s"])
    assert plans[None] == pytest.approx(budget.TRANSFER_SHARE, abs=0.03)
    assert plans[2 / 3] == pytest.approx(2 / 3, abs=0.03)


def test_the_probe_times_a_real_forward_and_transfer_step(tiny_teacher):
    teacher_s, transfer_s = budget.probe(tiny_teacher, torch.randint(0, 320, (T,)), attention_preset("lolcats",
                                                                                                     window=8))
    assert teacher_s > 0 and transfer_s > 0


def test_convert_plans_from_a_probe_and_resume_keeps_the_plan(model_dir, tmp_path, monkeypatch):
    data = write_word_jsonl(tmp_path / "data.jsonl", lines=3000)
    monkeypatch.setattr(budget, "probe", lambda *a: (1.0, 2.0))  # a slow machine: a plan the data can fill
    settings = ConvertSettings(model=str(model_dir), data=str(data), seq_len=T, eval_tokens=2 * T, minutes=3,
                               device="cpu", cache_score="recall")  # no fit of the cache's score to reserve time for
    out = tmp_path / "run"
    c = Conversion(settings, out, RunState(out, settings, resume=False), None, None, False, lambda *a: None)
    load_inputs(c)
    plan = json.loads((out / "progress.json").read_text())["results"]["plan"]
    assert plan["transfer_tokens"] > 0 and plan["lora_tokens"] > 0 and plan["budget_s"] == 180
    assert (plan["teacher_row_s"], plan["transfer_row_s"]) == (1.0, 2.0)
    assert len(c.train1) == plan["transfer_tokens"] // T and len(c.train2) == plan["lora_tokens"] // T

    # a resumed run reads the recorded plan back, however fast the machine is now
    monkeypatch.setattr(budget, "probe", lambda *a: pytest.fail("a resumed run must not probe again"))
    again = ConvertSettings(**{**settings.__dict__, "transfer_tokens": ConvertSettings().transfer_tokens,
                               "lora_tokens": ConvertSettings().lora_tokens})
    c2 = Conversion(again, out, RunState(out, again, resume=True), None, None, False, lambda *a: None)
    load_inputs(c2)
    assert (again.transfer_tokens, again.lora_tokens) == (plan["transfer_tokens"], plan["lora_tokens"])
    with pytest.raises(LinearizeError, match="minutes"):
        RunState(out, ConvertSettings(**{**again.__dict__, "minutes": 5}), resume=True)


def test_minutes_on_a_tiny_budget_fails_before_training(model_dir, tmp_path, monkeypatch):
    data = write_word_jsonl(tmp_path / "data.jsonl", lines=3000)
    monkeypatch.setattr(budget, "probe", lambda *a: (5.0, 10.0))  # a slow machine
    settings = ConvertSettings(model=str(model_dir), data=str(data), seq_len=T, eval_tokens=2 * T, minutes=0.5,
                               device="cpu")
    out = tmp_path / "run"
    c = Conversion(settings, out, RunState(out, settings, resume=False), None, None, False, lambda *a: None)
    with pytest.raises(LinearizeError, match="too small for one training step"):
        load_inputs(c)


def test_a_stage2_step_is_timed_on_a_copy(tiny_teacher):
    import copy

    model = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), attention_preset("lolcats", window=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seconds = budget.time_lora_step(model, torch.randint(0, 320, (2, T)), LoraSettings(rank=2), lr=1e-2)
    assert seconds > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any("lora_" in k for k in after)


class StopBeforeTraining(Exception):
    pass


def test_stage2_is_replanned_from_a_real_step_and_resume_keeps_it(model_dir, tmp_path, monkeypatch):
    """The plan prices a stage-2 step at teacher + 2 stage-1 steps (5 s here); a real step that takes 10 s halves
    stage 2's rows, so the run still ends on time; a resumed run reads the new count back."""
    data = write_word_jsonl(tmp_path / "data.jsonl", lines=3000)
    monkeypatch.setattr(budget, "probe", lambda *a: (1.0, 2.0))
    settings = ConvertSettings(model=str(model_dir), data=str(data), seq_len=T, eval_tokens=2 * T, minutes=3,
                               device="cpu", cache_score="recall")  # no fit of the cache's score to reserve time for
    out = tmp_path / "run"

    def conversion(resume):
        c = Conversion(ConvertSettings(**settings.__dict__), out, RunState(out, settings, resume=resume), None, None,
                       False, lambda *a: None)
        load_inputs(c)
        c.model = None  # stage 2 is stopped before it trains (below)
        return c

    seen = []

    def no_training(model, sequences, *a, **k):
        seen.append(len(sequences))
        raise StopBeforeTraining

    monkeypatch.setattr(stages, "finetune_lora", no_training)
    monkeypatch.setattr(budget, "time_lora_step", lambda *a: 10.0)
    c = conversion(resume=False)
    planned = c.results["plan"]["lora_tokens"] // T
    assert c.results["plan"]["lora_row_s"] == 5.0 and planned >= 4
    planned_rows = c.train2.clone()
    with pytest.raises(StopBeforeTraining):
        finetune(c)
    replan = json.loads((out / "progress.json").read_text())["results"]["stage2_plan"]
    assert replan["lora_row_s"] == 10.0 and replan["lora_tokens"] // T in (planned // 2, planned // 2 - 1)
    assert seen == [replan["lora_tokens"] // T] and c.settings.lora_tokens == replan["lora_tokens"]
    assert torch.equal(c.train2, planned_rows[: len(c.train2)])  # the same stage-2 rows, fewer of them

    monkeypatch.setattr(budget, "time_lora_step", lambda *a: pytest.fail("a resumed run must not time again"))
    with pytest.raises(StopBeforeTraining):
        finetune(conversion(resume=True))
    assert seen[-1] == seen[0]
