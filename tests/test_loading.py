"""Loading a teacher: a GGUF file (whole or cut off), --no-progress, and a hub id on a machine without the hub."""

import time

import pytest
from transformers.utils import logging as hf_logging

from linearize.cli import main
from linearize.errors import LinearizeError
from linearize.loading import teacher as loading
from linearize.loading.teacher import load_teacher

from conftest import write_tiny_gguf
from test_cli import one_error_line


@pytest.fixture
def tiny_gguf(tmp_path, tiny_tokenizer):
    return write_tiny_gguf(tmp_path / "tiny.gguf", tiny_tokenizer)


@pytest.fixture
def progress_bars():
    """transformers' process-wide progress-bar switch, restored after the test (--no-progress turns it off)."""
    was_on = hf_logging.is_progress_bar_enabled()
    yield
    (hf_logging.enable_progress_bar if was_on else hf_logging.disable_progress_bar)()


def test_gguf_loads_and_no_progress_hides_the_dequantisation_bar(tiny_gguf, tiny_tokenizer, capfd, progress_bars):
    hf_logging.enable_progress_bar()
    model, tokenizer = load_teacher(str(tiny_gguf))
    assert model.config.num_hidden_layers == 2
    assert tokenizer("hello world").input_ids == tiny_tokenizer("hello world").input_ids
    assert "de-quantizing" in capfd.readouterr().err  # transformers draws it by default
    hf_logging.disable_progress_bar()  # what --no-progress does
    load_teacher(str(tiny_gguf))
    assert "de-quantizing" not in capfd.readouterr().err


@pytest.mark.parametrize("keep", [0.001, 0.3, 0.99])  # in the header, the metadata, the tensor data
def test_truncated_gguf_is_one_line_naming_the_fix(tiny_gguf, tmp_path, capsys, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(LinearizeError, match="is truncated or not a GGUF file .*; re-download it"):
        load_teacher(str(cut))
    if keep == 0.99:
        one_error_line(capsys, ["convert", "--model", str(cut), "--out", str(tmp_path / "out")], "re-download it")


def test_hub_id_offline_fails_at_once(monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    start = time.time()
    one_error_line(capsys, ["convert", "--model", "someorg/some-model", "--out", str(tmp_path / "out")],
                   "the Hugging Face hub cannot be reached and it is not in the local cache; give a local model folder")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LinearizeError, match="HF_HUB_OFFLINE is set"):
        load_teacher("someorg/some-model")
    assert time.time() - start < 10  # transformers' own retries took ~37 s here


def test_hub_id_in_the_local_cache_loads_offline(monkeypatch, tmp_path):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someorg--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(loading, "hub_reachable", lambda: False)
    assert loading.hub_access("someorg/cached") == {"local_files_only": True}
    with pytest.raises(LinearizeError, match="not a local path nor a Hugging Face model id"):
        loading.hub_access("not a valid id!")


def test_hub_reachable_answers_within_its_timeout(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port: refused at once
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    start = time.time()
    assert loading.hub_reachable(timeout=1.0) is False
    assert time.time() - start < 2
