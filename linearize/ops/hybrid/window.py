"""The decoding state's window ring, and where a key goes when it leaves the window.

A key leaves the window W tokens after it came; then it is, by the first rule that applies:
    a sink (one of the first S tokens): exact for ever (held as the sparse cache holds its keys);
    with a sparse cache: exact in the cache until its next selection (sparse_cache/);
    with heavy hitters: one of the heavy keys, until each head drops its worst into the memory (heavy_hitters/);
    else: written into the linear memory (dropped without one).
"""

from dataclasses import replace

from ..heavy_hitters.recurrent import admit
from ..linear_memory import memory_step
from ..sparse_cache.positions import to_cache
from .spec import AttentionSpec, LayerConstants
from .state import LinearAttentionState, Streams, then
from .terms import ones_column


def empty_state(streams: Streams, spec: AttentionSpec) -> LinearAttentionState:
    """The state before the first token: an empty window and a zero memory."""
    kv = None
    if spec.memory:
        B, Hkv, _, d = streams.v.shape
        kv = streams.v.new_zeros(B, Hkv, streams.fk.shape[-1], d + (0 if spec.delta else 1))
    window = streams.keys().slice(slice(0, 0))
    if spec.heavy:
        window = replace(window, received=streams.k.new_zeros(streams.k.shape[:2] + (0,)))
    return LinearAttentionState(kv, window)


def push_window(state: LinearAttentionState, spec: AttentionSpec, new: Streams, layer: LayerConstants):
    """One new token's streams (B, Hkv, 1, .) enter the window. Once it is full, the oldest key leaves it (with
    W = 0: the new key itself; leave_window) and the new key takes its slot in place; an unbounded window (a KV
    cache) just grows."""
    window = spec.window
    position = state.seen
    state.seen += 1
    if window is None or len(state.win) < window:
        state.win = state.win.append(new.keys())
        return
    i = state.start
    leaving = new if window == 0 else state.win.slice(slice(i, i + 1))
    leave_window(state, spec, leaving, position - window, layer)
    if window == 0:
        return
    state.win.write(i, new.keys())
    state.start = (i + 1) % window


def leave_window(state: LinearAttentionState, spec: AttentionSpec, leaving: Streams, position: int,
                 layer: LayerConstants):
    """The key `leaving` (B, Hkv, 1, .), at `position`, left the window: to the sinks, the sparse cache, the heavy
    keys or the linear memory (the module docstring). With W = 0 it carries its features fk."""
    if position < spec.sinks:  # held as the cache holds its keys (scored at its distance, if it has one)
        state.sinks = then(state.sinks, to_cache(leaving, position, spec, layer.inv_freq).clone())
    elif spec.cache:  # it waits, exact, in the sparse cache for the next selection
        state.cache = then(state.cache, to_cache(leaving, position, spec, layer.inv_freq).clone())
    elif spec.heavy:  # the best far keys stay exact; the one each head drops enters the memory
        admit(state, spec, leaving, layer.key_features)
    elif state.kv is not None:
        fk = leaving.fk if spec.window == 0 else layer.key_features(leaving.k)
        values = leaving.v if spec.delta else ones_column(leaving.v)
        state.kv = memory_step(fk, values, leaving.log_gate, leaving.beta, state.kv)
