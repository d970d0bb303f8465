"""Hybrid sliding-window + linear attention (LoLCATs eq. 7) in three forms of the same math.

For query i, keys j with i - W < j <= i (the W most recent) get exact softmax weights, older keys
(j <= i - W) are read from a linear memory (linear_memory.py) that a key enters when it leaves the window:

    sum rule (default):  y_i = sum_j a_ij [v_j, 1] -> divided by its last column (one shared normaliser),
        a_ij = w_h * exp(s_ij - m_i)                     if j in E_i = {i - W < j <= i} + {j < S, j <= i}
        a_ij = (1 - w_h) * decay_ij * phi(q_i) . phi(k_j) if S <= j <= i - W                 (s_ij = q_i . k_j * scale)
        decay_ij = prod of the forget gates g_l of the keys j < l <= i - W (1 without a gate); m_i = max over E_i
    delta rule (beta given): y_i = w_h * softmax output over E_i + (1 - w_h) * phi(q_i) S_{i-W}, with S the
        (gated) delta-rule memory of keys S <= j <= i - W (no normaliser: the delta rule stores values directly).

w_h in (0, 1) is a per-head mixing factor. W = 0: pure linear; W = None: full causal softmax, no linear part.
S = `sinks`: the first S tokens of the sequence stay in exact softmax for ever (attention sinks, StreamingLLM);
they never enter the linear memory. S = 0: a window and a memory only.
fq = fk = None: no linear part at all (exact sliding-window softmax, + sinks: StreamingLLM; with W >= T exact
softmax attention).

Shapes: q (B, H, T, d) and k, v (B, Hkv, T, d) after RoPE; fq = phi(q) (B, H, T, F), fk = phi(k) (B, Hkv, T, F);
mix (H,); log_gate, beta (B, Hkv, T) or None. Grouped-query attention: H = G * Hkv, query head h uses key head
h // G (as in transformers).

- attention_quadratic: the T x T reference (tests only).
- attention_chunked: O(T) memory, for training and prefill; can return the decoding state.
- attention_recurrent: one token at a time from a LinearAttentionState, for decoding.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .linear_memory import memory_chunked, memory_naive, memory_step

EPS = 1e-6


@dataclass
class LinearAttentionState:
    """Everything decoding needs; constant in context length unless the window is unbounded (W = None).
    kv: (B, Hkv, F, d+1) sum-rule memory of [v, 1] (delta rule: (B, Hkv, F, d)), None without a linear part;
    win_k, win_v: (B, Hkv, <=W, d), win_log_gate / win_beta: (B, Hkv, <=W) or None: the most recent keys, still
    in the softmax window (their features phi(k) are recomputed by `key_features` when they leave it). Once the window is full its buffers are a ring: decoding
    overwrites the oldest key in place, and `start` is the slot of the oldest key (window() gives time order).
    sink_k, sink_v: (B, Hkv, <=S, d): the sink tokens (the first S of the sequence) that have left the window
    (None until one has); seen: tokens consumed so far (the position of the next one)."""

    kv: torch.Tensor | None
    win_k: torch.Tensor
    win_v: torch.Tensor
    win_log_gate: torch.Tensor | None = None
    win_beta: torch.Tensor | None = None
    start: int = 0
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    seen: int = 0

    def buffers(self) -> tuple:
        return self.win_k, self.win_v, self.win_log_gate, self.win_beta

    def window(self) -> tuple:
        """(win_k, win_v, win_log_gate, win_beta) in time order, oldest first."""
        if self.start == 0:
            return self.buffers()
        return tuple(None if x is None else x.roll(-self.start, dims=2) for x in self.buffers())

    def nbytes(self) -> int:
        tensors = (self.kv, *self.buffers(), self.sink_k, self.sink_v)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: the last column of a weighted sum of these is the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, Hkv, G, T, X)"""
    B, H, T, X = x.shape
    return x.view(B, num_kv_heads, H // num_kv_heads, T, X)


def _combine(num_sm, lin, mix, num_kv_heads, delta: bool = False):
    """Mix the window numerator num_sm (B, Hkv, G, T, d+1) with the linear part lin (sum rule: a numerator of the
    same shape sharing the normaliser; delta rule: an output (B, Hkv, G, T, d); None: no linear part)."""
    if lin is None:
        y = num_sm[..., :-1] / num_sm[..., -1:]  # the window max contributes exp(0) = 1: no epsilon needed
    else:
        w = mix.view(num_kv_heads, -1, 1, 1).to(lin.dtype)  # lerp(lin, sm, w) = w * sm + (1 - w) * lin
        if delta:
            y = lin if num_sm is None else torch.lerp(lin, num_sm[..., :-1] / num_sm[..., -1:], w)
        else:
            num = lin if num_sm is None else torch.lerp(lin, num_sm, w)
            y = num[..., :-1] / (num[..., -1:] + EPS)
    B, Hkv, G, T, d = y.shape
    return y.reshape(B, Hkv * G, T, d)


def _pad_time(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Zero-pad dim -2 (time) of (..., T, X)."""
    return F.pad(x, (0, 0, front, back))


def _delay(x, window: int):
    """Shift (B, Hkv, T[, X]) `window` steps later along time (zeros enter): the stream of keys leaving the window.
    A zero key (and zero log gate) leaves the memory unchanged."""
    if x is None:
        return None
    T = x.shape[2]
    pad = (0, 0, window, 0) if x.dim() == 4 else (window, 0)
    return F.pad(x, pad)[:, :, :T]


def _linear_part(fq, fk, v, log_gate, beta, window, Hkv, memory, **kw):
    """The linear half over the delayed key stream: (lin, memory after the last delayed key)."""
    values = v if beta is not None else _ones_column(v)
    return memory(_group(fq, Hkv), _delay(fk, window), _delay(values, window), _delay(log_gate, window),
                  _delay(beta, window), **kw)


def _exact_num(scores, values, m):
    """sum_j exp(scores_ij - m_i) [v_j, 1]: scores (B, Hkv, G, T, N), values (B, Hkv, N, d), m (B, Hkv, G, T, 1)."""
    return torch.exp(scores - m) @ _ones_column(values).unsqueeze(2)


def attention_quadratic(q, k, v, fq, fk, mix, window, scale: float, log_gate=None, beta=None, sinks: int = 0):
    """Reference form with explicit T x T weights. Returns (B, H, T, d)."""
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    W = T if window is None else window
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    lin = None
    if fq is not None and window is not None:
        fk = fk.masked_fill(j.T < sinks, 0.0)  # a zero key leaves the memory unchanged: sinks never enter it
        lin = _linear_part(fq, fk, v, log_gate, beta, W, Hkv, memory_naive)[0]
    num_sm = None
    if W > 0 or sinks > 0:
        G = H // Hkv
        s = (q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)) * scale
        s = _group(s.masked_fill(~((j <= i) & ((j > i - W) | (j < sinks))), float("-inf")), Hkv)
        num_sm = _exact_num(s, v, s.amax(-1, keepdim=True))
    return _combine(num_sm, lin, mix, Hkv, delta=beta is not None)


def _sliding_window_chunked(q, k, v1, window: int, scale: float, chunk: int, floor=None):
    """sum over the W most recent keys of exp(s_ij - m_i) v1_j, with m_i the max score in the window (or `floor`
    (B, Hkv, G, T, 1) where that is larger). q (B, Hkv, G, T, d), k (B, Hkv, 1, T, d), v1 (B, Hkv, 1, T, D) ->
    (numerator (B, Hkv, G, T, D), m (B, Hkv, G, T, 1)). Each block of `chunk` queries sees chunk + W - 1 keys."""
    B, Hkv, G, T, d = q.shape
    n = -(-T // chunk)
    span = chunk + window - 1
    q = _pad_time(q, 0, n * chunk - T).view(B, Hkv, G, n, chunk, d)
    # key position p sits at padded index p + W - 1; block b covers padded indices [b*chunk, b*chunk + span)
    k = _pad_time(k, window - 1, n * chunk - T).unfold(-2, span, chunk).transpose(-1, -2)  # (B,Hkv,1,n,span,d)
    v1 = _pad_time(v1, window - 1, n * chunk - T).unfold(-2, span, chunk).transpose(-1, -2)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, Hkv, G, n, chunk, span)
    a = torch.arange(chunk, device=q.device)[:, None]
    b = torch.arange(span, device=q.device)[None, :]
    key_pos = torch.arange(n, device=q.device)[:, None, None] * chunk + b - (window - 1)  # (n, 1, span)
    valid = (b >= a) & (b <= a + window - 1) & (key_pos >= 0)  # (n, chunk, span)
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if floor is not None:
        m = torch.maximum(m, _pad_time(floor, 0, n * chunk - T).view(B, Hkv, G, n, chunk, 1))
    num = (torch.exp(s - m) @ v1).reshape(B, Hkv, G, n * chunk, -1)[:, :, :, :T]
    return num, m.reshape(B, Hkv, G, n * chunk, 1)[:, :, :, :T]


def time_slice(x, s: slice):
    """x[:, :, s]: a span of time steps of (B, H, T, ...); None stays None."""
    return None if x is None else x[:, :, s]


def _append(buf, x):
    """Concatenate along time (dim 2); None stays None."""
    if x is None:
        return None
    return x if buf is None else torch.cat([buf, x], dim=2)


def _sinks_outside_window(state, k, v, n_sink: int, window: int):
    """The sink keys that this stream's queries read outside their window: the ones the state holds (every query
    sees them) and the first n_sink keys of the stream, which query t sees once they left its window (s <= t - W).
    Returns (k (B, Hkv, N, d), v (B, Hkv, N, d), visible (T, N) bool), or None when there are none."""
    T = k.shape[2]
    t = torch.arange(T, device=k.device)[:, None]
    held = 0 if state is None or state.sink_k is None else state.sink_k.shape[2]
    n_new = n_sink if window < T else 0  # with W >= T no key of the stream leaves the window
    if not held and not n_new:
        return None
    sk = _append(state.sink_k if held else None, k[:, :, :n_new])
    sv = _append(state.sink_v if held else None, v[:, :, :n_new])
    visible = torch.cat([t.new_ones(T, held, dtype=torch.bool),
                         torch.arange(n_new, device=k.device)[None, :] <= t - window], dim=1)
    return sk, sv, visible


def attention_chunked(q, k, v, fq, fk, mix, window, scale: float, chunk: int = 64, return_state: bool = False,
                      log_gate=None, beta=None, state: LinearAttentionState | None = None, sinks: int = 0,
                      key_features=None):
    """Same result as attention_quadratic in O(T * (chunk + W)) memory. Returns y (B, H, T, d), and with
    return_state the LinearAttentionState after the last token (for decoding).
    state: continue after the tokens it holds (prefill in blocks): its window keys are prepended to this block's
    keys (with w placeholder queries whose outputs are dropped), its sinks and memory are the starting ones;
    key_features: k (B, Hkv, n, d) -> phi(k) (B, Hkv, n, F), the map that made fk (for the state's window keys)."""
    w = 0 if state is None else state.win_k.shape[2]
    seen = 0 if state is None else state.seen
    if w:
        old_k, old_v, old_log_gate, old_beta = state.window()
        fk = None if fk is None else _append(key_features(old_k), fk)
        k, v, log_gate, beta = map(_append, (old_k, old_v, old_log_gate, old_beta), (k, v, log_gate, beta))
    Hkv, T = k.shape[1], k.shape[2]  # T counts the prepended window keys
    W = T if window is None else window
    n_sink = 0 if window is None else min(max(sinks - (seen - w), 0), T)  # stream keys 0..n_sink-1 are sinks
    lin, memory = None, None
    if fq is not None and window is not None:
        fq_all = _pad_time(fq, w, 0)
        fk_mem = fk.masked_fill(torch.arange(T, device=fk.device)[:, None] < n_sink, 0.0) if n_sink else fk
        lin, memory = _linear_part(fq_all, fk_mem, v, log_gate, beta, W, Hkv, memory_chunked, chunk=chunk,
                                   state=None if state is None else state.kv)
    sink_set = None if window is None else _sinks_outside_window(state, k, v, n_sink, W)
    if lin is None and W >= T and sink_set is None:  # exact causal softmax attention: PyTorch's fused kernel
        causal = torch.ones(q.shape[2], T, dtype=torch.bool, device=q.device).tril(w)  # query i sees keys <= w + i
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal if w else None, is_causal=not w, scale=scale,
                                           enable_gqa=True)
    else:
        qg = _group(_pad_time(q, w, 0), Hkv)
        num_sm = m = s_sink = None
        if sink_set is not None:
            sk, sv, visible = sink_set
            s_sink = ((qg @ sk.unsqueeze(2).transpose(-1, -2)) * scale).masked_fill(~visible, float("-inf"))
            m = s_sink.amax(-1, keepdim=True)
        if W > 0:
            num_sm, m = _sliding_window_chunked(qg, k.unsqueeze(2), _ones_column(v).unsqueeze(2), W, scale, chunk, m)
        if s_sink is not None:
            num_sink = _exact_num(s_sink, sv, m)
            num_sm = num_sink if num_sm is None else num_sm + num_sink
        y = _combine(num_sm, lin, mix, Hkv, delta=beta is not None)[:, :, w:]
    if not return_state:
        return y
    old = 0 if window is None else max(T - window, 0)  # keys 0 .. old-1 have left the window
    kept = (time_slice(x, slice(old, None)) for x in (k, v, log_gate, beta))
    sink_k, sink_v = (None, None) if state is None else (state.sink_k, state.sink_v)
    if left := min(old, n_sink):  # sinks that left the window in this block
        sink_k, sink_v = _append(sink_k, k[:, :, :left].clone()), _append(sink_v, v[:, :, :left].clone())
    new_state = LinearAttentionState(memory, *(None if x is None else x.clone() for x in kept),  # decoding writes them
                                     sink_k=sink_k, sink_v=sink_v, seen=seen + q.shape[2])
    return y, new_state


def empty_state(batch: int, num_kv_heads: int, head_dim: int, feature_dim: int, dtype, device,
                delta: bool = False) -> LinearAttentionState:
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    return LinearAttentionState(
        kv=z(batch, num_kv_heads, feature_dim, head_dim + (0 if delta else 1)),
        win_k=z(batch, num_kv_heads, 0, head_dim), win_v=z(batch, num_kv_heads, 0, head_dim),
    )


def _push_window(state: LinearAttentionState, window, sinks, k, v, fk, log_gate, beta, key_features):
    """One new key enters the window (B, Hkv, 1, .). Once it is full, the oldest key leaves it (with W = 0: the new
    key itself) for the sinks if it is one of the first `sinks` tokens, else for the linear memory (when there is
    one), and the new key takes its slot in place; an unbounded window (a KV cache) just grows."""
    new = (k, v, log_gate, beta)
    position = state.seen
    state.seen += 1
    if window is None or state.win_k.shape[2] < window:
        state.win_k, state.win_v, state.win_log_gate, state.win_beta = map(_append, state.buffers(), new)
        return
    i = state.start
    old_k, old_v, old_lg, old_beta = new if window == 0 else (time_slice(x, slice(i, i + 1)) for x in state.buffers())
    if position - window < sinks:
        state.sink_k, state.sink_v = _append(state.sink_k, old_k.clone()), _append(state.sink_v, old_v.clone())
    elif state.kv is not None:
        old_fk = fk if window == 0 else key_features(old_k)
        delta = beta is not None
        state.kv = memory_step(old_fk, old_v if delta else _ones_column(old_v), old_lg, old_beta, state.kv)
    if window == 0:
        return
    for buf, x in zip(state.buffers(), new):
        if buf is not None:
            buf[:, :, i : i + 1] = x
    state.start = (i + 1) % window


def attention_recurrent(q, k, v, fq, fk, mix, window, scale: float, state: LinearAttentionState,
                        log_gate=None, beta=None, sinks: int = 0, key_features=None):
    """Decode T >= 1 new tokens one at a time, updating `state` in place. Same shapes and key_features as
    attention_chunked (T = new tokens); returns y (B, H, T, d). Query heads are grouped as (B, Hkv, G, .) so every product is a
    plain batched matmul (no broadcast copies of the state): decoding is latency-bound, so a step is few ops."""
    B, H, T, d = q.shape
    if T != 1:
        ys = []
        for t in range(T):
            q_t, k_t, v_t, fq_t, fk_t, lg_t, b_t = (time_slice(x, slice(t, t + 1))
                                                    for x in (q, k, v, fq, fk, log_gate, beta))
            ys.append(attention_recurrent(q_t, k_t, v_t, fq_t, fk_t, mix, window, scale, state, lg_t, b_t, sinks,
                                          key_features))
        return torch.cat(ys, dim=2) if ys else torch.zeros_like(q)
    Hkv = k.shape[1]
    delta = beta is not None
    _push_window(state, window, sinks, k, v, fk, log_gate, beta, key_features)
    exact = ([(state.win_k, state.win_v)] if window != 0 else []) + (
        [(state.sink_k, state.sink_v)] if state.sink_k is not None else [])
    num_sm = lin = None
    if exact:
        qg = q.reshape(B, Hkv, -1, d)
        scores = [(qg @ keys.transpose(-1, -2)) * scale for keys, _ in exact]  # (B, Hkv, G, n)
        m = scores[0].amax(-1, keepdim=True)
        for s in scores[1:]:
            m = torch.maximum(m, s.amax(-1, keepdim=True))
        parts = [torch.exp(s - m) @ _ones_column(values) for s, (_, values) in zip(scores, exact)]
        num_sm = (parts[0] if len(parts) == 1 else parts[0] + parts[1]).unsqueeze(3)  # (B, Hkv, G, 1, d+1)
    if fq is not None and window is not None:
        lin = (fq.reshape(B, Hkv, -1, fq.shape[-1]) @ state.kv).unsqueeze(3)  # (B, Hkv, G, 1, d+1)
    return _combine(num_sm, lin, mix, Hkv, delta=delta)
