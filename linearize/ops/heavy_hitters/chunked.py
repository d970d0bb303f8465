"""The heavy hitters in hybrid/chunked.py's block form: every query of the block picks its best far keys at once.

heavy_chunked adds a block's heavy keys to the exact part (and takes them out of the linear memory's read-out);
heavy_final gives the state after the block: the last query's best keys, the memory without them.
"""

from dataclasses import replace

import torch

from ..hybrid.spec import AttentionSpec
from ..hybrid.state import Streams
from ..hybrid.terms import exact_num, ones_column, per_group
from .recurrent import heavy_keys
from .selection import heavy_sets, split


def heavy_chunked(qg, fq, keys: Streams, state, spec: AttentionSpec, n_sink: int, w: int, num_sm, m, lin,
                  key_features):
    """The heavy hitters of hybrid_chunked's queries qg (B, Hkv, G, T, d) (the first w are placeholders for the
    state's window keys): candidates are the state's heavy keys (far for every query) then the keys that leave the
    window here (local index n_sink .. T - W - 1, their received attention final); query u picks the best
    spec.heavy of the state's and those with index <= u - W. Adds their exact terms to num_sm (re-based from m to
    the largest score m' where a heavy key outscores the window and sinks) and, in the same units, takes them out of
    the linear memory lin, to which the state's heavy keys are added (lin holds the keys that left the window here,
    and the state's memory, which holds none of its heavy keys). Returns (num_sm, lin, candidates) with
    candidates = (Streams k, v, received[, fk], how many came from the state, the last query's best (B, Hkv, N) bool:
    the heavy keys the state keeps)."""
    T, W = len(keys), spec.window
    leaving = keys.slice(slice(n_sink, max(T - W, n_sink)))
    parts = [] if state is None or state.heavy is None else [state.heavy]
    held = len(parts[0]) if parts else 0
    if spec.memory and held:
        parts[0] = replace(parts[0], fk=key_features(parts[0].k))
    parts.append(Streams(leaving.k, leaving.v, fk=leaving.fk if spec.memory else None, received=leaving.received))
    cand = parts[0] if len(parts) == 1 else parts[0].append(parts[1])
    if not len(cand):
        return num_sm, lin, (cand, held, None)
    u = torch.arange(T, device=qg.device)
    available = torch.where(u >= w, held + (u - W - n_sink + 1).clamp(0, len(leaving)), 0)
    cols, heavy = heavy_sets(cand.received, available, spec.heavy)  # the state's held keys included
    part = cand.slice(cols)
    s = (per_group(qg, part.k.transpose(-1, -2)) * spec.scale).masked_fill(~heavy.unsqueeze(2), float("-inf"))
    m_all = torch.maximum(m, s.amax(-1, keepdim=True))
    num_sm = num_sm * torch.exp(m - m_all) + exact_num(s, part.v, m_all)
    if lin is not None:  # + the state's heavy keys, - the heavy keys of each query; then in units of m'
        sign = (cols < held).to(lin.dtype) - heavy.to(lin.dtype)  # (B, Hkv, T, n)
        a = per_group(fq, part.fk.transpose(-1, -2)) * sign.unsqueeze(2)
        lin = (lin + per_group(a, ones_column(part.v))) * torch.exp(m - m_all)
    last = heavy.new_zeros(*heavy.shape[:2], len(cand))
    last[..., cols] = heavy[..., -1, :]  # the last query chooses from every candidate
    return num_sm, lin, (cand, held, last)


def heavy_final(candidates, spec: AttentionSpec, memory):
    """After hybrid_chunked: the best spec.heavy candidates stay (Streams k, v, received in position order); the
    memory (the linear part's final one, holding every key that left the window) gains the state's heavy keys and
    loses the kept ones. Returns (heavy Streams or None, memory)."""
    cand, held, last = candidates
    if not len(cand):
        return None, memory
    kept, _ = split(last, min(spec.heavy, len(cand)))
    heavy = heavy_keys(cand, kept)
    if memory is not None:
        index = torch.arange(len(cand), device=cand.k.device)
        sign = (index < held).to(memory.dtype).expand(cand.received.shape).clone()
        sign.scatter_add_(-1, kept, -torch.ones_like(kept, dtype=memory.dtype))
        memory = memory + (cand.fk * sign[..., None]).transpose(-1, -2) @ ones_column(cand.v)
    return heavy.clone(), memory
