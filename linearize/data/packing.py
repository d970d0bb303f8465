"""Documents -> fixed-length token rows for training and evaluation.

Each document goes to the "train" or the "heldout" split by a hash of its id, so the split is the same on
every run and machine. Documents are tokenized, joined with EOS and cut into rows of seq_len tokens.
"""

import hashlib
import math
import warnings

import torch
from tqdm import tqdm

from linearize.data.sources import DEFAULT_DATA, iter_documents
from linearize.errors import LinearizeError

SPLITS = ("train", "heldout")
BATCH_DOCS = 16  # documents tokenized per call (the fast tokenizer batches them in Rust)
SMALL_SOURCE_DOCS = 200  # a source of at most this many documents, none held out, is split by rows


def is_heldout(doc_id: str, percent: float = 2.0) -> bool:
    """True for ~percent% of documents, decided by a stable hash of doc_id (same on every run/machine)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 * 100 < percent


def split_by_rows(source, tokenizer, heldout_percent: float = 2.0) -> bool:
    """True for a small source whose documents all fall in one split (a 40 KB text file has ~10, most likely none
    held out): such a source is split by rows instead (the last rows held out), so both splits have text. Reads at
    most SMALL_SOURCE_DOCS + 1 documents, and stops at the first pair that the hash puts in different splits."""
    docs = held = 0
    for doc_id, _ in iter_documents(source, tokenizer):
        docs += 1
        held += is_heldout(doc_id, heldout_percent)
        if docs > SMALL_SOURCE_DOCS or 0 < held < docs:
            return False
    return docs > 0


def _rows_of_split(source, tokenizer, seq_len, split, heldout_percent) -> list[int]:
    """The tokens of one split of a small source split by rows: all its documents in order, cut into rows; the
    held-out split is the last ceil(heldout_percent % of the rows) rows (at least one), the train split the rest."""
    texts = [text for _, text in iter_documents(source, tokenizer)]
    tokens = document_tokens(texts, tokenizer)
    rows = len(tokens) // seq_len
    held = min(rows, max(1, math.ceil(rows * heldout_percent / 100)))
    cut = (rows - held) * seq_len
    return tokens[cut:rows * seq_len] if split == "heldout" else tokens[:cut]


def _split_texts(source, tokenizer, split, heldout_percent, seen):
    """Texts of one split; seen["docs"] counts documents of any split (to tell "no text" from "all heldout"),
    seen["held"] those held out."""
    for doc_id, text in iter_documents(source, tokenizer):
        seen["docs"] += 1
        held = is_heldout(doc_id, heldout_percent)
        seen["held"] += held
        if held == (split == "heldout"):
            yield text


def _batches(items, n):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def document_tokens(documents: list[str], tokenizer) -> list[int]:
    """Documents tokenized without special tokens, each followed by tokenizer.eos_token_id (if any), concatenated."""
    eos = tokenizer.eos_token_id
    tokens: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False, verbose=False)["input_ids"]:
        tokens.extend(ids)
        if eos is not None:
            tokens.append(eos)
    return tokens


def token_rows(tokens: list[int], seq_len: int, rows: int, start: int = 0) -> torch.LongTensor:
    """(rows, seq_len) int64 from tokens[start:]."""
    return torch.tensor(tokens[start:start + rows * seq_len], dtype=torch.long).view(rows, seq_len)


def pack_sequences(source: str | None, tokenizer, seq_len: int, num_sequences: int, split: str = "train",
                   skip_sequences: int = 0, heldout_percent: float = 2.0, progress: bool = False) -> torch.LongTensor:
    """Token rows from the documents of one split: (num_sequences, seq_len) int64.

    Documents are tokenized without special tokens, each followed by tokenizer.eos_token_id (if any),
    concatenated and cut into rows; the first skip_sequences rows are dropped, so callers can take
    disjoint slices of the same stream. Reading stops as soon as enough tokens are collected.
    """
    name = source or DEFAULT_DATA
    if split not in SPLITS:
        raise LinearizeError(f"unknown data split {split!r}; use one of {', '.join(SPLITS)}")
    if seq_len < 1 or num_sequences < 0 or skip_sequences < 0:
        raise LinearizeError(f"bad data sizes (seq_len={seq_len}, num_sequences={num_sequences}, "
                             f"skip_sequences={skip_sequences}); use seq_len >= 1 and counts >= 0")
    if num_sequences == 0:
        return torch.empty(0, seq_len, dtype=torch.long)

    need = (skip_sequences + num_sequences) * seq_len
    tokens: list[int] = []
    seen = {"docs": 0, "held": 0}
    texts = _split_texts(source, tokenizer, split, heldout_percent, seen)
    with tqdm(total=need, unit="tok", unit_scale=True, desc=f"tokenizing {split} data", disable=not progress) as bar:
        for batch in _batches(texts, BATCH_DOCS):
            tokens.extend(document_tokens(batch, tokenizer))
            bar.update(min(len(tokens), need) - bar.n)
            if len(tokens) >= need:
                break
    texts.close()  # stop reading the source
    # documents of both splits met: the split by documents holds; else a small source may be split by rows
    by_rows = not 0 < seen["held"] < seen["docs"] and split_by_rows(source, tokenizer, heldout_percent)
    if by_rows:
        tokens = _rows_of_split(source, tokenizer, seq_len, split, heldout_percent)

    if seen["docs"] == 0:
        raise LinearizeError(f"data {name} contains no text; give a .txt/.jsonl file (or directory) with text in it")
    rows = min(len(tokens), need) // seq_len - skip_sequences
    if rows <= 0:
        raise LinearizeError(f"data {name} is smaller than one sequence of {seq_len} tokens "
                             f"({split} split{' (split by rows: a small source)' if by_rows else ''}: "
                             f"{len(tokens)} tokens, {skip_sequences} sequences skipped); "
                             "lower --seq-len or give more data")
    if rows < num_sequences:
        warnings.warn(f"data {name} ({split} split) has only {rows} sequences of {seq_len} tokens after "
                      f"skipping {skip_sequences}, fewer than the {num_sequences} asked for; using {rows}")
    return token_rows(tokens, seq_len, rows, start=skip_sequences * seq_len)
