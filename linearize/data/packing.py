"""Documents -> fixed-length token rows for training and evaluation.

Each document goes to the "train" or the "heldout" split by a hash of its id, so the split is the same on
every run and machine. Documents are tokenized, joined with EOS and cut into rows of seq_len tokens.
"""

import hashlib
import warnings

import torch
from tqdm import tqdm

from linearize.data.sources import DEFAULT_DATA, iter_documents
from linearize.errors import LinearizeError

SPLITS = ("train", "heldout")
BATCH_DOCS = 16  # documents tokenized per call (the fast tokenizer batches them in Rust)


def is_heldout(doc_id: str, percent: float = 2.0) -> bool:
    """True for ~percent% of documents, decided by a stable hash of doc_id (same on every run/machine)."""
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 * 100 < percent


def _split_texts(source, tokenizer, split, heldout_percent, seen):
    """Texts of one split; seen["docs"] counts documents of any split (to tell "no text" from "all heldout")."""
    for doc_id, text in iter_documents(source, tokenizer):
        seen["docs"] += 1
        if is_heldout(doc_id, heldout_percent) == (split == "heldout"):
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
    seen = {"docs": 0}
    texts = _split_texts(source, tokenizer, split, heldout_percent, seen)
    with tqdm(total=need, unit="tok", unit_scale=True, desc=f"tokenizing {split} data", disable=not progress) as bar:
        for batch in _batches(texts, BATCH_DOCS):
            tokens.extend(document_tokens(batch, tokenizer))
            bar.update(min(len(tokens), need) - bar.n)
            if len(tokens) >= need:
                break
    texts.close()  # stop reading the source

    if seen["docs"] == 0:
        raise LinearizeError(f"data {name} contains no text; give a .txt/.jsonl file (or directory) with text in it")
    rows = min(len(tokens), need) // seq_len - skip_sequences
    if rows <= 0:
        raise LinearizeError(f"data {name} is smaller than one sequence of {seq_len} tokens "
                             f"({split} split: {len(tokens)} tokens, {skip_sequences} sequences skipped); "
                             "lower --seq-len or give more data")
    if rows < num_sequences:
        warnings.warn(f"data {name} ({split} split) has only {rows} sequences of {seq_len} tokens after "
                      f"skipping {skip_sequences}, fewer than the {num_sequences} asked for; using {rows}")
    return token_rows(tokens, seq_len, rows, start=skip_sequences * seq_len)
