"""linearize eval: agreement metrics, evaluation texts, passkey, the lm-eval MMLU task and the command."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from linearize.cli import main
from linearize.errors import LinearizeError
from linearize.evaluate.agreement import agreement
from linearize.evaluate.mmlu import GROUP, mmlu_accuracy, write_tasks
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.run_folder import teacher_spec
from linearize.evaluate.passkey import passkey_accuracy, passkey_prompt
from linearize.evaluate.texts import eval_sequences, shakespeare_documents
from linearize.layers.linear_attention import LinearAttentionConfig, attention_preset
from linearize.models.linearized import LinearizedForCausalLM

from conftest import write_word_jsonl


@pytest.fixture(scope="module")
def pair(tiny_converted):
    student, tokenizer = load_student(tiny_converted[0])
    teacher, _ = load_teacher_of(tiny_converted[0])
    return teacher, student, tokenizer


def test_teacher_comes_from_convert_json(tiny_converted):
    student_dir, teacher_dir = tiny_converted
    assert teacher_spec(student_dir) == str(teacher_dir)
    assert teacher_spec(student_dir, "other") == "other"
    assert teacher_spec(teacher_dir) is None  # no convert.json: the bundled model


def test_compare_model_with_itself_agrees_exactly(pair):
    teacher, student, _ = pair
    rows = torch.randint(300, (2, 33), generator=torch.Generator().manual_seed(0))
    same = agreement(teacher, teacher, rows, progress=False)
    assert same["tokens"] == 64 and same["top1"] == 1.0 and abs(same["kl"]) < 1e-6
    assert same["teacher_ppl"] == pytest.approx(same["student_ppl"])
    diff = agreement(teacher, student, rows, progress=False)
    assert diff["kl"] >= 0 and 0 <= diff["top1"] <= 1 and diff["teacher_ppl"] == pytest.approx(same["teacher_ppl"])


@pytest.mark.parametrize("name", ["sharegpt", "shakespeare", "python-docs"])
def test_eval_texts_are_fixed_token_rows(name, tiny_tokenizer):
    a = eval_sequences(name, tiny_tokenizer, 64, 3)
    assert a.shape == (3, 64) and a.dtype == torch.long
    assert torch.equal(a, eval_sequences(name, tiny_tokenizer, 64, 3))


def test_shakespeare_text_has_no_markdown_marks():
    hamlet = shakespeare_documents()[0]
    assert "HAMLET" in hamlet and "**" not in hamlet


def test_unknown_text_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(LinearizeError, match="'klingon' is neither one of sharegpt, shakespeare, python-docs nor an"):
        eval_sequences("klingon", tiny_tokenizer, 64, 1)


def test_own_text_files_are_read_like_data(tiny_tokenizer, tmp_path):
    from linearize.data import pack_sequences

    words = write_word_jsonl(tmp_path / "words.jsonl", lines=40)
    txt = tmp_path / "words.txt"
    txt.write_text("\n\n".join(json.loads(line)["text"] for line in words.read_text().splitlines()))
    for path in (words, txt):
        rows = eval_sequences(str(path), tiny_tokenizer, 32, 3)
        assert rows.shape == (3, 32)
        everything = pack_sequences(str(path), tiny_tokenizer, 32, 3, heldout_percent=0)  # no held-out split
        assert torch.equal(rows, everything)
    assert not torch.equal(eval_sequences(str(words), tiny_tokenizer, 32, 3), eval_sequences(str(txt), tiny_tokenizer, 32, 3))


def test_prompt_files(tiny_tokenizer, tmp_path):
    from linearize.evaluate.generation import file_prompts

    lines = tmp_path / "prompts.txt"
    lines.write_text("hello world\n\nthe quick brown fox\nlinear attention\n")
    assert [tiny_tokenizer.decode(p[0]) for p in file_prompts(str(lines), tiny_tokenizer, 2)] == [
        "hello world", "the quick brown fox"]
    chats = tmp_path / "prompts.jsonl"
    chats.write_text("\n".join(json.dumps(r) for r in [
        {"text": "hello"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello, how can I help?"},
                      {"role": "user", "content": "more"}]}]))
    templated = tiny_tokenizer.__class__(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<eos>")
    templated.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}assistant:{% endif %}")
    assert [templated.decode(p[0]) for p in file_prompts(str(chats), templated, 5)] == [
        "user: hello\nassistant:", "user: hi\nassistant:"]  # a chat's prompt: its turns before the first answer
    for bad, match in (("missing.txt", "not found"), ("prompts.csv", "is not .txt or .jsonl")):
        (tmp_path / "prompts.csv").write_text("x")
        with pytest.raises(LinearizeError, match=match):
            file_prompts(str(tmp_path / bad), tiny_tokenizer, 1)


def test_passkey_prompt_hides_the_key_at_the_depth(tiny_tokenizer):
    prompt = passkey_prompt(tiny_tokenizer, 3000, 0.25, 12345)
    n = len(tiny_tokenizer(prompt).input_ids)
    assert abs(n - 3000) < 100 and prompt.count("12345") == 2 and prompt.endswith("The pass key is")
    assert 0.15 < prompt.index("12345") / len(prompt) < 0.35


def test_passkey_accuracy_runs_for_teacher_and_student(pair):
    teacher, student, tokenizer = pair
    for model in (teacher, student):
        r = passkey_accuracy(model, tokenizer, [300, 600], trials=2)
        assert r["lengths"] == [300, 600] and len(r["accuracy"]) == 2 and all(0 <= a <= 1 for a in r["accuracy"])
        assert r["tokens"][0] < r["tokens"][1]


def test_a_teacher_is_not_asked_beyond_its_context_and_a_student_is(pair, monkeypatch):
    """A length above the teacher's max_position_embeddings is not asked of it (None), every length is asked of
    the linearized student, whose state does not grow."""
    from linearize.evaluate import passkey

    teacher, student, tokenizer = pair
    assert passkey.context_limit(teacher) == teacher.config.max_position_embeddings
    assert passkey.context_limit(student) is None
    asked = []
    real = passkey.ask_haystacks
    monkeypatch.setattr(passkey, "ask_haystacks", lambda m, t, hs: asked.append(m) or real(m, t, hs))
    pk = passkey.passkey_accuracy(teacher, tokenizer, [300, 600], trials=1, limit=400)
    assert pk["accuracy"][1] is None and pk["tokens"][1] is None and 0 <= pk["accuracy"][0] <= 1 and len(asked) == 1
    mk = passkey.multikey_accuracy(teacher, tokenizer, [2], [300, 600], trials=1, limit=400)
    assert mk["accuracy"]["2"][1] is None and mk["accuracy"]["2"][0] is not None and len(asked) == 2
    mk = passkey.multikey_accuracy(student, tokenizer, [2], [300, 600], trials=1, limit=passkey.context_limit(student))
    assert None not in mk["accuracy"]["2"] and len(asked) == 4


def test_passkey_scores_a_reader_that_finds_the_key_and_one_that_does_not(pair, monkeypatch):
    """The scoring can fail: a decoder that reads the planted key back out of the prompt scores 1, one that answers
    a nearby number scores 0 (and the prompt it is given holds the trial's key)."""
    import re

    from linearize.evaluate import passkey

    teacher, _, tokenizer = pair
    for shift, expected in ((0, 1.0), (1, 0.0)):
        class Reader:  # the prompt's context is prefilled, the question continues (a copy of) its state
            def __init__(self, model):
                self.cache = None

            def prefill(self, ids, state=None):
                self.cache = [tokenizer.decode(ids[0])] if state is None else state
                return None if state is None else int(re.findall(r"pass key is (\d+)", state[0])[0])

            def tokens(self, key, n, eos_token_id=None):
                yield from tokenizer(f" {key + shift}.", add_special_tokens=False).input_ids

        monkeypatch.setattr(passkey, "Decoder", Reader)
        r = passkey_accuracy(teacher, tokenizer, [120, 300], trials=3)
        assert r["accuracy"] == [expected, expected]


def test_mmlu_tasks_have_five_shot_dev_split(tmp_path):
    tasks = write_tasks(tmp_path, ["virology", "abstract algebra"])
    assert tasks == [f"{GROUP}_abstract_algebra", f"{GROUP}_virology"]
    config = json.loads((tmp_path / f"{tasks[1]}.yaml").read_text())
    dev = config["dataset_kwargs"]["data_files"]["dev"]
    rows = [json.loads(line) for line in open(dev)]
    assert len(rows) == 5 and set(rows[0]) == {"question", "choices", "answer"} and len(rows[0]["choices"]) == 4
    assert sum(1 for _ in open(config["dataset_kwargs"]["data_files"]["test"])) == 166 - 5
    with pytest.raises(LinearizeError, match="unknown MMLU subjects"):
        write_tasks(tmp_path, ["klingon"])


def mmlu_prompts(folder, subject: str, limit: int) -> list[tuple[str, int]]:
    """(5-shot prompt, index of the right answer) of the first `limit` test questions of `subject`, written out
    here as lm-eval's `mmlu` task builds them: the description, then the 5 dev questions each followed by " X" (its
    answer) and a blank line, then the question; the choices are the continuations " A" .. " D"."""
    task = write_tasks(folder, [subject])[0]
    config = json.loads((folder / f"{task}.yaml").read_text())
    dev, test = ([json.loads(line) for line in open(config["dataset_kwargs"]["data_files"][split])]
                 for split in ("dev", "test"))

    def text(q):
        return q["question"].strip() + "".join(f"\n{c}. {a}" for c, a in zip("ABCD", q["choices"])) + "\nAnswer:"

    shots = "".join(f"{text(q)} {'ABCD'[q['answer']]}\n\n" for q in dev)
    return [(config["description"] + shots + text(q), q["answer"]) for q in test[:limit]]


def test_mmlu_runs_through_lm_eval(pair, tmp_path):
    """Through the harness, the teacher scores what its log-likelihoods of " A" .. " D" after each prompt give
    (computed here), and a student made to know every answer (a hook raises the right letter's logit where the
    input is a test prompt) scores 1."""
    import torch.nn.functional as F

    teacher, student, tokenizer = pair
    prompts = mmlu_prompts(tmp_path, "virology", 4)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    choices = []  # per prompt: (its tokens, [tokens of each continuation " A" .. " D"])
    for prompt, _ in prompts:
        context = encode(prompt)
        choices.append((context, [encode(f"{prompt} {c}")[len(context):] for c in "ABCD"]))

    with torch.no_grad():
        picks = []
        for context, continuations in choices:
            scores = []
            for cont in continuations:
                logp = F.log_softmax(teacher(torch.tensor([context + cont[:-1]])).logits[0, len(context) - 1:], -1)
                scores.append(sum(logp[i, t].item() for i, t in enumerate(cont)))
            picks.append(max(range(4), key=scores.__getitem__))
    expected = sum(pick == answer for pick, (_, answer) in zip(picks, prompts)) / len(prompts)

    def knows_the_answer(module, args, kwargs, out):
        ids = (args[0] if args else kwargs["input_ids"])[0].tolist()
        for (context, continuations), (_, answer) in zip(choices, prompts):
            if ids[: len(context)] == context:
                for i, t in enumerate(continuations[answer][: len(ids) - len(context) + 1]):
                    out.logits[0, len(context) - 1 + i, t] += 1e4
        return out

    handle = student.register_forward_hook(knows_the_answer, with_kwargs=True)
    try:
        r = mmlu_accuracy({"teacher": teacher, "student": student}, tokenizer, limit=4, subjects=["virology"])
    finally:
        handle.remove()
    assert r["questions"] == 4 and r["num_fewshot"] == 5
    assert r["teacher"]["acc"] == pytest.approx(expected) and r["teacher"]["subjects"] == {"virology": r["teacher"]["acc"]}
    assert r["student"]["acc"] == 1 and expected < 1


def test_mmlu_of_a_model_that_always_answers_a_is_the_share_of_as(pair, tmp_path):
    """A model forced to answer "A" scores exactly the share of questions whose answer is A."""
    teacher, _, tokenizer = pair
    a_tokens = tokenizer(" A", add_special_tokens=False).input_ids

    def always_a(module, args, out):
        out.logits[..., a_tokens] += 1e4
        return out

    handle = teacher.register_forward_hook(always_a)
    try:
        r = mmlu_accuracy({"teacher": teacher}, tokenizer, limit=8, subjects=["virology"])
    finally:
        handle.remove()
    tasks = write_tasks(tmp_path, ["virology"])
    config = json.loads((tmp_path / f"{tasks[0]}.yaml").read_text())
    answers = [json.loads(line)["answer"] for line in open(config["dataset_kwargs"]["data_files"]["test"])][:8]
    share = answers.count(0) / len(answers)
    assert 0 < share < 1  # the subject mixes answers, so the check can fail
    assert r["teacher"]["acc"] == pytest.approx(share)


def test_eval_command_writes_eval_json(tiny_converted, capsys):
    student_dir = tiny_converted[0]
    rc = main(["eval", str(student_dir), "--seq-len", "64", "--sequences", "2", "--layer-sequences", "1",
               "--passkey-lengths", "200", "--passkey-trials", "1", "--multikey-keys", "2,4",
               "--multikey-lengths", "150,250", "--multikey-trials", "2", "--generation-prompts", "3",
               "--generation-tokens", "6", "--skip", "mmlu,long,realrecall", "--no-progress"])
    assert rc == 0
    res = json.loads((student_dir / "eval.json").read_text())
    assert set(res["texts"]) == {"sharegpt", "shakespeare", "python-docs"}
    assert all(len(v) == 2 for v in res["layer_mse"].values())
    assert res["passkey"]["lengths"] == [200] and "mmlu" not in res
    mk = res["multikey"]
    assert mk["keys"] == [2, 4] and mk["lengths"] == [150, 250] and mk["trials"] == 2
    assert all(len(mk[who][k]) == 2 and all(0 <= a <= 1 for a in mk[who][k]) for who in ("teacher", "student")
               for k in ("2", "4"))
    base = res["baseline"]
    assert set(base["texts"]) == set(res["texts"]) and base["attention"] == "streaming"
    assert base["state_bytes"] <= base["student_state_bytes"]
    assert set(base["memory_off"]["texts"]) == set(res["texts"])  # the student with its memory switched off
    assert all(base["memory_off"]["texts"][n]["student_ppl"] != res["texts"][n]["student_ppl"] for n in res["texts"])
    assert res["generation"]["prompts"] == 3 and set(res["generation"]["repetition"]) == {"teacher", "student"}
    out = capsys.readouterr().out
    assert "top-1" in out and "repeated 4-grams" in out and "multi-key recall" in out and "memory off" in out


def test_eval_command_with_own_texts_and_prompts(tiny_converted, tmp_path, capsys):
    student_dir = tiny_converted[0]
    words = write_word_jsonl(tmp_path / "words.jsonl", lines=40)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\nthe quick brown fox\n")
    rc = main(["eval", str(student_dir), "--texts", f"sharegpt,{words}", "--prompts", str(prompts), "--seq-len", "32",
               "--sequences", "2", "--generation-tokens", "4", "--skip", "baseline,layers,passkey,mmlu,long,realrecall",
               "--no-progress"])
    assert rc == 0
    res = json.loads((student_dir / "eval.json").read_text())
    assert list(res["texts"]) == ["sharegpt", str(words)] and res["texts"][str(words)]["tokens"] == 62
    assert res["generation"]["prompts"] == 2 and res["generation"]["source"] == str(prompts)
    out = capsys.readouterr().out
    assert "words.jsonl" in out and f"2 {prompts} prompts" in out.replace("\n", "")
    assert main(["eval", str(student_dir), "--texts", "sharegpt,nope.txt"]) == 2
    assert "'nope.txt' is neither one of" in capsys.readouterr().err
    assert main(["eval", str(student_dir), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "prompts file" in capsys.readouterr().err


def test_eval_command_rejects_bad_options(tiny_converted, capsys):
    assert main(["eval", str(tiny_converted[0]), "--skip", "everything"]) == 2
    assert "unknown part" in capsys.readouterr().err
    assert main(["eval", str(tiny_converted[0]), "--multikey-keys", "4,64"]) == 2
    assert "at most 24 keys" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: one line "argument --limit: ..." and exit 2
        main(["eval", str(tiny_converted[0]), "--limit", "some"])
    assert e.value.code == 2 and "--limit takes" in capsys.readouterr().err


def test_repetition_and_prefix_measures():
    from linearize.evaluate.generation import common_prefix, repeated_ngram_rate

    assert repeated_ngram_rate(list(range(20))) == 0.0
    assert repeated_ngram_rate([7] * 20) == 1 - 1 / 17  # one distinct 4-gram out of 17
    assert repeated_ngram_rate([1, 2, 3, 4, 1, 2, 3, 4]) == 1 - 4 / 5
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2 and common_prefix([], [1]) == 0


def test_generation_agreement_of_a_model_with_itself_and_with_a_looping_one(pair, tiny_tokenizer):
    from linearize.evaluate.generation import generation_agreement, heldout_prompts

    teacher, student, tokenizer = pair
    prompts = heldout_prompts(None, tokenizer, 3, prompt_tokens=16)
    assert len(prompts) == 3 and all(p.shape[0] == 1 and 0 < p.shape[1] for p in prompts)
    same = generation_agreement(teacher, teacher, tokenizer, prompts, max_new_tokens=12, prefix=8)
    assert same["prefix_match"] == 8 and same["prefix_equal"] == 1.0
    assert same["repetition"]["teacher"] == same["repetition"]["student"]


    looping = copy.deepcopy(teacher)  # the final norm zeroed: the same logits at every step, a model stuck in a loop
    with torch.no_grad():
        looping.model.norm.weight.zero_()
    looping = generation_agreement(teacher, looping, tokenizer, prompts, max_new_tokens=12, prefix=8)
    assert looping["repetition"]["student"] > 0.8 > looping["repetition"]["teacher"]


def test_streaming_baseline_has_the_students_state_bytes_and_leaves_the_teacher_alone(pair):
    from linearize.evaluate.baseline import state_bytes, streaming_baseline

    teacher, student, _ = pair
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = teacher(input_ids=ids).logits
    baseline, window, nbytes, target = streaming_baseline(teacher, student, context=256)
    per_token = 2 * 2 * 2 * 16 * 4  # 2 layers x 2 KV heads x (k, v) x head_dim 16 x fp32
    assert target == state_bytes(student, 256) and target - per_token < nbytes <= target
    assert nbytes == (window + 4) * per_token
    with torch.no_grad():
        torch.testing.assert_close(teacher(input_ids=ids).logits, before)  # the teacher is not modified
        assert (baseline(input_ids=ids).logits - before).abs().max() > 0  # the window (< 40 tokens) cuts in


def test_state_bytes_count_a_sparse_cache_full_with_its_waiting_keys(tiny_teacher):
    """A sparse cache of M keys holds up to M + cache_every - 1 of them between selections: state_bytes reports that
    peak, whatever the prompt's length modulo cache_every (so the equal-bytes baseline gets no free keys)."""
    from linearize.evaluate.baseline import refill_steps, state_bytes

    plain = LinearAttentionConfig(window=6, sinks=2, chunk_size=8)
    cached = replace(plain, cache=4, cache_every=8)
    model = lambda cfg: LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), cfg).eval()  # noqa: E731
    per_key = 2 * 2 * 2 * 16 * 4  # 2 layers x 2 KV heads x (k, v) x head_dim 16 x fp32
    assert refill_steps(model(cached)) == 8 and refill_steps(model(plain)) == refill_steps(tiny_teacher) == 0
    for context in (64, 67, 200):
        # the 8th waiting key is selected as it arrives
        assert state_bytes(model(cached), context) - state_bytes(model(plain), context) == (4 + 8 - 1) * per_key


def test_without_memory_is_the_exact_part_alone(tiny_teacher):
    """A fresh conversion (the teacher's projections) with its memory off is the teacher as StreamingLLM over the
    same window and sinks, whatever the trained memory; its state holds no memory; the model itself is unchanged."""
    from linearize.generate.decoding import prefill
    from linearize.models.linearized import without_memory

    config = LinearAttentionConfig(window=6, sinks=2, chunk_size=8)
    student = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), config).eval()
    with torch.no_grad():
        for m in student.attention_modules():
            m.mix_logit.fill_(-2.0)  # the memory weighs more than the window: switching it off must show
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    streaming = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), attention_preset(
        "streaming", window=6, sinks=2)).eval()
    off = without_memory(student)
    with torch.no_grad():
        before = student(input_ids=ids).logits
        torch.testing.assert_close(off(input_ids=ids).logits, streaming(input_ids=ids).logits)
        assert (before - streaming(input_ids=ids).logits).abs().max() > 1e-3
        torch.testing.assert_close(student(input_ids=ids).logits, before)  # the original keeps its memory
    _, state = prefill(off, ids)
    assert all(s.kv is None for s in state)
    with pytest.raises(LinearizeError, match="no linear memory"):
        without_memory(streaming)
    pure = LinearizedForCausalLM.from_teacher(copy.deepcopy(tiny_teacher), attention_preset("hedgehog"))
    with pytest.raises(LinearizeError, match="no softmax window or sinks"):
        without_memory(pure)


def test_streaming_baseline_counts_a_teachers_local_layers_as_fixed_bytes():
    """Gemma 3: the local layers keep their own sliding-window KV in every model; the baseline's window is set from
    the bytes of one more token of its streaming layers (the global ones), not from the whole state."""
    from test_architectures import teacher_for

    from linearize.evaluate.baseline import state_bytes, streaming_baseline

    teacher = teacher_for("gemma3_text")  # layers 0, 2 local (window 8), 1, 3 global; 2 KV heads x 16, fp32
    student = LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), LinearAttentionConfig(window=4, sinks=2))
    baseline, window, nbytes, target = streaming_baseline(teacher, student, sinks=2, context=256)
    per_token = 2 * 2 * 2 * 16 * 4  # 2 global layers x 2 KV heads x (k, v) x 16 x fp32
    assert target == state_bytes(student, 256) and target - per_token < nbytes <= target
    local = state_bytes(baseline, 256) - (window + 2) * per_token
    assert local == state_bytes(LinearizedForCausalLM.from_teacher(copy.deepcopy(teacher), attention_preset(
        "streaming", window=1, sinks=2)), 256) - 3 * per_token > 0  # the same local part in both
    assert window > 4  # the memory's bytes buy window tokens
    assert [a.config.window for a in baseline.attention_modules()] == [8, window, 8, window]  # local layers as they were
