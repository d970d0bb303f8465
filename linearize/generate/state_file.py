"""Saved decoding states: prefill a long document once, keep its fixed-size DecodingState in a safetensors file, and
answer later prompts from it without reading the document again (`linearize prefill`, `generate --state`, and the
named states of `linearize serve`). A KV-cache model cannot do this cheaply: its state is the whole context.

File layout (safetensors, written atomically):

    layers.{i}.kv                      (B, Hkv, F, d+1) linear memory of layer i (absent without a linear part)
    layers.{i}.win.{k,v,log_gate,beta} the softmax window's key streams (a ring: metadata `start` is its oldest slot)
    layers.{i}.sinks.{k,v,position}    attention-sink keys that left the window (absent until one has; held as the
                                       cache holds its keys)
    layers.{i}.cache.{k,v,position}    the sparse cache's keys (ops/sparse_cache/; absent without one; position:
                                       their positions, for a cache scored at a distance)
    layers.{i}.heavy.{k,v,received}    the heavy hitters (ops/heavy_hitters/; absent without them)
    logits                             (1, V) next-token logits after the last token: lets an empty prompt continue
    metadata "linearize_state": JSON   {format, version, model (fingerprint), dtype, seen, layers: [null | {seen,
                                        start, kv: bool, win: [streams], sinks / cache / heavy: [streams] | null}],
                                        plus what the caller adds (document, ...)}

The fingerprint names the model that made the state (its config, the digest of its whole weights file and any
training-free settings it was loaded with): a state made by another model, even one converted from the same teacher
with another budget, or by this one in another dtype, is refused with a one-line error. Loading one into the same model
reproduces decoding exactly: prefill(doc) then generate(q) == load then generate(q), token for token.
"""

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..errors import LinearizeError
from ..layers.linear_attention import DecodingState
from ..ops.hybrid.state import LinearAttentionState, Streams
from ..run_folder import CONFIG, WEIGHTS, check_converted, load_tensors, save_tensors, write_text
from ..training_free import TrainingFree

FORMAT, VERSION = "linearize-decoding-state", 2  # 2: sinks held as the cache holds its keys
META_KEY = "linearize_state"
WINDOW_STREAMS = ("k", "v", "log_gate", "beta", "received", "position")  # what a state keeps of a token
REPREFILL = "prefill the document again with this model (`linearize prefill`)"
WEIGHTS_DIGEST = "model.safetensors.sha256"  # beside the weights: their digest, for the fingerprint


def weights_digest(weights: Path) -> str:
    """sha256 of a weights file, read in full once and then kept beside it (WEIGHTS_DIGEST, valid while the file's
    size and modification time are the ones recorded; a folder that cannot be written just recomputes it)."""
    stat = weights.stat()
    key = f"{stat.st_size} {stat.st_mtime_ns}"
    kept = weights.with_name(WEIGHTS_DIGEST)
    try:
        recorded_key, digest = kept.read_text().rsplit(" ", 1)
        if recorded_key == key:
            return digest
    except (OSError, ValueError):
        pass
    with open(weights, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        write_text(f"{key} {digest}", kept)
    except OSError:
        pass
    return digest


def model_fingerprint(run: str | Path, training_free: TrainingFree | None = None) -> str:
    """A short id of a converted model as it decodes: sha256 of its config.json (the attention settings it was saved
    with, training-free ones included), the full content of its weights file (weights_digest: any retraining
    changes it) and the training-free settings it was loaded with (`training_free`, None values ignored)."""
    run = check_converted(run)
    h = hashlib.sha256((run / CONFIG).read_bytes())
    if (run / WEIGHTS).is_file():
        h.update(weights_digest(run / WEIGHTS).encode())
    given = dict(sorted(training_free.given().items())) if training_free is not None else {}
    if given:
        h.update(json.dumps(given, sort_keys=True).encode())
    return h.hexdigest()[:16]


def check_writable(path: str | Path) -> Path:
    """`path` as a Path once a state file can be written there (checked before a long prefill, by creating and
    removing its temporary file), else a LinearizeError naming the problem and the fix."""
    path = Path(path)
    if path.is_dir():
        raise LinearizeError(f"--save {path} is a folder; give a file name, e.g. {path / 'state.safetensors'}")
    if not path.parent.is_dir():
        raise LinearizeError(f"--save {path}: folder {path.parent} does not exist; create it or choose another path")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.touch()
        tmp.unlink()
    except OSError as e:
        raise LinearizeError(f"--save {path} cannot be written ({e.strerror or e}); choose another path") from e
    return path


def copy_state(state: DecodingState) -> DecodingState:
    """An independent copy (decoding writes a state's window in place: a named state is copied per request)."""
    return copy.deepcopy(state)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _names(streams: Streams) -> list[str]:
    return [n for n in WINDOW_STREAMS if getattr(streams, n) is not None]


def _streams_tensors(prefix: str, streams: Streams) -> dict:
    return {f"{prefix}.{n}": getattr(streams, n) for n in _names(streams)}


def save_state(path: str | Path, state: DecodingState, logits: torch.Tensor, model: str, dtype: torch.dtype,
               **info) -> None:
    """Write `state` and its next-token logits (1, V) to `path` (safetensors, atomically). model: the fingerprint of
    the model that made it (model_fingerprint); dtype: that model's; info: JSON-able extras kept in the metadata."""
    tensors, layers = {"logits": logits.detach().clone()}, []
    for i, s in enumerate(state):
        if s is None:
            layers.append(None)
            continue
        part = _streams_tensors(f"layers.{i}.win", s.win)
        if s.kv is not None:
            part[f"layers.{i}.kv"] = s.kv
        held = {"sinks": s.sinks, "cache": s.cache, "heavy": s.heavy}
        for name, streams in held.items():
            if streams is not None:
                part.update(_streams_tensors(f"layers.{i}.{name}", streams))
        tensors.update({k: v.detach().clone() for k, v in part.items()})  # no shared storage (safetensors refuses it)
        layers.append({"seen": s.seen, "start": s.start, "kv": s.kv is not None, "win": _names(s.win),
                       **{name: None if x is None else _names(x) for name, x in held.items()}})
    meta = {"format": FORMAT, "version": VERSION, "model": model, "dtype": _dtype_name(dtype),
            "seen": state.seen, "layers": layers, **info}
    try:
        save_tensors(tensors, path, metadata={META_KEY: json.dumps(meta)})
    except OSError as e:
        raise LinearizeError(f"could not write the state to {path} ({e.strerror or e}); choose another path") from e


def read_state_info(path: str | Path) -> dict:
    """The metadata of a state file, or a LinearizeError saying why it is not one."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LinearizeError(f"state file {path} not found; make it with `linearize prefill RUN DOC --save {path}`")
    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except (SafetensorError, OSError, ValueError) as e:
        raise LinearizeError(f"{path} is not a readable safetensors file ({e}); prefill the document again") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise LinearizeError(f"{path} is not a linearize decoding state (version {VERSION}); make one with "
                             "`linearize prefill`")
    return meta


def check_state(path: str | Path, model: str, dtype: torch.dtype) -> dict:
    """The metadata of a state file that the model with fingerprint `model` in `dtype` can use (cheap: reads no
    tensors), else a LinearizeError saying why not."""
    meta = read_state_info(path)
    if meta["model"] != model:
        raise LinearizeError(f"state {path} was made by another model (fingerprint {meta['model']}, this model is "
                             f"{model}); {REPREFILL}")
    if meta["dtype"] != _dtype_name(dtype):
        raise LinearizeError(f"state {path} was made in {meta['dtype']}, this model runs in {_dtype_name(dtype)}; "
                             f"load the model with --dtype {meta['dtype']} or {REPREFILL}")
    return meta


def load_state(path: str | Path, model: str, dtype: torch.dtype, device="cpu"):
    """Read a state file made by the model with fingerprint `model` in `dtype` -> (DecodingState on `device`,
    next-token logits (1, V), metadata). A state of another model or dtype, or a damaged file: LinearizeError."""
    meta = check_state(path, model, dtype)
    tensors = {k: v.to(device) for k, v in load_tensors(path).items()}
    try:
        state = DecodingState(len(meta["layers"]))
        state.seen = meta["seen"]
        for i, layer in enumerate(meta["layers"]):
            if layer is None:
                continue

            def streams(part, names):
                return Streams(**{n: tensors[f"layers.{i}.{part}.{n}"] for n in names})

            held = {name: None if layer.get(name) is None else streams(name, layer[name])
                    for name in ("sinks", "cache", "heavy")}
            state[i] = LinearAttentionState(kv=tensors[f"layers.{i}.kv"] if layer["kv"] else None,
                                            win=streams("win", layer["win"]), start=layer["start"],
                                            seen=layer["seen"], **held)
        return state, tensors["logits"], meta
    except (KeyError, TypeError) as e:
        raise LinearizeError(f"state {path} is incomplete (missing {e}); {REPREFILL}") from e
