"""Fit the sparse cache's learned score (cache_score "learned", ops/sparse_cache/selection.learned_score): which of
the keys that left the window will a question asked much later read?

The self-recall error ranks keys by what the linear memory has not seen, which in real prose is every sentence: a
fact hidden in a manual is ranked like its neighbours and written into the memory (docs/recall.md). This fits, per
layer and KV head, a linear score of the key (RoPE undone) and value to what such questions read:

    rows     look-up exercises (data/retrieval.asked_rows): ASKED facts inserted in the run's own training text, every
             one asked (question and answer) at the end (formats and names differ from the eval's)
    target   for key j >= sinks: log(max over the QUESTION_QUERIES queries before each answer's end (i with
             i - j >= window), and over the KV head's query heads, of a_ij |v_j| + EPS), a_ij the model's exact
             softmax attention (the teacher's: every layer in exact softmax, LinearAttention.exact_softmax); keys no
             such query reaches are left out
    label    y = 1 for the keys whose target is in the top TOP of their row and KV head, else 0 (top None: y = the
             target itself): the score is to single out the few keys questions read, not to rank the rest
    fit      ridge regression on [k, v, 1] (selection.score_features), w = (X^T X + RIDGE mean(diag) I)^-1 X^T y,
             from sums over the rows (no per-key data kept)

    fit_cache_score(model, rows) -> {layer: (Hkv, 2d + 1)}; the model's layers hold them and rank with them
    fit_on_lookups(model, tokenizer, data) -> convert.json's record: the same on fit_rows, what `linearize convert`
    does after training (convert/stages.py) and `linearize cache-score RUN` for a run converted before (add, fit_run)
"""

import time

import torch
from tqdm.auto import tqdm

from ..errors import LinearizeError
from ..ops.hybrid.terms import group, per_group
from ..ops.rotary import rotate
from ..ops.sparse_cache.selection import score_features

QUESTION_QUERIES = 8  # per answer: the question's end and the answer (a row ends with questions, answers, EOS)
EPS = 1e-6
RIDGE = 1e-2
ROWS = 32  # rows of SEQ_LEN tokens `linearize convert` fits on (about 3 minutes on 2 CPU cores for SmolLM2-135M)
SEQ_LEN = 2048
ASKED = 8  # facts per fitting row, every one asked at the end
TOP = 0.02  # the share of a row's keys (per KV head) labelled as read: the fitted score's positives


def answer_queries(ends: list[int], length: int) -> torch.Tensor:
    """(Q,) the positions of the queries whose reading a target counts: the QUESTION_QUERIES tokens before each
    answer's end (ends exclusive; a row of `length` tokens)."""
    return torch.tensor(sorted({i for end in ends for i in range(max(end - QUESTION_QUERIES, 0), min(end, length))}))


def question_targets(streams, scale: float, window: int, sinks: int, queries: torch.Tensor | None = None):
    """streams q (B, H, T, d), k, v (B, Hkv, T, d) with RoPE at their positions, queries (Q,) positions (None: the
    last QUESTION_QUERIES) -> (target (B, Hkv, T), reached (T,) bool): what those queries read of each key at least
    `window` tokens back (module docstring)."""
    q, k, v = streams.q.float(), streams.k.float(), streams.v.float()
    T = k.shape[2]
    queries = torch.arange(T - QUESTION_QUERIES, T) if queries is None else queries
    pos_q = queries.to(k.device)[:, None]
    pos_k = torch.arange(T, device=k.device)[None, :]
    s = per_group(group(q[:, :, pos_q[:, 0]], k.shape[1]), k.transpose(-1, -2)) * scale  # (B, Hkv, G, Q, T)
    a = s.masked_fill(pos_k > pos_q, float("-inf")).softmax(-1)
    far = pos_q - pos_k >= window  # (Q, T)
    read = a.masked_fill(~far, 0).amax(dim=(2, 3))  # (B, Hkv, T)
    reached = far.any(0) & (pos_k[0] >= sinks)
    return torch.log(read * v.norm(dim=-1) + EPS), reached


def labels(target: torch.Tensor, top: float | None) -> torch.Tensor:
    """target (B, Hkv, n) -> what the ridge fits: 1 where the target is in the top `top` of its row and KV head, else
    0; top None: the target itself."""
    if top is None:
        return target
    cut = torch.quantile(target.float(), 1 - top, dim=-1, keepdim=True)
    return (target >= cut).to(target.dtype)


class Sums:
    """X^T X and X^T y of one layer's keys, per KV head."""

    def __init__(self):
        self.xtx = self.xty = 0
        self.keys = 0

    def add(self, x: torch.Tensor, y: torch.Tensor):
        """x (B, Hkv, n, D), y (B, Hkv, n)."""
        self.xtx = self.xtx + torch.einsum("bhnd,bhne->hde", x, x).double()
        self.xty = self.xty + torch.einsum("bhnd,bhn->hd", x, y).double()
        self.keys += x.shape[0] * x.shape[2]

    def solve(self) -> torch.Tensor:
        """(Hkv, D) ridge weights."""
        eye = torch.eye(self.xtx.shape[-1], dtype=self.xtx.dtype, device=self.xtx.device)
        lam = RIDGE * self.xtx.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
        return torch.linalg.solve(self.xtx + lam * eye, self.xty).float()


def cached_layers(model) -> list:
    """The attention modules whose sparse cache can take a learned score (a cache scored at a distance)."""
    from ..models.linearized import memory_layers

    return [m for m in memory_layers(model) if m.config.cache_distance is not None]


def fit_cache_score(model, rows: torch.Tensor, ends: list[list[int]] | None = None,
                    progress: bool = False, top: float | None = TOP) -> dict[int, torch.Tensor]:
    """Fit the learned cache score of every layer with such a cache (cached_layers) on look-up rows (N, T) whose
    answers end at `ends` (per row; None: each row ends with its one answer), the labels the top `top` of each row's
    keys (labels), set it on the model (its config then says cache_score "learned") and return {layer index: (Hkv,
    2d + 1)}."""
    from ..models.linearized import reconfigure

    layers = cached_layers(model)
    if not layers:
        raise LinearizeError("this model has no sparse cache scored at a distance to fit a score for: convert with "
                             "--cache-position packed (the default) or edge, and a cache")
    window, sinks = layers[0].config.window, layers[0].config.sinks
    if rows.shape[1] <= window + QUESTION_QUERIES:
        raise LinearizeError(f"rows of {rows.shape[1]} tokens leave no key beyond the {window}-token window to score; "
                             f"fit on rows longer than {window + QUESTION_QUERIES}")
    sums = {m.layer_idx: Sums() for m in layers}
    device = next(model.parameters()).device

    queries = [None]  # the row being read's

    def watching(m):
        def attend(streams, state=None):
            target, reached = question_targets(streams, m.scaling, window, sinks, queries[0])
            positions = torch.arange(streams.k.shape[2], device=streams.k.device)
            x = score_features(rotate(streams.k, -positions, m.rope_frequencies), streams.v)
            sums[m.layer_idx].add(x[:, :, reached], labels(target[:, :, reached], top))
            return type(m).attend(m, streams, state)
        return attend

    modules = model.attention_modules()
    before = [m.exact_softmax for m in modules]
    for m in modules:
        m.exact_softmax = True
    for m in layers:
        m.attend = watching(m)  # an instance attribute: forward's self.attend finds it first
    try:
        with torch.no_grad():
            for i, row in enumerate(tqdm(rows, desc="fitting the cache score", unit="row", disable=not progress)):
                queries[0] = None if ends is None else answer_queries(ends[i], rows.shape[1])
                model(input_ids=row[None].to(device))
    finally:
        for m, exact in zip(modules, before):
            m.exact_softmax = exact
        for m in layers:
            del m.attend
    weights = {i: s.solve() for i, s in sums.items()}
    for m in layers:
        w = weights[m.layer_idx].to(device)
        if getattr(m, "cache_scorer", None) is None:
            m.register_buffer("cache_scorer", w)
        else:
            m.cache_scorer.copy_(w)
    reconfigure(model, cache_score="learned")
    return weights


def fit_rows(tokenizer, data: str | None, rows: int = ROWS, seq_len: int = SEQ_LEN,
             seed: int = 0) -> tuple[torch.Tensor, list[list[int]]]:
    """((rows, seq_len) look-up exercises in the training split of `data` (None: the bundled ShareGPT), each asking
    all its ASKED facts at the end; where each row's answers end)."""
    from ..data.packing import pack_sequences
    from ..data.retrieval import asked_rows

    text = pack_sequences(data, tokenizer, seq_len, rows, split="train")
    return asked_rows(text, tokenizer, ASKED, tag=f"cache-score-{seed}")


def fit_on_lookups(model, tokenizer, data: str | None, rows: int = ROWS, seq_len: int = SEQ_LEN, seed: int = 0,
                   progress: bool = False) -> dict:
    """fit_cache_score on fit_rows: the score `linearize convert` and `linearize cache-score` give a model; returns
    what convert.json records of the fit."""
    started = time.perf_counter()
    fit_cache_score(model, *fit_rows(tokenizer, data, rows, seq_len, seed), progress=progress)
    return {"rows": rows, "seq_len": seq_len, "asked": ASKED, "top": TOP,
            "seconds": round(time.perf_counter() - started, 1)}


def fit_run(path, rows: int = ROWS, seq_len: int = SEQ_LEN, progress: bool = True, log=print) -> dict:
    """`linearize cache-score RUN`: fit the score for a converted model folder and save the folder (each file
    written, then renamed); returns what convert.json records of it."""
    from ..loading.student import load_student
    from ..run_folder import CONVERT, check_converted, read_json, save_model, write_json

    if rows < 1 or seq_len < 2:
        raise LinearizeError(f"--rows must be >= 1 and --seq-len >= 2 (got {rows}, {seq_len})")
    path = check_converted(path)
    model, tokenizer = load_student(path)
    record = read_json(path / CONVERT) or {}
    data = (record.get("settings") or {}).get("data")
    summary = fit_on_lookups(model, tokenizer, data, rows, seq_len, progress=progress)
    save_model(model, tokenizer, path)
    if record:
        write_json({**record, "cache_score": summary}, path / CONVERT)
    log(f"{path}: the sparse cache now ranks its keys by a score fitted on {rows} look-up rows of {seq_len} tokens "
        f"({summary['seconds']:.0f} s); `--cache-score recall` gives the self-recall error back")
    return summary


def add(sub):
    p = sub.add_parser("cache-score", help="fit the sparse cache's learned score for a converted model (`linearize "
                                           "convert` does it after training)",
                       description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a converted model folder (`linearize convert --out`); saved in place")
    p.add_argument("--rows", type=int, default=ROWS, help="look-up rows to fit on (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help="tokens per row (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=lambda args: fit_run(args.folder, args.rows, args.seq_len, progress=not args.no_progress))
