"""Nothing lost, nothing misread (issue 38): convert never overwrites a model or a user's folder unasked, a saved
state is refused by any other model, and bad inputs to convert / generate / prefill / bench are one clear line,
checked before any long work and leaving nothing half-written behind."""

import json
import math

import pytest
import torch

from linearize.cli import main
from linearize.data.packing import pack_sequences
from linearize.errors import LinearizeError

SMALL = ["--seq-len", "32", "--tokens", "256", "--lora-tokens", "128", "--eval-tokens", "64", "--window", "8",
         "--no-progress"]


def error_line(capsys, argv) -> str:
    """Run the CLI expecting a user error: exit 2, no traceback, the last stderr line is the error; returns it."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("linearize: error:"), err
    return last


def argparse_error(capsys, argv) -> str:
    """An option argparse refuses: exit 2 and its one 'error:' line (after the usage), no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err.strip().splitlines()[-1]


def convert(model_dir, data_file, out, *extra):
    return main(["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out), *SMALL, *extra])


# --- data loss -----------------------------------------------------------------------------------------------------

def test_convert_refuses_a_folder_that_holds_other_files_unless_overwrite(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "u"
    out.mkdir()
    (out / "model.safetensors").write_text("w")
    assert "not empty" in error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file),
                                              "--out", str(out), *SMALL])
    assert (out / "model.safetensors").read_text() == "w"  # untouched
    assert convert(model_dir, data_file, out, "--overwrite") == 0
    assert json.loads((out / "convert.json").read_text())["stage2_ppl"] > 1


def test_convert_never_writes_into_the_model_folder(model_dir, data_file, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for out in (model_dir, model_dir.parent):  # the folder itself, or one above it
        line = error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file), "--out", str(out),
                                   *SMALL, "--overwrite"])
        assert "holds the --model" in line
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_convert_out_that_is_a_file_is_one_line(model_dir, data_file, tmp_path, capsys):
    (tmp_path / "FILE").write_text("keep me")
    assert "is a file" in error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file),
                                              "--out", str(tmp_path / "FILE"), *SMALL])
    assert (tmp_path / "FILE").read_text() == "keep me"


def test_overwrite_starts_a_finished_run_again(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert convert(model_dir, data_file, out) == 0
    assert "--overwrite" in error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file),
                                                "--out", str(out), *SMALL, "--lora-tokens", "64"])
    assert convert(model_dir, data_file, out, "--lora-tokens", "64", "--overwrite") == 0
    assert json.loads((out / "convert.json").read_text())["lora"]["tokens"] == 64


def test_resume_without_a_run_says_it_starts_a_new_one(model_dir, data_file, tmp_path, capsys):
    assert convert(model_dir, data_file, tmp_path / "fresh", "--resume") == 0
    assert "holds no run to continue; starting a new one" in capsys.readouterr().out


def test_a_resumed_stage_records_all_its_tokens(model_dir, data_file, tmp_path, monkeypatch, capsys):
    from conftest import interrupted_at_step

    out = tmp_path / "run"
    def interrupted():
        assert convert(model_dir, data_file, out) == 130  # main turns Ctrl-C into exit 130
        raise KeyboardInterrupt

    interrupted_at_step(monkeypatch, 3, interrupted)
    assert "--resume" in capsys.readouterr().err
    assert convert(model_dir, data_file, out, "--resume") == 0
    summary = json.loads((out / "convert.json").read_text())
    assert summary["transfer"]["tokens"] == 256 and summary["transfer"]["steps"] == 8


# --- a state is refused by any model but the one that made it ------------------------------------------------------

def test_states_of_other_conversions_are_refused(model_dir, data_file, tmp_path, capsys):
    from linearize.generate.state_file import model_fingerprint
    from linearize.training_free import TrainingFree

    a, b = tmp_path / "a", tmp_path / "b"
    assert convert(model_dir, data_file, a) == 0
    assert convert(model_dir, data_file, b, "--tokens", "128") == 0  # the same teacher, another budget
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(a)  # stable (and now kept beside the weights)
    assert model_fingerprint(a, TrainingFree(cache=4)) != model_fingerprint(a)  # a training-free setting changes the state
    doc = tmp_path / "doc.txt"
    doc.write_text("the cat sat on the mat. " * 20)
    state = tmp_path / "s.safetensors"
    assert main(["prefill", str(a), str(doc), "--save", str(state)]) == 0
    assert "made by another model" in error_line(capsys, ["generate", str(b), "x", "--state", str(state)])
    capsys.readouterr()
    assert main(["generate", str(a), "x", "--state", str(state), "--max-new-tokens", "2"]) == 0
    # the digest follows the weights: a retrained file with the same name is another model
    weights = a / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert "made by another model" in error_line(capsys, ["generate", str(a), "x", "--state", str(state)])


# --- tracebacks that are one line now ------------------------------------------------------------------------------

def test_generate_and_prefill_bad_inputs(tiny_converted, tmp_path, capsys):
    student, _ = tiny_converted
    assert "prompt is empty" in error_line(capsys, ["generate", str(student), "", "--raw"])
    assert "--temperature" in argparse_error(capsys, ["generate", str(student), "hi", "--temperature", "nan"])
    assert "--temperature" in argparse_error(capsys, ["generate", str(student), "hi", "--temperature", "-1"])
    assert "--max-new-tokens" in argparse_error(capsys, ["generate", str(student), "hi", "--max-new-tokens", "-1"])
    doc = tmp_path / "doc.txt"
    doc.write_text("words " * 50)
    folder = tmp_path / "states"
    folder.mkdir()
    assert "is a folder" in error_line(capsys, ["prefill", str(student), str(doc), "--save", str(folder)])
    assert "does not exist" in error_line(capsys, ["prefill", str(student), str(doc), "--save",
                                                   str(tmp_path / "no" / "s.safetensors")])
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob("*.tmp"))


def test_prefill_checks_its_destination_before_reading(tiny_converted, tmp_path, capsys, monkeypatch):
    """The destination is refused before the model loads and the document is prefilled (not after)."""
    import linearize.generate.decoding

    student, _ = tiny_converted
    doc = tmp_path / "doc.txt"
    doc.write_text("words " * 50)
    called = []
    monkeypatch.setattr(linearize.generate.decoding, "prefill", lambda *a, **k: called.append(1))
    error_line(capsys, ["prefill", str(student), str(doc), "--save", str(tmp_path)])
    assert called == []


def test_a_failed_write_leaves_no_tmp_file(tmp_path):
    from linearize.run_folder import write_atomic

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(tmp_path / "f.safetensors", fail)
    assert list(tmp_path.iterdir()) == []


def test_interrupts_suggest_resume_only_where_it_exists(tiny_converted, capsys, monkeypatch):
    import linearize

    student, _ = tiny_converted

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(linearize, "generate_text", interrupt)
    assert main(["generate", str(student), "hi"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "--resume" not in err


# --- settings checked before training ------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, match", [(["--softmax-layers", "99"], "not linearized layers"),
                                          (["--keep-softmax", "100"], "exceeds the 2 linearized layers")])
def test_layer_choices_are_checked_before_training(model_dir, data_file, tmp_path, capsys, monkeypatch, flags, match):
    import linearize.convert.stages

    trained = []
    monkeypatch.setattr(linearize.convert.stages, "attention_transfer", lambda *a, **k: trained.append(1))
    out = tmp_path / "out"
    assert match in error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file),
                                        "--out", str(out), *SMALL, *flags])
    assert trained == [] and not out.exists()  # the corrected rerun is not blocked


def test_seq_len_must_leave_the_memory_something(model_dir, data_file, tmp_path, capsys):
    line = error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file), "--out",
                               str(tmp_path / "o"), *SMALL, "--seq-len", "8"])  # == --window 8
    assert "nothing to learn" in line and "--seq-len >= 16" in line


def test_a_small_text_file_is_split_by_rows(tiny_tokenizer, tmp_path, monkeypatch):
    """A few documents, none in the held-out split by their hash: the last rows are held out instead, disjoint
    from the training rows, which come before them."""
    from linearize.data.packing import document_tokens, is_heldout, split_by_rows
    from linearize.data.sources import iter_documents

    monkeypatch.chdir(tmp_path)  # document ids are "doc.txt:K", none of them held out by the hash
    path = "doc.txt"
    (tmp_path / path).write_text("\n\n".join(f"paragraph {i} " + "word " * 900 for i in range(6)))
    docs = list(iter_documents(path))
    assert len(docs) >= 2 and not any(is_heldout(doc_id) for doc_id, _ in docs)
    assert split_by_rows(path, tiny_tokenizer)
    tokens = torch.tensor(document_tokens([text for _, text in docs], tiny_tokenizer))
    rows = len(tokens) // 64
    held = pack_sequences(path, tiny_tokenizer, 64, math.ceil(rows * 0.02), split="heldout")
    train = pack_sequences(path, tiny_tokenizer, 64, rows - len(held), split="train")
    assert len(held) == math.ceil(rows * 0.02) >= 2 and len(train) == rows - len(held)  # 2 % of the rows held out
    assert torch.equal(torch.cat([train, held]).flatten(), tokens[:rows * 64])


def test_a_big_source_keeps_the_document_split(tiny_tokenizer, tmp_path):
    from conftest import write_word_jsonl

    from linearize.data.packing import split_by_rows

    assert not split_by_rows(str(write_word_jsonl(tmp_path / "d.jsonl")), tiny_tokenizer)


def test_bench_fails_when_every_student_point_failed(tiny_converted, capsys, monkeypatch):
    import linearize.bench.run

    student, _ = tiny_converted

    def fake_bench(path, settings, teacher=None):
        return {"machine": {"threads": 1}, "points": [{"which": "student", "context": 64, "error": "boom"}]}

    monkeypatch.setattr(linearize.bench.run, "bench", fake_bench)
    assert "every student point failed (first: boom)" in error_line(capsys, ["bench", str(student)])


def test_a_missing_transfer_state_is_refused_before_anything_is_written(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert "--transfer-state" in error_line(capsys, ["convert", "--model", str(model_dir), "--data", str(data_file),
                                                     "--out", str(out), *SMALL, "--transfer-state",
                                                     str(tmp_path / "none.safetensors")])
    assert not out.exists()
