"""Generation quality: greedy answers of teacher and student to the same held-out prompts.

    prompts        the first N held-out documents of the conversion's training text (never trained on), each cut
                   after its first assistant header when the tokenizer has a chat template (the answer is what
                   the models write), else after its first `prompt_tokens` tokens (a continuation)
                   -- or, with `linearize eval --prompts FILE`, the first N prompts of FILE (file_prompts)
    repetition     per model, the mean share of repeated 4-grams in its answers: 1 - distinct / all (0 = no loop)
    prefix_match   how many of the first `prefix` tokens of the student's answer equal the teacher's (mean), and
                   the share of answers whose first `prefix` tokens are all equal
A student that falls into loops shows a repetition rate well above its teacher's.
"""

from pathlib import Path

import torch

from ..generate.decoding import Decoder
from ..data.packing import is_heldout
from ..data.sources import iter_documents, iter_jsonl_records, record_messages
from ..errors import LinearizeError

PROMPT_FILES = (".txt", ".jsonl")


def assistant_header(tokenizer) -> str | None:
    """The text a chat template puts before an assistant's answer (None without a chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turn = [{"role": "user", "content": "X"}]
    without = tokenizer.apply_chat_template(turn, tokenize=False)
    with_header = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    return with_header[len(without):] or None


def heldout_prompts(source, tokenizer, n: int, prompt_tokens: int = 128) -> list[torch.Tensor]:
    """Token ids (1, T) of n prompts from the held-out split of `source` (see the module docstring)."""
    header = assistant_header(tokenizer)
    prompts = []
    for doc_id, text in iter_documents(source, tokenizer):
        if len(prompts) == n:
            break
        if not is_heldout(doc_id):
            continue
        if header and header in text:
            text = text[: text.index(header) + len(header)]
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
        if header is None or ids.shape[1] > 4 * prompt_tokens:  # no header, or a very long question: its start
            ids = ids[:, :prompt_tokens]
        prompts.append(ids)
    return prompts


def check_prompts(path: str) -> Path:
    """`path` as a Path, once it is an existing prompts file of a known kind."""
    p = Path(path).expanduser()
    if not p.is_file() or p.suffix.lower() not in PROMPT_FILES:
        raise LinearizeError(f"prompts file {path} {'not found' if not p.exists() else 'is not .txt or .jsonl'}; give "
                             "a .txt file (one prompt per line) or a .jsonl file ({\"text\"} or chat records)")
    return p


def file_prompts(path: str, tokenizer, n: int) -> list[torch.Tensor]:
    """Token ids (1, T) of the first n prompts of a file. .txt: one prompt per non-empty line; .jsonl: one record
    per line, {"text": prompt} or a chat ({"messages"} / {"conversations"}, as --data takes them) whose turns
    before its first assistant answer are the prompt. With a chat template the prompt is rendered as those turns
    plus the assistant header (a single text is one user turn), else it is the text itself."""
    p = check_prompts(path)
    if p.suffix.lower() == ".txt":
        lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
        chats = [[{"role": "user", "content": line}] for line in lines if line.strip()]
    else:
        chats = []
        for k, record in iter_jsonl_records(p):
            messages = record_messages(record, where=f"{p} line {k}") or [{"role": "user", "content": record["text"]}]
            answer = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
            if messages[:answer]:
                chats.append(messages[:answer])
    if not chats:
        raise LinearizeError(f"prompts file {path} has no prompts; write one prompt per line")
    template = getattr(tokenizer, "chat_template", None)
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) if template
             else "\n".join(m["content"] for m in c) for c in chats[:n]]
    return [tokenizer(t, return_tensors="pt", add_special_tokens=False).input_ids for t in texts]


def repeated_ngram_rate(tokens: list[int], n: int = 4) -> float:
    """1 - distinct n-grams / n-grams of a token list (0 for fewer than 2 n-grams)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def common_prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def generation_agreement(teacher, student, tokenizer, prompts: list[torch.Tensor], max_new_tokens: int = 64,
                         prefix: int = 32) -> dict:
    """Greedy answers of both models to every prompt (no early stop at the end-of-text token, so the answers have
    equal lengths); returns {prompts, max_new_tokens, prefix, repetition {teacher, student}, prefix_match,
    prefix_equal, examples (the first three answers as text)}."""
    answers = {}
    for who, model in (("teacher", teacher), ("student", student)):
        decoder = Decoder(model)
        answers[who] = [decoder.generate(ids, max_new_tokens) for ids in prompts]
    matches = [common_prefix(t[:prefix], s[:prefix]) for t, s in zip(answers["teacher"], answers["student"])]
    n = max(len(prompts), 1)
    return {
        "prompts": len(prompts), "max_new_tokens": max_new_tokens, "prefix": prefix,
        "repetition": {who: sum(map(repeated_ngram_rate, a)) / n for who, a in answers.items()},
        "prefix_match": sum(matches) / n,
        "prefix_equal": sum(m == prefix for m in matches) / n,
        "examples": [{who: tokenizer.decode(answers[who][i]) for who in answers} for i in range(min(3, len(prompts)))],
    }
