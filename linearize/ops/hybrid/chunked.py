"""The chunked form: O(T * (chunk + W)) memory, for training and prefill (in blocks, continuing a state).

attention_chunked(streams, spec, layer, initial_state, output_final_state, chunk) -> (y, state | None): the sparse
cache segment by segment (sparse_cache/segment.py), or the window + sinks + linear memory hybrid, with heavy hitters
where spec.heavy (heavy_hitters/chunked.py). The linear memory runs on flash-linear-attention's kernels where
fla_kernels.fla_usable says so (CUDA, LINEARIZE_FLA_KERNELS=1), the exact part of a fresh call on flex_attention
where composed.usable says so (CUDA, LINEARIZE_FLEX_ATTENTION=1).

A call continuing a state sees the state's w window keys (oldest first) then its own: T keys in all, with w
placeholder queries in front whose outputs are dropped.
"""

from dataclasses import replace

import torch
import torch.nn.functional as F

from .. import fla_kernels
from . import composed
from ..heavy_hitters.chunked import heavy_chunked, heavy_final
from ..linear_memory import memory_chunked
from ..sparse_cache.segment import attention_cached
from .spec import AttentionSpec, LayerConstants
from .state import LinearAttentionState, Streams, then
from .terms import capped, combine, exact_num, group, keys_in_memory, linear_part, ones_column, pad_time, per_group
from .window import empty_state


def attention_chunked(streams: Streams, spec: AttentionSpec, layer: LayerConstants,
                      initial_state: LinearAttentionState | None = None, output_final_state: bool = False,
                      chunk: int = 64):
    """Same result as attention_quadratic in O(T * (chunk + W)) memory. Returns (y (B, H, T, d), the
    LinearAttentionState after the last token if output_final_state else None).
    initial_state: continue after the tokens it holds (prefill in blocks): its window keys are prepended to this
    block's keys (with w placeholder queries whose outputs are dropped), its sinks and memory are the starting
    ones (it is not modified)."""
    if spec.cache:  # segment by segment between the cache's selections
        state = empty_state(streams, spec) if initial_state is None else replace(initial_state)
        y = attention_cached(streams, spec, layer, state, spec.cache_every)
        return y, state if output_final_state else None
    return hybrid_chunked(streams, spec, layer, initial_state, output_final_state, chunk)


def hybrid_chunked(streams: Streams, spec: AttentionSpec, layer: LayerConstants, state: LinearAttentionState | None,
                   output_final_state: bool, chunk: int):
    """The window + sinks + linear memory hybrid (+ heavy hitters) in chunks; attention_chunked's contract."""
    keys = _block_keys(streams, spec, state, layer.key_features)
    w = 0 if state is None else len(state.win)
    first = 0 if state is None else state.seen - w  # the position of keys[0]
    Hkv, T = keys.k.shape[1], len(keys)  # T counts the prepended window keys
    W = T if spec.window is None else spec.window
    n_sink = 0 if spec.window is None else min(max(spec.sinks - first, 0), T)  # keys < n_sink: sinks
    lin, memory = _memory_read(streams.fq, keys, spec, state, W, n_sink, w, chunk) if spec.memory else (None, None)
    sink_set = None if spec.window is None else sinks_outside_window(state, keys, n_sink, W)
    heavy = None
    if lin is None and W >= T and sink_set is None and not spec.heavy:  # exact causal softmax: PyTorch's kernel
        y = _causal_softmax(streams.q, keys, w, spec.scale)
    else:
        if composed.usable(streams.q, state=state, window=spec.window, heavy=spec.heavy):  # one fused kernel
            num_sm = composed.exact_part(streams.q, keys.k, keys.v, W, spec.sinks, spec.scale)
        else:
            qg = group(pad_time(streams.q, w, 0), Hkv)
            num_sm, m, keys = _window_and_sinks(qg, keys, sink_set, W, spec, chunk, w)
        if spec.heavy:
            fq = group(pad_time(streams.fq, w, 0), Hkv) if spec.memory else None
            num_sm, lin, heavy = heavy_chunked(qg, fq, keys, state, spec, n_sink, w, num_sm, m, lin,
                                               layer.key_features)
        if spec.memory:
            lin = capped(lin, keys_in_memory(torch.arange(first, first + T, device=keys.k.device), spec), spec)
        y = combine(num_sm, lin, layer.mix, Hkv, spec.delta, layer.norm_gain)[:, :, w:]
    if not output_final_state:
        return y, None
    return y, _final_state(keys, spec, state, memory, heavy, n_sink, first + T)


def _block_keys(streams: Streams, spec: AttentionSpec, state: LinearAttentionState | None, key_features) -> Streams:
    """The keys this call's queries read: the state's window keys (oldest first; their features recomputed) then
    the call's own: k, v, log_gate, beta, and fk where there is a memory, received (zero so far) with heavy
    hitters."""
    keys = streams.keys()
    if spec.memory:
        keys = replace(keys, fk=streams.fk)
    if spec.heavy:
        keys = replace(keys, received=streams.k.new_zeros(streams.k.shape[:3]))
    if state is not None and len(state.win):
        old = state.in_order()
        keys = (replace(old, fk=key_features(old.k)) if spec.memory else old).append(keys)
    return keys


def _memory_read(fq, keys: Streams, spec: AttentionSpec, state: LinearAttentionState | None, W: int, n_sink: int,
                 w: int, chunk: int):
    """The linear memory's read-out for each query (B, Hkv, G, T, X): the state's memory and the keys that left the
    query's window, sinks excepted (a zero key leaves the memory unchanged). Returns (lin, the memory after the
    last key)."""
    T = len(keys)
    fk_mem = keys.fk.masked_fill(torch.arange(T, device=keys.k.device)[:, None] < n_sink, 0.0) if n_sink else keys.fk
    kernel = fla_kernels.fla_usable(fq, keys.fk, keys.v, keys.log_gate, keys.beta)
    chunked = fla_kernels.memory_fla if kernel else memory_chunked  # the same contract
    return linear_part(pad_time(fq, w, 0), replace(keys, fk=fk_mem), spec, W, chunked, chunk=chunk,
                       state=None if state is None else state.kv)


def _causal_softmax(q, keys: Streams, w: int, scale: float):
    """Exact causal softmax, PyTorch's kernel: query i (B, H, n, d) sees keys <= w + i. Returns (B, H, n, d)."""
    causal = torch.ones(q.shape[2], len(keys), dtype=torch.bool, device=q.device).tril(w)
    return F.scaled_dot_product_attention(q, keys.k, keys.v, attn_mask=causal if w else None, is_causal=not w,
                                          scale=scale, enable_gqa=True)


def _window_and_sinks(qg, keys: Streams, sink_set, W: int, spec: AttentionSpec, chunk: int, w: int):
    """The exact part of queries qg (B, Hkv, G, T, d): each one's window (W > 0) and the sinks outside it (sink_set:
    sinks_outside_window's). Returns (numerator (B, Hkv, G, T, d+1), m (B, Hkv, G, T, 1) the max score it is in
    units of, keys: with heavy hitters their received attention grown by this call's queries)."""
    num_sm = m = s_sink = None
    if sink_set is not None:
        sinks, visible = sink_set
        s_sink = (per_group(qg, sinks.k.transpose(-1, -2)) * spec.scale).masked_fill(~visible, float("-inf"))
        m = s_sink.amax(-1, keepdim=True)
    if W > 0:
        num_sm, m, received = sliding_window_chunked(qg, keys.k.unsqueeze(2), ones_column(keys.v).unsqueeze(2), W,
                                                     spec.scale, chunk, m, w if spec.heavy else None)
        if received is not None:
            keys = replace(keys, received=keys.received + received)
    if s_sink is not None:
        num_sink = exact_num(s_sink, sinks.v, m)
        num_sm = num_sink if num_sm is None else num_sm + num_sink
    return num_sm, m, keys


def _final_state(keys: Streams, spec: AttentionSpec, state: LinearAttentionState | None, memory, heavy, n_sink: int,
                 seen: int) -> LinearAttentionState:
    """The state after the call's last key (the state passed in is not modified): the keys still in the window,
    the sinks that left it, the heavy keys (heavy_final), the memory."""
    old = 0 if spec.window is None else max(len(keys) - spec.window, 0)  # keys 0 .. old-1 have left the window
    sinks = None if state is None else state.sinks
    if left := min(old, n_sink):  # sinks that left the window in this block
        sinks = then(sinks, Streams(keys.k, keys.v).slice(slice(0, left)).clone())
    if heavy is not None:  # the best of the far keys stay exact, the others go into the memory
        heavy, memory = heavy_final(heavy, spec, memory)
    window = keys.keys().slice(slice(old, None)).clone()  # decoding writes it in place
    return LinearAttentionState(memory, window, sinks=sinks, seen=seen, heavy=heavy)


def sliding_window_chunked(q, k, v1, window: int, scale: float, chunk: int, floor=None, received_from=None):
    """sum over the W most recent keys of exp(s_ij - m_i) v1_j, with m_i the max score in the window (or `floor`
    (B, Hkv, G, T, 1) where that is larger). q (B, Hkv, G, T, d), k (B, Hkv, 1, T, d), v1 (B, Hkv, 1, T, D) ->
    (numerator (B, Hkv, G, T, D), m (B, Hkv, G, T, 1), received). Each block of `chunk` queries sees chunk + W - 1
    keys. received_from = r (an int): received (B, Hkv, T) is the window attention each key draws from the queries
    r .. T-1 (the heavy hitters' score, summed over the group; the last column of v1 must be ones), else None."""
    B, Hkv, G, T, d = q.shape
    n = -(-T // chunk)
    span = chunk + window - 1
    q = pad_time(q, 0, n * chunk - T).view(B, Hkv, G, n, chunk, d)
    # key position p sits at padded index p + W - 1; block b covers padded indices [b*chunk, b*chunk + span)
    k = pad_time(k, window - 1, n * chunk - T).unfold(-2, span, chunk).transpose(-1, -2)  # (B,Hkv,1,n,span,d)
    v1 = pad_time(v1, window - 1, n * chunk - T).unfold(-2, span, chunk).transpose(-1, -2)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, n, chunk, span)
    a = torch.arange(chunk, device=q.device)[:, None]
    b = torch.arange(span, device=q.device)[None, :]
    key_pos = torch.arange(n, device=q.device)[:, None, None] * chunk + b - (window - 1)  # (n, 1, span)
    valid = (b >= a) & (b <= a + window - 1) & (key_pos >= 0)  # (n, chunk, span)
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if floor is not None:
        m = torch.maximum(m, pad_time(floor, 0, n * chunk - T).view(B, Hkv, G, n, chunk, 1))
    e = torch.exp(s - m)
    received = None
    if received_from is not None:  # the window's own softmax, summed over the group and the queries
        query_pos = torch.arange(n, device=q.device)[:, None] * chunk + a[:, 0]  # (n, chunk)
        real = ((query_pos >= received_from) & (query_pos < T))[:, :, None]  # placeholders and padding draw nothing
        with torch.no_grad():  # a score for choosing keys: no gradient flows through it
            p = torch.where(real, e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny), 0.0)
            per_block = p.sum((2, 4))  # (B, Hkv, n, span)
            padded = per_block.new_zeros(B, Hkv, n * chunk + window - 1)
            index = (torch.arange(n, device=q.device)[:, None] * chunk + b).reshape(-1)  # padded index of each slot
            padded.index_add_(-1, index, per_block.reshape(B, Hkv, -1))
            received = padded[..., window - 1 : window - 1 + T]
    num = (e @ v1).reshape(B, Hkv, G, n * chunk, -1)[:, :, :, :T]
    return num, m.reshape(B, Hkv, G, n * chunk, 1)[:, :, :, :T], received


def sinks_outside_window(state, keys: Streams, n_sink: int, window: int):
    """The sink keys that this stream's queries read outside their window: the ones the state holds (every query
    sees them) and the first n_sink keys of the stream, which query t sees once they left its window (s <= t - W).
    Returns (Streams k, v (B, Hkv, N, d), visible (T, N) bool), or None when there are none."""
    T = len(keys)
    t = torch.arange(T, device=keys.k.device)[:, None]
    held = None if state is None else state.sinks
    n_held = 0 if held is None else len(held)
    n_new = n_sink if window < T else 0  # with W >= T no key of the stream leaves the window
    if not n_held and not n_new:
        return None
    sinks = Streams(keys.k, keys.v).slice(slice(0, n_new))
    sinks = sinks if held is None else held.append(sinks)
    visible = torch.cat([t.new_ones(T, n_held, dtype=torch.bool),
                         torch.arange(n_new, device=keys.k.device)[None, :] <= t - window], dim=1)
    return sinks, visible
