"""linearize eval, part "long": ppl by position band on long documents (evaluate/long.py)."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from linearize.cli import main
from linearize.errors import LinearizeError
from linearize.evaluate.long import (LONG_TEXTS, band_sums, long_bands, long_documents, long_perplexity,
                                     token_nll)
from linearize.evaluate.run import PARTS
from linearize.loading.student import load_student
from linearize.loading.teacher import load_teacher_of
from linearize.models.linearized import without_memory
from linearize.training_free import TrainingFree

OTHER_PARTS = ",".join(p for p in PARTS if p != "long")  # every part but "long"


@pytest.fixture(scope="module")
def pair(tiny_converted):
    student, tokenizer = load_student(tiny_converted[0])
    teacher, _ = load_teacher_of(tiny_converted[0])
    return teacher, student, tokenizer


@pytest.fixture(scope="module")
def cached(pair):
    """The tiny student with a sparse cache of 4 keys re-selected every 8 tokens, and sinks (2)."""
    from linearize.models.linearized import reconfigure

    student = copy.deepcopy(pair[1])
    reconfigure(student, sinks=2)
    return TrainingFree(cache=4, cache_every=8).apply(student)


def ids_of(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


def full_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """-log p(ids[t] | ids[:t]), t = 1 .. T-1, from one forward over the whole sequence (no state, no blocks)."""
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
    return torch.stack([-logp[t - 1, ids[t]] for t in range(1, len(ids))])


def test_bands():
    assert long_bands(8192) == [(0, 256), (256, 1024), (1024, 2048), (2048, 4096), (4096, 8192)]
    assert long_bands(20000)[-3:] == [(4096, 8192), (8192, 16384), (16384, 20000)]
    assert long_bands(32768)[-1] == (16384, 32768)
    assert long_bands(300) == [(0, 256), (256, 300)] and long_bands(100) == [(0, 100)]
    nll = torch.arange(1, 300, dtype=torch.float64)  # entry p - 1 holds position p
    (s0, n0), (s1, n1) = band_sums(nll, long_bands(300))
    assert (n0, n1) == (255, 44) and s0 == sum(range(1, 256)) and s1 == sum(range(256, 300))


@pytest.mark.parametrize("which", ["teacher", "student", "cached", "cached memory off"])
def test_blockwise_nll_equals_one_forward(pair, cached, which):
    """Read in blocks (uneven against the window, the chunk and the cache's selections), each continuing the state
    the last left, every position's NLL is what one forward over the whole sequence gives."""
    teacher, student, _ = pair
    model = {"teacher": teacher, "student": student, "cached": cached,
             "cached memory off": without_memory(cached, keep_cache=True) if which.endswith("off") else None}[which]
    ids = ids_of(150)
    expected = full_nll(model, ids)
    for block in (150, 37, 7):
        got = token_nll(model, ids, block=block)
        assert got.shape == (149,) and got.dtype == torch.float64
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_memory_off_keeps_window_sinks_and_cache(cached):
    from linearize.generate.decoding import prefill

    off = without_memory(cached, keep_cache=True)
    assert all(not m.config.linear and m.config.cache == 4 and m.config.sinks == 2 for m in off.attention_modules())
    _, state = prefill(off, ids_of(100)[None])
    assert all(s.kv is None and s.cache is not None and len(s.cache) >= 4 for s in state)
    assert all(m.config.cache == 0 for m in without_memory(cached).attention_modules())  # eval's baseline row
    assert all(m.config.linear for m in cached.attention_modules())  # the model itself is unchanged


def test_banded_ppl_is_exp_of_the_mean_nll(pair):
    """Two hand-made documents of 1100 tokens: each band's ppl is exp(mean NLL of the positions in it) from one full
    forward, the ratio is the student's over the teacher's, "all" pools the documents, and from_1k pools every
    position >= 1024."""
    teacher, student, _ = pair
    length = 1100
    docs = {name: {"ids": ids_of(length, seed), "document_tokens": length + seed, "source": name}
            for seed, name in enumerate(("a", "b"))}
    res = long_perplexity({"teacher": teacher, "student": student}, docs, length, block=512, log=lambda _: None)
    bands = [(0, 256), (256, 1024), (1024, 1100)]
    assert res["bands"] == [list(b) for b in bands] and res["length"] == length
    nll = {(n, who): full_nll(m, d["ids"]) for n, d in docs.items() for who, m in (("teacher", teacher),
                                                                                 ("student", student))}
    for name in docs:
        r = res["texts"][name]
        assert r["tokens"] == length and r["document_tokens"] == docs[name]["document_tokens"]
        for who in ("teacher", "student"):
            values = [math.exp(nll[name, who][[p - 1 for p in range(max(a, 1), b)]].mean().item()) for a, b in bands]
            assert r["models"][who]["ppl"] == pytest.approx(values, rel=1e-5)
        assert r["models"]["teacher"]["ratio"] == [1.0] * 3
        assert r["models"]["student"]["ratio"] == pytest.approx(
            [s / t for s, t in zip(r["models"]["student"]["ppl"], r["models"]["teacher"]["ppl"])])
    for who in ("teacher", "student"):
        both = torch.cat([nll[n, who] for n in docs])
        assert res["all"][who]["ppl"][0] == pytest.approx(
            math.exp(torch.cat([nll[n, who][:255] for n in docs]).mean().item()), rel=1e-5)
        assert res["from_1k"][who]["ppl"] == pytest.approx(
            math.exp(torch.cat([nll[n, who][1023:] for n in docs]).mean().item()), rel=1e-5)
        assert both.numel() == 2 * (length - 1)
    assert res["from_1k"]["student"]["ratio"] == pytest.approx(
        res["from_1k"]["student"]["ppl"] / res["from_1k"]["teacher"]["ppl"])
    short = long_perplexity({"teacher": teacher}, {"a": {**docs["a"], "ids": docs["a"]["ids"][:300]}}, 300,
                            log=lambda _: None)
    assert short["from_1k"] is None  # no position >= 1k


def test_bundled_long_documents(tiny_tokenizer):
    docs = long_documents(LONG_TEXTS, tiny_tokenizer, 8192)
    assert list(docs) == list(LONG_TEXTS)
    for name, doc in docs.items():
        assert doc["ids"].shape == (8192,) and doc["document_tokens"] > 8192
    assert docs["argparse"]["source"].endswith("argparse.py") and docs["stdtypes"]["source"].endswith(".rst.txt")
    assert tiny_tokenizer.decode(docs["hamlet"]["ids"][:100]).startswith("# Hamlet\n\n## ACT I")
    with pytest.raises(LinearizeError, match="'nope' is neither one of hamlet, argparse, stdtypes nor an existing"):
        long_documents(["nope"], tiny_tokenizer, 10)


def write_text(path, words: int):
    g = torch.Generator().manual_seed(0)
    vocab = "the quick brown fox jumps over the lazy dog hello world linear attention is fast".split()
    path.write_text(" ".join(vocab[i] for i in torch.randint(0, len(vocab), (words,), generator=g)))
    return path


def test_eval_long_command(tiny_converted, tmp_path, capsys):
    student_dir = tiny_converted[0]
    doc = write_text(tmp_path / "story.txt", 400)
    rc = main(["eval", str(student_dir), "--skip", OTHER_PARTS, "--long-texts", str(doc), "--long-length", "300",
               "--no-progress"])
    assert rc == 0
    res = json.loads((student_dir / "eval.json").read_text())
    long = res["long"]
    models = ["teacher", "student", "memory_off", "streaming"]
    assert long["bands"] == [[0, 256], [256, 300]] and long["length"] == 300 and list(long["models"]) == models
    assert list(long["texts"]) == [str(doc)] and long["texts"][str(doc)]["tokens"] == 300
    for r in (long["texts"][str(doc)]["models"], long["all"]):
        assert list(r) == models
        assert all(len(r[who]["ppl"]) == 2 and all(math.isfinite(p) and p > 1 for p in r[who]["ppl"]) for who in r)
        assert r["teacher"]["ratio"] == [1.0, 1.0]
    nbytes = long["state_bytes"]
    assert set(nbytes) == set(models) and nbytes["streaming"] <= nbytes["student"] < nbytes["teacher"]
    assert long["from_1k"] is None and long["sinks"] == 4 and long["window"] >= 1
    assert "--long-length 300" in long["command"] and "--skip ppl,baseline" in long["command"]
    assert res["settings"]["long_length"] == 300 and set(res["seconds"]) == {"long"}
    out = capsys.readouterr().out
    assert "perplexity by position on long documents" in out and "memory off" in out and "256-300" in out

    from linearize.report.page import build_report  # the report's plot of it

    page = build_report(student_dir).read_text()
    assert 'alt="long"' in page and (student_dir / "report" / "long.png").is_file()


def test_eval_long_errors(tiny_converted, tmp_path, capsys):
    student_dir = tiny_converted[0]
    doc = write_text(tmp_path / "short.txt", 50)
    skip = ["--skip", OTHER_PARTS, "--no-progress"]
    assert main(["eval", str(student_dir), "--long-texts", str(doc), "--long-length", "2k", *skip]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"long text '{doc}' has " in err and "fewer than --long-length 2048" in err
    assert main(["eval", str(student_dir), "--long-texts", str(doc), "--long-length", "8k", *skip]) == 2
    assert "exceeds the teacher's context (4096 tokens" in capsys.readouterr().err
    assert main(["eval", str(student_dir), "--long-texts", "nope.txt", *skip]) == 2
    assert "'nope.txt' is neither one of" in capsys.readouterr().err
