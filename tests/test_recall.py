"""Recall: the multi-key prompts and their scoring, decoding that continues a copied state, layers switched back to
the teacher's attention and the recall ranking of layers."""

import copy
import re

import pytest
import torch

from linearize.generate.decoding import Decoder
from linearize.errors import LinearizeError
from linearize.evaluate import passkey, recall_layers
from linearize.evaluate.passkey import (MULTIKEY_QUESTION, NAMES, asked_needles, multikey_accuracy,
                                        multikey_haystack, n_tokens)
from linearize.evaluate.recall_layers import rank_layers_for_recall, teacher_attention
from linearize.layers.linear_attention import LinearAttentionConfig
from linearize.models.linearized import LinearizedForCausalLM

from conftest import tiny_llama_config


def four_layer_pair(window=4):
    """(teacher, student): the student's q/k/v/o weights are moved off the teacher's, as a merged LoRA would."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(num_hidden_layers=4)).eval()
    student = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), LinearAttentionConfig(window=window,
                                                                                               chunk_size=8)).eval()
    with torch.no_grad():
        for attn in student.attention_modules():
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.weight.add_(0.05 * torch.randn_like(proj.weight))
    return teacher, student


@pytest.mark.parametrize("k", [4, 16])
def test_multikey_haystack_hides_every_key_at_spread_depths(tiny_tokenizer, k):
    import random

    haystack, pairs = multikey_haystack(tiny_tokenizer, 2000, k, random.Random(0))
    prompt = haystack + MULTIKEY_QUESTION.format(name=pairs[0][0])
    assert abs(n_tokens(tiny_tokenizer, prompt) - 2000) < 60
    assert len({n for n, _ in pairs}) == k and all(n in NAMES for n, _ in pairs)
    positions = [haystack.index(f"The code for {n} is {v}.") for n, v in pairs]
    assert positions == sorted(positions)  # depth order, spread over the haystack
    assert positions[0] / len(haystack) < 0.6 / k + 0.05 and positions[-1] / len(haystack) > 1 - 0.6 / k - 0.05
    for h in range(5):  # the questions of one haystack ask distinct needles, all of them keys of the haystack
        asked = asked_needles(h, k, min(4, k))
        assert len(set(asked)) == len(asked) == min(4, k) and all(0 <= j < k for j in asked)


def reader(tokenizer, shift: int, read=None):
    """A fake Decoder class that answers by reading the asked code (or pass key) out of the context it was
    prefilled with, plus `shift`; read(question, context) -> the number, for other questions
    (test_real_recall.py)."""

    class Reader:
        def __init__(self, model):
            self.cache = None

        def prefill(self, ids, state=None):
            if state is None:  # the context
                self.cache = {"context": tokenizer.decode(ids[0])}
                return None
            assert state == self.cache and state is not self.cache  # the question continues a copy of its state
            if read is not None:
                return read(tokenizer.decode(ids[0]), state["context"])
            name = re.search(r"code for (\w+)\?", tokenizer.decode(ids[0]))
            pattern = rf"code for {name.group(1)} is (\d+)" if name else r"pass key is (\d+)"
            return int(re.search(pattern, state["context"]).group(1))  # stands for the next-token logits

        def tokens(self, code, n, eos_token_id=None):
            yield from tokenizer(f" {code + shift}. More text", add_special_tokens=False).input_ids[:n]

    return Reader


@pytest.mark.parametrize("shift, expected", [(0, 1.0), (1, 0.0)])
def test_scoring_counts_a_reader_that_finds_the_asked_code_and_one_that_does_not(tiny_tokenizer, monkeypatch,
                                                                                 shift, expected):
    monkeypatch.setattr(passkey, "Decoder", reader(tiny_tokenizer, shift))
    r = multikey_accuracy(None, tiny_tokenizer, [4, 16], [300, 600], trials=6)
    assert r["accuracy"] == {"4": [expected] * 2, "16": [expected] * 2}
    assert r["trials"] == 6 and r["tokens"]["4"][0] < r["tokens"]["4"][1]
    pk = passkey.passkey_accuracy(None, tiny_tokenizer, [200], trials=3)
    assert pk["accuracy"] == [expected]


def test_multikey_rewrite_asks_the_same_questions_of_another_text(tiny_tokenizer, monkeypatch):
    """multikey_accuracy(rewrite=...) prefills rewrite(haystack, pairs) instead of each haystack (the ceiling
    script's shortened haystacks): the pairs are those hidden in it, and the questions and scoring are unchanged."""
    monkeypatch.setattr(passkey, "Decoder", reader(tiny_tokenizer, 0))
    seen = []

    def needles_only(haystack, pairs):
        assert all(f"The code for {name} is {code}." in haystack for name, code in pairs)
        seen.append(pairs)
        return "".join(f"The code for {name} is {code}. " for name, code in pairs)

    plain = multikey_accuracy(None, tiny_tokenizer, [4], [600], trials=6)
    short = multikey_accuracy(None, tiny_tokenizer, [4], [600], trials=6, rewrite=needles_only)
    assert short["accuracy"] == plain["accuracy"] == {"4": [1.0]} and len(seen) == 2
    assert short["tokens"]["4"][0] < plain["tokens"]["4"][0] / 4


@pytest.mark.parametrize("text, done", [("", False), (" is", False), (" 1", False), (" 12345", False),
                                        (" 12345.", True), (" 13", True), (" 123456", True), (" 1234 5", True)])
def test_decoding_stops_once_the_first_number_decides_the_trial(text, done):
    from linearize.evaluate.passkey import decided

    assert decided(text, "12345") == done


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_decoding_continues_a_copied_state_as_one_prompt(which):
    teacher, student = four_layer_pair()
    model = teacher if which == "teacher" else student
    ids = torch.randint(0, 320, (1, 45), generator=torch.Generator().manual_seed(1))
    dec = Decoder(model)
    whole = dec.prefill(ids)
    dec.prefill(ids[:, :30])
    saved = dec.cache
    for _ in range(2):  # the same copy twice: continuing must not change the saved state
        torch.testing.assert_close(dec.prefill(ids[:, 30:], state=copy.deepcopy(saved)), whole, rtol=1e-4, atol=1e-5)


def test_all_layers_switched_is_the_teacher_and_the_switch_is_undone():
    teacher, student = four_layer_pair()
    x = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, before = teacher(x).logits, student(input_ids=x).logits
        assert (before - expected).abs().max() > 1e-2  # the student differs, projections included
        with teacher_attention(student, teacher, [0, 1, 2, 3]):
            torch.testing.assert_close(student(input_ids=x).logits, expected, rtol=1e-4, atol=1e-5)
            dec = Decoder(student)  # decoding with a KV cache in every switched layer: the teacher's next token
            torch.testing.assert_close(dec.prefill(x), expected[:, -1], rtol=1e-4, atol=1e-5)
        with teacher_attention(student, teacher, [2]):
            one = student(input_ids=x).logits
            assert (one - before).abs().max() > 1e-3 and (one - expected).abs().max() > 1e-3
        torch.testing.assert_close(student(input_ids=x).logits, before)
    with pytest.raises(LinearizeError, match="no linear part"):
        with teacher_attention(student, teacher, [7]):
            pass


def test_recall_ranking_is_a_permutation_ordered_by_the_gain(tiny_tokenizer, monkeypatch):
    """(The script test below runs the real probe.)"""
    teacher, student = four_layer_pair()
    worth = {0: 0.5, 1: 3.0, 2: -1.0, 3: 2.0}  # a scorer that rewards the switched layers by these amounts

    def scored(model, probes):
        return sum(w for i, w in worth.items() if not model.attention_modules()[i].config.linear)

    monkeypatch.setattr(recall_layers, "answer_logprob", scored)
    order, gains = rank_layers_for_recall(student, teacher, tiny_tokenizer, probes=1, length=60, progress=False)
    assert order == [1, 3, 0, 2] and gains == worth


def test_probe_prompts_are_not_the_eval_prompts(tiny_tokenizer):
    from linearize.evaluate.recall_layers import probe_prompts

    probes = probe_prompts(tiny_tokenizer, 3, 300)
    assert len(probes) == 3
    for prompt, answer in probes:
        text = tiny_tokenizer.decode(prompt[0])
        assert tiny_tokenizer.decode(answer[0]).strip() in text
        assert passkey.FILLER.split(". ")[0] not in text and "pass key" not in text and "code for" not in text


def test_kv_cache_bytes_from_the_config_are_what_a_prefill_holds():
    from linearize.evaluate.baseline import kv_cache_bytes, state_bytes

    teacher, _ = four_layer_pair()
    assert kv_cache_bytes(teacher.config, 50, 4) == state_bytes(teacher, 50) == 2 * 4 * 2 * 16 * 50 * 4


def test_kv_cache_bytes_count_a_sliding_window_layer_at_its_window():
    from test_architectures import teacher_for

    from linearize.evaluate.baseline import kv_cache_bytes, state_bytes

    teacher = teacher_for("gemma3_text")  # local window 8 in layers 0 and 2 of 4
    for context in (5, 40):
        assert kv_cache_bytes(teacher.config, context, 4) == state_bytes(teacher, context)
    assert kv_cache_bytes(teacher.config, 40, 4) < 2 * 4 * 2 * 16 * 40 * 4


def run_recall_table(tiny_converted, tmp_path, *options):
    """evaluate/recall_table.py's main (scripts/recall_table.py) on a copy of the tiny run (its held-out text a
    small .jsonl, a made-up
    layer_mse), at the small sizes below plus `options`; returns (recall.json, its path)."""
    import json
    import shutil

    from conftest import write_word_jsonl

    run = tmp_path / "run"
    shutil.copytree(tiny_converted[0], run)
    data = write_word_jsonl(tmp_path / "data.jsonl", lines=3000)
    settings = json.loads((run / "convert.json").read_text())["settings"]
    (run / "convert.json").write_text(json.dumps({"settings": {**settings, "data": str(data)},
                                                  "layer_mse": [0.2, 0.1]}))
    from linearize.evaluate import recall_table

    out = tmp_path / "recall.json"
    recall_table.main(["--run", str(run), "--keep", "0,1,2", "--trials", "1", "--passkey-lengths", "100",
                 "--multikey-lengths", "120", "--multikey-keys", "2", "--state-contexts", "64,256",
                 "--ppl-sequences", "1", "--probes", "1", "--probe-length", "80", "--out", str(out), *options])
    res = json.loads(out.read_text())  # one entry per variant, and "about"
    return {"variants": {k: v for k, v in res.items() if k != "about"}, **res["about"]}, out


def test_recall_table_script_writes_every_variant_in_the_schema(tiny_converted, tmp_path):
    res, out = run_recall_table(tiny_converted, tmp_path, "--select", "recall,first", "--device", "cpu", "--cache", "4")
    v = res["variants"]
    assert set(v) == {"teacher", "student", "recall-k1", "recall-k2", "first-k1", "first-k2"}
    for r in v.values():
        assert set(r["passkey"]) == {"100"} and set(r["multikey"]) == {"2"} and set(r["multikey"]["2"]) == {"120"}
        assert set(r["state_bytes"]) == {"64", "256"} and r["ppl"] > 1
    assert v["student"]["state_bytes"]["64"] == v["student"]["state_bytes"]["256"]  # constant decoding state
    from linearize.evaluate.baseline import state_bytes
    from linearize.loading.student import load_student

    plain = state_bytes(load_student(tiny_converted[0])[0], 64)
    assert v["student"]["state_bytes"]["64"] > plain  # --cache 4: the linear layers keep 4 exact keys too
    assert v["teacher"]["state_bytes"]["256"] == 4 * v["teacher"]["state_bytes"]["64"]
    assert v["recall-k2"]["state_bytes"]["256"] > v["recall-k2"]["state_bytes"]["64"]  # KV caches in both layers
    # every layer exact: the teacher to float error; the student (linear memory) differs, if only by ~1e-5 on this
    # random tiny model
    assert v["recall-k2"]["ppl"] == pytest.approx(v["teacher"]["ppl"], rel=1e-6) != v["student"]["ppl"]
    assert v["first-k2"]["same_as"] == "recall-k2" and sorted(res["ranking"]["recall"]["order"]) == [0, 1]
    assert "| recall-k1 |" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recall_table_script_on_cuda_in_bfloat16(tiny_converted, tmp_path):
    """What the GPU run uses: --device cuda --dtype bfloat16, layers chosen by transfer error (a run's layer_mse)."""
    res, _ = run_recall_table(tiny_converted, tmp_path, "--select", "transfer,recall", "--device", "cuda",
                              "--dtype", "bfloat16")
    v = res["variants"]
    assert res["device"]["dtype"] == "bfloat16" and res["device"]["device"].startswith("cuda")
    assert v["transfer-k1"]["softmax_layers"] == [0] and res["ranking"]["transfer"]["order"] == [0, 1]
    assert v["student"]["state_bytes"]["64"] == v["student"]["state_bytes"]["256"]
    assert v["teacher"]["state_bytes"]["64"] == 2 * 2 * 2 * 16 * 64 * 2  # bf16 KV cache from the config
    assert v["transfer-k2"]["ppl"] == pytest.approx(v["teacher"]["ppl"], rel=0.05)


def test_a_run_loads_entirely_in_the_asked_dtype(tiny_converted):
    """--dtype bfloat16 puts every weight of the student in bfloat16 (the teacher's skeleton was left in float32),
    so a layer switched to the teacher's bfloat16 attention fits the student's activations."""
    from linearize.loading.student import load_student

    student, _ = load_student(tiny_converted[0], "cpu", torch.bfloat16)
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}


def test_cache_every_sets_how_many_keys_the_state_reserves(tiny_converted):
    """load_student with TrainingFree(cache=M, cache_every=N) (`linearize eval --cache M --cache-every N`): every
    linear layer re-selects every N tokens, so its state reserves M + N - 1 cached keys per KV head: the bytes fall
    with N by exactly the keys of the difference, each layer the same, and the settings are recorded in the
    config."""
    from linearize.evaluate.baseline import state_bytes
    from linearize.loading.student import load_student
    from linearize.training_free import TrainingFree

    size = {}
    for every in (2, 8):
        student, _ = load_student(tiny_converted[0],
                                  training_free=TrainingFree(cache=4, cache_every=every, cache_position="packed"))
        assert {(m.spec.cache, m.spec.cache_every, m.spec.cache_packed) for m in student.attention_modules()
                if m.config.linear} == {(4, every, True)}
        assert student.config.attention["cache_every"] == every
        size[every] = state_bytes(student, 64)
    linear = [m for m in student.attention_modules() if m.config.linear]
    per_key = sum(m.num_kv_heads * (2 * m.head_dim * 4 + 4) for m in linear)  # k, v in float32, an int32 position
    assert size[8] - size[2] == (8 - 2) * per_key


def test_recall_table_merges_real_text_rows_and_keeps_them_on_resume(tiny_converted, tmp_path):
    """--real-text EVAL_JSON puts an eval.json's part realrecall into recall.json as 'real_text' (not a variant) and
    a table into recall.md; a later --resume run keeps it and measures no 'real_text' variant."""
    import json

    from linearize.errors import LinearizeError
    from linearize.evaluate import recall_table

    res, out = run_recall_table(tiny_converted, tmp_path, "--select", "first", "--keep", "0", "--device", "cpu")
    rr = {"keys": [1], "lengths": [1024, 2048], "trials": 2, "texts": {"python-docs": {}}, "window": 9, "sinks": 4,
          "models": {who: {"accuracy": {"1": acc}} for who, acc in
                     (("teacher", [1.0, 0.5]), ("student", [0.5, 0.0]), ("streaming", [0.0, 0.0]))}}
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps({"model": "RUN", "settings": {"recall_texts": ["python-docs"], "recall_lengths":
                                                            [1024, 2048], "recall_keys": [1], "recall_trials": 2},
                              "realrecall": rr}))
    recall_table.main(["--real-text", str(ev), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert set(merged) == {"teacher", "student", "about", "real_text"}
    assert merged["teacher"] == {k: v for k, v in res["variants"]["teacher"].items()}
    assert merged["real_text"]["models"]["student"]["accuracy"]["1"] == [0.5, 0.0]
    assert "--recall-lengths 1024,2048 --recall-keys 1 --recall-trials 2" in merged["real_text"]["command"]
    md = out.with_suffix(".md").read_text()
    assert "| student |" in md and "| student | 50% | 0% |" in md and "| teacher | 100% | 50% |" in md
    recall_table.main(["--run", res["run"], "--select", "first", "--keep", "0", "--trials", "1", "--passkey-lengths",
                       "100", "--multikey-lengths", "120", "--multikey-keys", "2", "--state-contexts", "64,256",
                       "--ppl-sequences", "1", "--out", str(out), "--resume", "--device", "cpu"])
    again = json.loads(out.read_text())
    assert again["real_text"] == merged["real_text"] and set(again) == set(merged)
    assert "| student | 50% | 0% |" in out.with_suffix(".md").read_text()
    ev.write_text(json.dumps({"model": "RUN"}))
    with pytest.raises(LinearizeError, match="no part realrecall"):
        recall_table.main(["--real-text", str(ev), "--out", str(out)])


def test_recall_table_adds_eval_cells_with_their_command_and_refuses_other_settings(tiny_converted, tmp_path):
    """--cells EVAL_JSON adds an eval.json's passkey and multi-key cells to the teacher and student rows (a teacher's
    None, beyond its context, left out), records each cell's command and trials, lists them under recall.md's table,
    and refuses an eval of the student with other training-free settings than the table's."""
    import json

    from linearize.errors import LinearizeError
    from linearize.evaluate import recall_table

    res, out = run_recall_table(tiny_converted, tmp_path, "--select", "first", "--keep", "0", "--device", "cpu")
    ev = tmp_path / "eval.json"
    settings = {"passkey_lengths": [32768], "passkey_trials": 3, "multikey_keys": [4], "multikey_lengths": [8192],
                "multikey_trials": 2}
    ev.write_text(json.dumps({"model": "RUN", "settings": settings,
                              "passkey": {"lengths": [32768], "trials": 3, "teacher": [None], "student": [2 / 3]},
                              "multikey": {"keys": [4], "lengths": [8192], "trials": 2, "teacher": {"4": [1.0]},
                                           "student": {"4": [0.5]}}}))
    recall_table.main(["--cells", str(ev), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert merged["student"]["passkey"]["32768"] == 2 / 3 and "32768" not in merged["teacher"]["passkey"]
    assert merged["student"]["multikey"]["4"]["8192"] == 0.5 and merged["teacher"]["multikey"]["4"]["8192"] == 1.0
    assert merged["student"]["passkey"]["100"] == res["variants"]["student"]["passkey"]["100"]  # earlier cells kept
    source = merged["student"]["cells_from"]["passkey 32768"]
    assert source["trials"] == 3 and "--passkey-lengths 32768 --passkey-trials 3" in source["command"]
    assert "passkey 32768" not in merged["teacher"].get("cells_from", {})
    md = out.with_suffix(".md").read_text()
    student_line = next(line for line in md.splitlines() if line.startswith("| student |"))
    assert "| passkey 32768 |" in md and "| 67% |" in student_line
    assert "- multikey 4 8192 (teacher, student; 2 trials)" in md
    ev.write_text(json.dumps({"model": "RUN", "settings": {**settings, "cache_position": "packed"},
                              "passkey": {"lengths": [32768], "trials": 3, "teacher": [None], "student": [1.0]}}))
    with pytest.raises(LinearizeError, match="rerun eval with the table's flags"):
        recall_table.main(["--cells", str(ev), "--out", str(out)])
    assert json.loads(out.read_text()) == merged
    ev.write_text(json.dumps({"model": "RUN"}))
    with pytest.raises(LinearizeError, match="no part passkey or multikey"):
        recall_table.main(["--cells", str(ev), "--out", str(out)])


def test_recall_markdown_shows_a_length_only_the_student_was_asked():
    """A teacher row kept by --resume may lack a length measured later (or one beyond its context): the table has
    the column, the teacher's cell "-"."""
    from linearize.evaluate.recall_table import markdown

    row = {"softmax_layers": [], "ppl": 9.0, "state_bytes": {"1024": 2**20}}
    result = {"run": "r", "device": {"name": "cpu", "dtype": "float32"}, "settings": {"trials": 10}, "variants": {
        "teacher": {**row, "passkey": {"1024": 1.0}, "multikey": {"4": {"4096": 0.5}}},
        "student": {**row, "passkey": {"1024": 1.0, "16384": 0.9}, "multikey": {"4": {"4096": 0.3, "8192": 0.2}}}}}
    table = markdown(result)
    assert "| passkey 1024 | passkey 16384 | 4 keys 4096 | 4 keys 8192 |" in table
    assert "| teacher | all | 9.000 | 100% | - | 50% | - | 1.00 |" in table
    assert "| student | - | 9.000 | 100% | 90% | 30% | 20% | 1.00 |" in table
