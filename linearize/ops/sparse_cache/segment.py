"""The sparse cache in chunked form: the tokens go in segments that never cross a selection (the memory is fixed
within one), and at a selection the cache keeps its worst recalled keys (selection.py) while the others enter
the memory.

- attention_cached(streams, spec, layer, state, longest): segment by segment, the state moving on in place.
- select_when_due(state, spec, layer): the selection after the tokens at positions p with (p + 1) % cache_every == 0.
"""

import torch

from ..hybrid.spec import AttentionSpec, LayerConstants
from ..hybrid.state import LinearAttentionState, Streams, then
from ..hybrid.terms import capped, combine, exact_num, group, ones_column, per_group
from .positions import cache_queries, cache_scores, rope_keys, to_cache
from .selection import gather_time, keep_worst_recalled, learned_score, pooled, self_recall_error


def attention_cached(streams: Streams, spec: AttentionSpec, layer: LayerConstants, state: LinearAttentionState,
                     longest: int) -> torch.Tensor:
    """Feed the tokens in segments of at most `longest` that never cross a selection; `state` moves on in place.
    Returns y (B, H, T, d)."""
    ys, t, T = [], 0, len(streams)
    while t < T:
        n = min(longest, spec.cache_every - state.seen % spec.cache_every, T - t)
        ys.append(cached_segment(streams.slice(slice(t, t + n)), spec, layer, state))
        t += n
    return torch.cat(ys, dim=2) if ys else torch.zeros_like(streams.q)


def cached_memory_size(state: LinearAttentionState) -> int:
    """How many keys the memory of a state with a sparse cache holds: every token seen that is not exact (in the
    window, the sinks or the cache)."""
    return state.seen - len(state.win) - sum(0 if p is None else len(p) for p in (state.sinks, state.cache))


def cached_segment(streams: Streams, spec: AttentionSpec, layer: LayerConstants, state: LinearAttentionState):
    """n tokens that end at or before the next selection: each query attends exactly to the state's sinks and cache
    and (causally) to the window and the segment's keys, and reads the memory, which is fixed until the selection.
    Then the keys that left the window join the sinks or the cache, and at a selection the cache keeps its worst
    recalled keys (selection.py). Returns y (B, H, n, d); replaces the state's fields (no tensor is written)."""
    if streams.log_gate is not None:
        raise ValueError("the sparse cache supports the sum rule without a forget gate")
    q, inv_freq = streams.q, layer.inv_freq
    n = q.shape[2]
    in_memory = cached_memory_size(state)
    keys = state.in_order().append(streams.keys())  # k, v (a cache has no gate or strength)
    w, Hkv = len(keys) - n, keys.k.shape[1]
    qg = group(q, Hkv)
    first = state.seen - w  # the position of keys[0]
    pos_q = torch.arange(state.seen, state.seen + n, device=q.device)[:, None]
    pos_k = torch.arange(first, first + w + n, device=q.device)[None, :]
    causal = pos_k <= pos_q
    reference = causal & ((pos_k > pos_q - spec.window) | (pos_k < spec.sinks))  # the window and the sinks
    s = per_group(qg, keys.k.transpose(-1, -2)) * spec.scale  # (B, Hkv, G, n, len(keys))
    left = max(len(keys) - spec.window, 0)  # keys 0 .. left-1 leave the window during the segment
    leaving = to_cache(keys.slice(slice(0, left)), first, spec, inv_freq)
    n_sinks = 0 if state.sinks is None else len(state.sinks)
    n_held = n_sinks + (0 if state.cache is None else len(state.cache))  # exact keys held outside the window
    out_of_reach = (pos_q[:, 0] - spec.window - first + 1).clamp(0, left)  # leaving keys outside each query's window
    qg_cache = cache_queries(qg, pos_q[:, 0], spec, inv_freq, n_held + out_of_reach)
    if spec.cache_distance is not None and left:  # such a key is cached (or a sink) for the queries it is out of
        near = (pos_k > pos_q - spec.window) | ~causal  # reach of: scored at the distance, after sinks and cache
        far = cache_scores(qg_cache, leaving, spec, inv_freq, first=n_held)
        s[..., :left] = torch.where(near[:, :left], s[..., :left], far)
    s = s.masked_fill(~causal, float("-inf"))
    parts = [(keys, s)]
    m_ref = s.masked_fill(~reference, float("-inf")).amax(-1, keepdim=True)  # the largest window/sink score
    if state.sinks is not None:
        parts.append((state.sinks, cache_scores(qg_cache, state.sinks, spec, inv_freq)))  # held, scored as the cache
        m_ref = torch.maximum(m_ref, parts[-1][1].amax(-1, keepdim=True))
    if state.cache is not None:
        parts.append((state.cache, cache_scores(qg_cache, state.cache, spec, inv_freq, first=n_sinks)))
    m = torch.stack([s.amax(-1, keepdim=True) for _, s in parts]).amax(0)
    num_sm = sum(exact_num(s, part.v, m) for part, s in parts)
    lin = None
    if spec.memory:  # the memory was trained against the window and sinks: in units of exp(s - m_ref)
        lin = capped(per_group(group(streams.fq, Hkv), state.kv) * torch.exp(m_ref - m), in_memory, spec)
    y = combine(num_sm, lin, layer.mix, Hkv)
    n_sink = min(max(spec.sinks - first, 0), left)
    if n_sink:
        state.sinks = then(state.sinks, leaving.slice(slice(0, n_sink)))
    if left > n_sink:
        state.cache = then(state.cache, leaving.slice(slice(n_sink, left)))
    state.win, state.start, state.seen = keys.slice(slice(left, None)), 0, state.seen + n
    select_when_due(state, spec, layer)
    return y


def select_when_due(state: LinearAttentionState, spec: AttentionSpec, layer: LayerConstants):
    """After the tokens at positions p with (p + 1) % cache_every == 0: a selection, if the cache has too many keys."""
    if state.seen % spec.cache_every == 0 and state.cache is not None and len(state.cache) > spec.cache:
        select(state, spec, layer)


def ranking(cache: Streams, fk: torch.Tensor | None, memory: torch.Tensor | None, spec: AttentionSpec,
            layer: LayerConstants) -> torch.Tensor:
    """(B, Hkv, n): the score the selection keeps the largest of, before pooling: the self-recall error, or the
    fitted score (spec.cache_score "learned"; the cache then holds its keys with their RoPE undone)."""
    if spec.cache_score == "learned":
        return learned_score(cache.k, cache.v, layer.cache_scorer)
    return self_recall_error(fk, cache.v, memory)


def select(state: LinearAttentionState, spec: AttentionSpec, layer: LayerConstants):
    """The cache keeps the spec.cache keys of each head ranked highest (ranking); the rest enter the memory."""
    cache = state.cache
    fk = layer.key_features(rope_keys(cache, layer.inv_freq)) if spec.memory else None
    errors = pooled(ranking(cache, fk, state.kv, spec, layer), spec.cache_pool)
    kept, evicted = keep_worst_recalled(errors, spec.cache)
    if spec.memory:
        fk_out, v_out = gather_time(fk, evicted), gather_time(cache.v, evicted)
        state.kv = state.kv + fk_out.transpose(-1, -2) @ ones_column(v_out)  # S += sum phi(k)^T [v, 1]
    state.cache = Streams(gather_time(cache.k, kept), gather_time(cache.v, kept),
                          position=None if cache.position is None else torch.take_along_dim(cache.position, kept, 2))
