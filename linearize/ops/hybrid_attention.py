"""Hybrid sliding-window + linear attention (LoLCATs eq. 7) in three forms of the same math.

For query i, keys j with i - W < j <= i (the W most recent) get exact softmax weights, older keys
(j <= i - W) are read from a linear memory (linear_memory.py) that a key enters when it leaves the window:

    sum rule (default):  y_i = sum_j a_ij [v_j, 1] -> divided by its last column (one shared normaliser),
        a_ij = w_h * exp(s_ij - m_i)                     if j in E_i = {i - W < j <= i} + {j < S, j <= i}
        a_ij = (1 - w_h) * decay_ij * phi(q_i) . phi(k_j) if S <= j <= i - W                 (s_ij = q_i . k_j * scale)
        decay_ij = prod of the forget gates g_l of the keys j < l <= i - W (1 without a gate); m_i = max over E_i
    delta rule: y_i = w_h * softmax output over E_i + (1 - w_h) * phi(q_i) S_{i-W}, with S the
        (gated) delta-rule memory of keys S <= j <= i - W (no normaliser: the delta rule stores values directly).
    output normalisation (norm_gain given; TransNormer's NormAttention): the linear part drops its denominator and is
        normalised per head instead, y_i = w_h * softmax output over E_i + (1 - w_h) * g_h * RMSNorm(o_i), o_i the
        sum-rule numerator sum_j decay_ij phi(q_i) . phi(k_j) v_j (or the delta-rule read-out), g_h (H, d) a gain.

    heavy hitters (sum rule, heavy = M > 0; heavy_hitters.py): of the keys that left the window (not sinks), the M
        per KV head that drew the most window attention are in E_i too (exact, in the same units exp(s_ij - m_i), m_i
        still the window/sink max) and not in the memory: "dynamic sinks".
    memory cap (sum rule, memory_cap = C > 0): once the memory holds n_i > C keys, its terms a_ij are scaled by C / n_i,
        so it never weighs more than C keys did (the most it held in training when C = training length - W - S): its
        share of the normaliser stops growing with the context and keeps exact keys (window, sinks, cache) readable.

w_h in (0, 1) is a per-head mixing factor (`mix`, (H,)). Every call takes the same three things:

- Streams: the per-token streams q (B, H, T, d), k, v (B, Hkv, T, d) after RoPE, fq = phi(q) (B, H, T, F),
  fk = phi(k) (B, Hkv, T, F), log_gate, beta (B, Hkv, T); a stream the mode does not use is None.
- AttentionSpec: the mode. window W (0: pure linear; None: full causal softmax, no linear part), sinks S (the first
  S tokens stay in exact softmax for ever and never enter the memory: attention sinks, StreamingLLM), scale,
  rule ("sum" | "delta"), linear (False: no linear part: exact sliding-window softmax, + sinks: StreamingLLM),
  memory_cap C (0: none), cache M, cache_every and cache_pool (the sparse cache, sparse_cache.py), cache_distance
  (None: a cached key is scored at its own position; D: as if it sat D tokens before every query, rotary.py),
  cache_packed (with D: the exact keys outside the window in a row from D back, in order), heavy M
  (heavy_hitters.py).
- mix (H,): the weight of the exact part (unused without a linear part).

Grouped-query attention: H = G * Hkv, query head h uses key head h // G (as in transformers).

- attention_quadratic(streams, spec, mix) -> y: the T x T reference (tests only).
- attention_chunked(streams, spec, mix, initial_state, output_final_state, chunk, key_features) -> (y, state|None):
  O(T) memory, for training and prefill (in blocks, continuing initial_state). Its linear memory runs on
  flash-linear-attention's kernels where fla_kernels.fla_usable says so (CUDA, LINEARIZE_FLA_KERNELS=1).
- attention_recurrent(streams, spec, mix, initial_state, output_final_state, key_features) -> (y, state|None):
  one token at a time, for decoding; advances its state in place (the window is a ring buffer).
key_features: k (B, Hkv, n, d) -> phi(k) (B, Hkv, n, F), the map that made fk: a state keeps its window keys, not
their features, and recomputes them when the keys leave the window. norm_gain (H, d) or None: the gain of the
output normalisation of the linear part (None: the shared normaliser); a per-token map, so the state is unchanged.
inv_freq (d/2,) or None: the model's RoPE frequencies, needed where spec.cache_distance is set.

    cache distance (cache_distance = D): an exact key j outside the window (a cached key or a sink) is scored as if
        it were D tokens before the query: s_ij = rope(q_i, D - i) . rope(k_j, -j) * scale (q, k carry RoPE at their
        own positions i, j). With D = W every such key sits just beyond the window, where the model is used to
        reading, however far back it was written: a 135M teacher finds a pass key 8k tokens back 6 times in 10,
        the student with its cache at D = W 7 in 10 (0 at its own positions). The sinks sit at D too: at their own
        positions they drift beyond any distance trained on as the context grows (with them at D and the memory
        capped at 256 keys: 10 in 10; README).
    packed (cache_packed, with D): those keys keep their order, one position apart, the newest at D: with F_i the
        exact keys outside query i's window, s_ij = rope(q_i, D + n_ij - i) . rope(k_j, -j) * scale, n_ij the number
        of keys of F_i after j. The text between them reads as if cut out (StreamingLLM numbers its cache the same
        way): a needle's tokens stay in a row, and the farthest key sits at most D + |F_i| - 1 back.
"""

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from . import fla_kernels, heavy_hitters, sparse_cache
from .rotary import rotate
from .linear_memory import memory_chunked, memory_naive, memory_step

EPS = 1e-6
RULES = ("sum", "delta")


@dataclass(frozen=True)
class AttentionSpec:
    """The mode of an attention call (see the module docstring); immutable, one per layer."""

    window: int | None
    scale: float
    sinks: int = 0
    rule: str = "sum"
    linear: bool = True
    cache: int = 0
    cache_every: int = 64
    cache_pool: int = 0
    memory_cap: int = 0
    heavy: int = 0
    cache_distance: int | None = None
    cache_packed: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.memory_cap < 0 or (self.memory_cap and self.delta):
            raise ValueError("memory_cap must be >= 0 and needs the sum rule")
        if self.cache and (self.window is None or self.delta or self.cache_every < 1 or not (self.window or self.sinks)
                           or self.cache_pool < 0):
            raise ValueError("a sparse cache needs a bounded window > 0 or sinks, the sum rule, cache_every >= 1 and "
                             "cache_pool >= 0")
        if self.cache_distance is not None and (not self.cache or self.cache_distance < 0):
            raise ValueError("cache_distance needs a sparse cache and must be >= 0")
        if self.cache_packed and self.cache_distance is None:
            raise ValueError("cache_packed needs a cache_distance")
        if self.heavy < 0 or (self.heavy and (not self.window or self.delta or self.cache)):
            raise ValueError("heavy hitters need a bounded window > 0 and the sum rule, without a sparse cache")

    @property
    def memory(self) -> bool:
        """True when there is a linear memory (a linear part and a bounded window)."""
        return self.linear and self.window is not None

    @property
    def delta(self) -> bool:
        return self.rule == "delta"


@dataclass
class Streams:
    """Per-token streams along time (dim 2) that travel together; any of them may be None (a decoding state's
    window holds keys only: k, v, log_gate, beta, received). received (B, Hkv, T): the window attention each key
    drew so far (heavy hitters only); position (B, Hkv, T): each key's position in the sequence (a sparse cache with
    a cache_distance only)."""

    k: torch.Tensor
    v: torch.Tensor
    q: torch.Tensor | None = None
    fq: torch.Tensor | None = None
    fk: torch.Tensor | None = None
    log_gate: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    received: torch.Tensor | None = None
    position: torch.Tensor | None = None

    def _map(self, fn, *others: "Streams") -> "Streams":
        out = {}
        for f in fields(self):
            xs = [getattr(s, f.name) for s in (self, *others)]
            if any(x is None for x in xs) and not all(x is None for x in xs):
                raise ValueError(f"stream {f.name!r} is present in some operands only")
            out[f.name] = None if xs[0] is None else fn(*xs)
        return Streams(**out)

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in (getattr(self, f.name) for f in fields(self)) if x is not None]

    def __len__(self) -> int:
        return self.k.shape[2]

    def slice(self, s: slice) -> "Streams":
        """The time steps s of every stream."""
        return self._map(lambda x: x[:, :, s])

    def append(self, other: "Streams") -> "Streams":
        """self then other along time; both must carry the same streams."""
        return self._map(lambda a, b: torch.cat([a, b], dim=2), other)

    def keys(self) -> "Streams":
        """What a state keeps of a token: k, v, log_gate, beta, received (no queries, no features)."""
        return replace(self, q=None, fq=None, fk=None)

    def clone(self) -> "Streams":
        return self._map(torch.clone)

    def roll(self, shift: int) -> "Streams":
        return self._map(lambda x: x.roll(shift, dims=2))

    def write(self, i: int, other: "Streams"):
        """Overwrite time slot i in place with the one-step streams of `other`."""
        for a, b in zip(self.tensors(), self._map(lambda a, b: b, other).tensors()):
            a[:, :, i : i + 1] = b

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _then(a: Streams | None, b: Streams) -> Streams:
    """a.append(b), with a None a (nothing yet) giving b."""
    return b if a is None else a.append(b)


@dataclass
class LinearAttentionState:
    """Everything decoding needs; constant in context length unless the window is unbounded (W = None).
    kv: (B, Hkv, F, d+1) sum-rule memory of [v, 1] (delta rule: (B, Hkv, F, d)), None without a linear part;
    win: the key streams (k, v, log_gate, beta) of the most recent <= W tokens, still in the softmax window. Once
    the window is full it is a ring: decoding overwrites the oldest key in place, `start` is the slot of the oldest
    key (in_order() gives time order). sinks: the key streams (k, v) of the sink tokens (the first S of the
    sequence) that have left the window (None until one has); seen: tokens consumed so far (the next position);
    cache: the key streams (k, v) of the sparse cache (sparse_cache.py), per KV head, None until a key is cached
    (scored at a distance: k with its RoPE undone, and each key's position; the sinks alike);
    heavy: the key streams (k, v, received) of the heavy hitters (heavy_hitters.py), per KV head in position order,
    None until a key has left the window."""

    kv: torch.Tensor | None
    win: Streams
    start: int = 0
    sinks: Streams | None = None
    seen: int = 0
    cache: Streams | None = None
    heavy: Streams | None = None

    def in_order(self) -> Streams:
        """The window in time order, oldest first."""
        return self.win if self.start == 0 else self.win.roll(-self.start)

    def nbytes(self) -> int:
        parts = [self.win.nbytes()] + [0 if p is None else p.nbytes() for p in (self.sinks, self.cache, self.heavy)]
        return sum(parts) + (0 if self.kv is None else self.kv.numel() * self.kv.element_size())


def _ones_column(v: torch.Tensor) -> torch.Tensor:
    """[v, 1]: the last column of a weighted sum of these is the normaliser."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def _group(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, T, X) -> (B, Hkv, G, T, X)"""
    B, H, T, X = x.shape
    return x.view(B, num_kv_heads, H // num_kv_heads, T, X)


def _per_group(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (B, Hkv, G, T, X) @ b (B, Hkv, X, Y) -> (B, Hkv, G, T, Y): the G query heads of a KV head share b, so their
    rows are stacked into one product per KV head (a broadcast b.unsqueeze(2) would copy b G times)."""
    B, Hkv, G, T, X = a.shape
    return (a.reshape(B, Hkv, G * T, X) @ b).view(B, Hkv, G, T, b.shape[-1])


def _rms_normalized(lin, norm_gain, delta: bool):
    """The linear part's output without a denominator, RMS-normalised over its d channels and scaled by the gain:
    lin (B, Hkv, G, T, d[+1]: the sum rule's last column, its normaliser, is unused), norm_gain (H, d)."""
    o = lin if delta else lin[..., :-1]
    B, Hkv, G, T, d = o.shape
    return F.rms_norm(o, (d,), eps=EPS) * norm_gain.view(Hkv, G, 1, d).to(o.dtype)


def _combine(num_sm, lin, mix, num_kv_heads, delta: bool = False, norm_gain=None):
    """Mix the window numerator num_sm (B, Hkv, G, T, d+1) with the linear part lin (sum rule: a numerator of the
    same shape sharing the normaliser; delta rule: an output (B, Hkv, G, T, d); None: no linear part).
    norm_gain (H, d): output normalisation of the linear part instead of the shared normaliser (None: shared)."""
    if lin is None:
        y = num_sm[..., :-1] / num_sm[..., -1:]  # the window max contributes exp(0) = 1: no epsilon needed
    else:
        w = mix.view(num_kv_heads, -1, 1, 1).to(lin.dtype)  # lerp(lin, sm, w) = w * sm + (1 - w) * lin
        if norm_gain is not None:
            lin = _rms_normalized(lin, norm_gain, delta)
        if delta or norm_gain is not None:  # lin is an output: mix it with the window's output
            y = lin if num_sm is None else torch.lerp(lin, num_sm[..., :-1] / num_sm[..., -1:], w)
        else:
            num = lin if num_sm is None else torch.lerp(lin, num_sm, w)
            y = num[..., :-1] / (num[..., -1:] + EPS)
    B, Hkv, G, T, d = y.shape
    return y.reshape(B, Hkv * G, T, d)


def _capped(lin, n_keys, spec: AttentionSpec):
    """The memory's terms lin (B, Hkv, G, T, X) scaled by min(1, C / n): n_keys the number of keys in the memory
    each query reads, a tensor broadcastable to (B, Hkv, 1, T) or one int (decoding: no tensor is made); unchanged
    without a cap."""
    if not spec.memory_cap or lin is None:
        return lin
    if isinstance(n_keys, int):
        return lin * (spec.memory_cap / max(n_keys, spec.memory_cap))
    n = n_keys.to(device=lin.device, dtype=lin.dtype)
    return lin * (spec.memory_cap / n.clamp(min=spec.memory_cap)).unsqueeze(-1)


def _keys_in_memory(position, spec: AttentionSpec):
    """How many keys the memory holds for a query at this absolute position (an int or a tensor of them):
    the keys S <= j <= p - W."""
    n = position - spec.window - spec.sinks + 1
    return max(n, 0) if isinstance(n, int) else n.clamp(min=0)


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


def _linear_part(fq, keys: Streams, spec: AttentionSpec, window: int, memory, **kw):
    """The linear half over the key stream delayed by the window: (lin, memory after the last delayed key)."""
    values = keys.v if spec.delta else _ones_column(keys.v)
    return memory(_group(fq, keys.k.shape[1]), *(_delay(x, window) for x in (keys.fk, values, keys.log_gate,
                                                                             keys.beta)), **kw)


def _exact_num(scores, values, m):
    """sum_j exp(scores_ij - m_i) [v_j, 1]: scores (B, Hkv, G, T, N), values (B, Hkv, N, d), m (B, Hkv, G, T, 1)."""
    return _per_group(torch.exp(scores - m), _ones_column(values))


def attention_quadratic(streams: Streams, spec: AttentionSpec, mix, norm_gain=None, inv_freq=None) -> torch.Tensor:
    """Reference form with explicit T x T weights. Returns (B, H, T, d)."""
    if spec.cache:
        return _cached_quadratic(streams, spec, mix, inv_freq)
    if spec.heavy:
        return _heavy_quadratic(streams, spec, mix)
    q, k, v = streams.q, streams.k, streams.v
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    W = T if spec.window is None else spec.window
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    lin = None
    if spec.memory:
        fk = streams.fk.masked_fill(j.T < spec.sinks, 0.0)  # a zero key leaves the memory unchanged: no sink enters
        lin = _capped(_linear_part(streams.fq, replace(streams, fk=fk), spec, W, memory_naive)[0],
                      _keys_in_memory(i[:, 0], spec), spec)
    num_sm = None
    if W > 0 or spec.sinks > 0:
        G = H // Hkv
        s = (q @ k.repeat_interleave(G, dim=1).transpose(-1, -2)) * spec.scale
        s = _group(s.masked_fill(~((j <= i) & ((j > i - W) | (j < spec.sinks))), float("-inf")), Hkv)
        num_sm = _exact_num(s, v, s.amax(-1, keepdim=True))
    return _combine(num_sm, lin, mix, Hkv, spec.delta, norm_gain)


def _heavy_quadratic(streams: Streams, spec: AttentionSpec, mix) -> torch.Tensor:
    """Reference for heavy hitters (heavy_hitters.py): explicit per-query sets, explicit T x T weights."""
    q, k, v = streams.q, streams.k, streams.v
    B, H, T, d = q.shape
    Hkv, W, S = k.shape[1], spec.window, spec.sinks
    pos = torch.arange(T, device=q.device)
    i, j = pos[:, None], pos[None, :]
    causal = j <= i
    window = causal & (j > i - W)
    reference = window | (causal & (j < S))  # the window and the sinks: the units of the memory
    s = (_group(q, Hkv) @ k.unsqueeze(2).transpose(-1, -2)) * spec.scale  # (B, Hkv, G, T, T)
    received = torch.softmax(s.masked_fill(~window, float("-inf")), -1).sum((2, 3))  # (B, Hkv, T)
    heavy = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)  # [.., query i, key j]
    n = max(T - W - S, 0)  # the keys that ever leave the window, not sinks: S .. T - W - 1
    if n:
        available = (pos - W - S + 1).clamp(0, n)  # how many of them query i may choose from
        heavy[..., S : S + n] = heavy_hitters.best_of_prefixes(received[..., S : S + n], available, spec.heavy)
    m = s.masked_fill(~reference, float("-inf")).amax(-1, keepdim=True)
    s_exact = s.masked_fill(~(reference | heavy).unsqueeze(2), float("-inf"))
    m_all = torch.maximum(m, s_exact.amax(-1, keepdim=True))
    num_sm = _exact_num(s_exact, v, m_all)
    lin = None
    if spec.memory:  # every key that left the window, not a sink and not heavy; in units of exp(s - m)
        in_memory = causal & ~reference & ~heavy
        a = (_group(streams.fq, Hkv) @ streams.fk.unsqueeze(2).transpose(-1, -2)) * in_memory.unsqueeze(2)
        lin = _capped(a @ _ones_column(v).unsqueeze(2), _keys_in_memory(pos, spec), spec) * torch.exp(m - m_all)
    return _combine(num_sm, lin, mix, Hkv)


def _sliding_window_chunked(q, k, v1, window: int, scale: float, chunk: int, floor=None, received_from=None):
    """sum over the W most recent keys of exp(s_ij - m_i) v1_j, with m_i the max score in the window (or `floor`
    (B, Hkv, G, T, 1) where that is larger). q (B, Hkv, G, T, d), k (B, Hkv, 1, T, d), v1 (B, Hkv, 1, T, D) ->
    (numerator (B, Hkv, G, T, D), m (B, Hkv, G, T, 1), received). Each block of `chunk` queries sees chunk + W - 1
    keys. received_from = r (an int): received (B, Hkv, T) is the window attention each key draws from the queries
    r .. T-1 (the heavy hitters' score, summed over the group; the last column of v1 must be ones), else None."""
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


def _sinks_outside_window(state, keys: Streams, n_sink: int, window: int):
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


def attention_chunked(streams: Streams, spec: AttentionSpec, mix, initial_state: LinearAttentionState | None = None,
                      output_final_state: bool = False, chunk: int = 64, key_features=None, norm_gain=None,
                      inv_freq=None):
    """Same result as attention_quadratic in O(T * (chunk + W)) memory. Returns (y (B, H, T, d), the
    LinearAttentionState after the last token if output_final_state else None).
    initial_state: continue after the tokens it holds (prefill in blocks): its window keys are prepended to this
    block's keys (with w placeholder queries whose outputs are dropped), its sinks and memory are the starting
    ones (it is not modified)."""
    if spec.cache:  # segment by segment between the cache's selections
        state = _empty_state(streams, spec) if initial_state is None else replace(initial_state)
        y = _attention_cached(streams, spec, mix, state, key_features, spec.cache_every, inv_freq)
        return y, state if output_final_state else None
    state = initial_state
    w = 0 if state is None else len(state.win)
    seen = 0 if state is None else state.seen
    keys = streams.keys()
    if spec.memory:
        keys = replace(keys, fk=streams.fk)
    if spec.heavy:
        keys = replace(keys, received=streams.k.new_zeros(streams.k.shape[:3]))
    if w:
        old = state.in_order()
        keys = (replace(old, fk=key_features(old.k)) if spec.memory else old).append(keys)
    q, k, v = streams.q, keys.k, keys.v
    Hkv, T = k.shape[1], k.shape[2]  # T counts the prepended window keys
    W = T if spec.window is None else spec.window
    n_sink = 0 if spec.window is None else min(max(spec.sinks - (seen - w), 0), T)  # stream keys < n_sink: sinks
    lin, memory = None, None
    if spec.memory:
        fk_mem = keys.fk.masked_fill(torch.arange(T, device=k.device)[:, None] < n_sink, 0.0) if n_sink else keys.fk
        kernel = fla_kernels.fla_usable(streams.fq, keys.fk, keys.v, keys.log_gate, keys.beta)
        chunked = fla_kernels.memory_fla if kernel else memory_chunked  # the same contract
        lin, memory = _linear_part(_pad_time(streams.fq, w, 0), replace(keys, fk=fk_mem), spec, W, chunked,
                                   chunk=chunk, state=None if state is None else state.kv)
    in_memory = _keys_in_memory(torch.arange(seen - w, seen - w + T, device=k.device), spec) if spec.memory else 0
    sink_set = None if spec.window is None else _sinks_outside_window(state, keys, n_sink, W)
    if lin is None and W >= T and sink_set is None and not spec.heavy:  # exact causal softmax: PyTorch's kernel
        causal = torch.ones(q.shape[2], T, dtype=torch.bool, device=q.device).tril(w)  # query i sees keys <= w + i
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=causal if w else None, is_causal=not w,
                                           scale=spec.scale, enable_gqa=True)
        heavy = None
    else:
        qg = _group(_pad_time(q, w, 0), Hkv)
        num_sm = m = s_sink = None
        if sink_set is not None:
            sinks, visible = sink_set
            s_sink = (_per_group(qg, sinks.k.transpose(-1, -2)) * spec.scale).masked_fill(~visible, float("-inf"))
            m = s_sink.amax(-1, keepdim=True)
        if W > 0:
            num_sm, m, received = _sliding_window_chunked(qg, k.unsqueeze(2), _ones_column(v).unsqueeze(2), W,
                                                          spec.scale, chunk, m, w if spec.heavy else None)
            if received is not None:
                keys = replace(keys, received=keys.received + received)
        if s_sink is not None:
            num_sink = _exact_num(s_sink, sinks.v, m)
            num_sm = num_sink if num_sm is None else num_sm + num_sink
        heavy = None
        if spec.heavy:
            fq = _group(_pad_time(streams.fq, w, 0), Hkv) if spec.memory else None
            num_sm, lin, heavy = _heavy_chunked(qg, fq, keys, state, spec, n_sink, w, num_sm, m, lin, key_features)
        lin = _capped(lin, in_memory, spec)
        y = _combine(num_sm, lin, mix, Hkv, spec.delta, norm_gain)[:, :, w:]
    if not output_final_state:
        return y, None
    old = 0 if spec.window is None else max(T - spec.window, 0)  # keys 0 .. old-1 have left the window
    sinks = None if state is None else state.sinks
    if left := min(old, n_sink):  # sinks that left the window in this block
        sinks = _then(sinks, Streams(k, v).slice(slice(0, left)).clone())
    if heavy is not None:  # the best of the far keys stay exact, the others go into the memory
        heavy, memory = _heavy_final(heavy, spec, memory)
    window = keys.keys().slice(slice(old, None)).clone()  # decoding writes it in place
    return y, LinearAttentionState(memory, window, sinks=sinks, seen=seen + q.shape[2], heavy=heavy)


def _heavy_chunked(qg, fq, keys: Streams, state, spec: AttentionSpec, n_sink: int, w: int, num_sm, m, lin,
                   key_features):
    """The heavy hitters of attention_chunked's queries qg (B, Hkv, G, T, d) (the first w are placeholders for the
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
    cols, heavy = heavy_hitters.heavy_sets(cand.received, available, spec.heavy)  # the state's held keys included
    part = cand._map(lambda x: x[:, :, cols])
    s = (_per_group(qg, part.k.transpose(-1, -2)) * spec.scale).masked_fill(~heavy.unsqueeze(2), float("-inf"))
    m_all = torch.maximum(m, s.amax(-1, keepdim=True))
    num_sm = num_sm * torch.exp(m - m_all) + _exact_num(s, part.v, m_all)
    if lin is not None:  # + the state's heavy keys, - the heavy keys of each query; then in units of m'
        sign = (cols < held).to(lin.dtype) - heavy.to(lin.dtype)  # (B, Hkv, T, n)
        a = _per_group(fq, part.fk.transpose(-1, -2)) * sign.unsqueeze(2)
        lin = (lin + _per_group(a, _ones_column(part.v))) * torch.exp(m - m_all)
    last = heavy.new_zeros(*heavy.shape[:2], len(cand))
    last[..., cols] = heavy[..., -1, :]  # the last query chooses from every candidate
    return num_sm, lin, (cand, held, last)


def _heavy_final(candidates, spec: AttentionSpec, memory):
    """After attention_chunked: the best spec.heavy candidates stay (Streams k, v, received in position order); the
    memory (the linear part's final one, holding every key that left the window) gains the state's heavy keys and
    loses the kept ones. Returns (heavy Streams or None, memory)."""
    cand, held, last = candidates
    if not len(cand):
        return None, memory
    kept, _ = heavy_hitters.split(last, min(spec.heavy, len(cand)))
    heavy = _heavy_keys(cand, kept)
    if memory is not None:
        index = torch.arange(len(cand), device=cand.k.device)
        sign = (index < held).to(memory.dtype).expand(cand.received.shape).clone()
        sign.scatter_add_(-1, kept, -torch.ones_like(kept, dtype=memory.dtype))
        memory = memory + (cand.fk * sign[..., None]).transpose(-1, -2) @ _ones_column(cand.v)
    return heavy.clone(), memory


def _empty_state(streams: Streams, spec: AttentionSpec) -> LinearAttentionState:
    """The state before the first token: an empty window and a zero memory."""
    kv = None
    if spec.memory:
        B, Hkv, _, d = streams.v.shape
        kv = streams.v.new_zeros(B, Hkv, streams.fk.shape[-1], d + (0 if spec.delta else 1))
    window = streams.keys().slice(slice(0, 0))
    if spec.heavy:
        window = replace(window, received=streams.k.new_zeros(streams.k.shape[:2] + (0,)))
    return LinearAttentionState(kv, window)


def _push_window(state: LinearAttentionState, spec: AttentionSpec, new: Streams, key_features, inv_freq=None):
    """One new token's streams (B, Hkv, 1, .) enter the window. Once it is full, the oldest key leaves it (with
    W = 0: the new key itself) for the sinks if it is one of the first `sinks` tokens, else for the linear memory
    (when there is one), and the new key takes its slot in place; an unbounded window (a KV cache) just grows."""
    window = spec.window
    position = state.seen
    state.seen += 1
    if window is None or len(state.win) < window:
        state.win = state.win.append(new.keys())
        return
    i = state.start
    leaving = new if window == 0 else state.win.slice(slice(i, i + 1))
    if position - window < spec.sinks:  # held as the cache holds its keys (scored at its distance, if it has one)
        state.sinks = _then(state.sinks, _to_cache(leaving, position - window, spec, inv_freq).clone())
    elif spec.cache:  # it waits, exact, in the sparse cache for the next selection
        state.cache = _then(state.cache, _to_cache(leaving, position - window, spec, inv_freq).clone())
    elif spec.heavy:  # the best far keys stay exact; the one each head drops enters the memory
        dropped = _heavy_admit(state, spec, leaving)
        if dropped is not None and state.kv is not None:
            state.kv = memory_step(key_features(dropped.k), _ones_column(dropped.v), None, None, state.kv)
    elif state.kv is not None:
        fk = new.fk if window == 0 else key_features(leaving.k)
        values = leaving.v if spec.delta else _ones_column(leaving.v)
        state.kv = memory_step(fk, values, leaving.log_gate, leaving.beta, state.kv)
    if window == 0:
        return
    state.win.write(i, new.keys())
    state.start = (i + 1) % window


def _heavy_keys(streams: Streams, index: torch.Tensor) -> Streams:
    """k, v, received of streams at index (B, Hkv, n) (per head) along time."""
    return Streams(sparse_cache.gather_time(streams.k, index), sparse_cache.gather_time(streams.v, index),
                   received=sparse_cache.gather_time(streams.received[..., None], index)[..., 0])


def _heavy_admit(state: LinearAttentionState, spec: AttentionSpec, leaving: Streams) -> Streams | None:
    """The key `leaving` (B, Hkv, 1, .) left the window: it joins the heavy keys, and while they number more than
    spec.heavy each head drops its worst. Returns the dropped keys (B, Hkv, 1, .), or None while there is room."""
    key = Streams(leaving.k, leaving.v, received=leaving.received).clone()  # the window slot is about to be reused
    if state.heavy is None or len(state.heavy) < spec.heavy:
        state.heavy = _then(state.heavy, key)
        return None
    candidates = state.heavy.append(key)
    kept, dropped = heavy_hitters.drop_worst(candidates.received)
    state.heavy = _heavy_keys(candidates, kept)
    return _heavy_keys(candidates, dropped)


def attention_recurrent(streams: Streams, spec: AttentionSpec, mix, initial_state: LinearAttentionState | None = None,
                        output_final_state: bool = False, key_features=None, norm_gain=None, inv_freq=None):
    """Decode T >= 1 new tokens one at a time. Returns (y (B, H, T, d), the state after them if output_final_state
    else None). initial_state (None: an empty one) is advanced in place, so the returned state is that object:
    decoding writes its window ring without copies. Query heads are grouped as (B, Hkv, G, .) so every product is a
    plain batched matmul (no broadcast copies of the state): decoding is latency-bound, so a step is few ops."""
    state = _empty_state(streams, spec) if initial_state is None else initial_state
    if spec.cache and not spec.window:
        y = _attention_cached(streams, spec, mix, state, key_features, 1, inv_freq)
        return y, state if output_final_state else None
    if spec.cache:
        ys = [_cached_step(streams.slice(slice(t, t + 1)), spec, mix, state, key_features, inv_freq)
              for t in range(len(streams))]
        return torch.cat(ys, dim=2) if ys else torch.zeros_like(streams.q), state if output_final_state else None
    ys = [_recurrent_step(streams.slice(slice(t, t + 1)), spec, mix, state, key_features, norm_gain)
          for t in range(len(streams))]
    y = torch.cat(ys, dim=2) if ys else torch.zeros_like(streams.q)
    return y, state if output_final_state else None


def _recurrent_step(streams: Streams, spec: AttentionSpec, mix, state: LinearAttentionState, key_features,
                    norm_gain=None):
    """One token (B, ., 1, .): update `state` in place, return y (B, H, 1, d)."""
    q = streams.q
    B, H, T, d = q.shape
    Hkv = streams.k.shape[1]
    if spec.heavy:
        streams = replace(streams, received=streams.k.new_zeros(streams.k.shape[:3]))
    _push_window(state, spec, streams, key_features)
    exact = ([state.win] if spec.window != 0 else []) + ([state.sinks] if state.sinks is not None else [])
    num_sm = lin = m = m_all = None
    if exact:
        qg = q.reshape(B, Hkv, -1, d)
        scores = [(qg @ part.k.transpose(-1, -2)) * spec.scale for part in exact]  # (B, Hkv, G, n)
        m = scores[0].amax(-1, keepdim=True)
        for s in scores[1:]:
            m = torch.maximum(m, s.amax(-1, keepdim=True))
        m_all = m  # the memory is in units of the window and sinks; a heavy key may outscore them
        if spec.heavy:
            state.win.received += torch.softmax(scores[0], -1).sum(2).detach()  # window attention drawn, group summed
            if state.heavy is not None:
                exact, scores = exact + [state.heavy], scores + [(qg @ state.heavy.k.transpose(-1, -2)) * spec.scale]
                m_all = torch.maximum(m, scores[-1].amax(-1, keepdim=True))
        num_sm = sum(torch.exp(s - m_all) @ _ones_column(part.v) for s, part in zip(scores, exact)).unsqueeze(3)
    if spec.memory:
        lin = (streams.fq.reshape(B, Hkv, -1, streams.fq.shape[-1]) @ state.kv).unsqueeze(3)  # (B, Hkv, G, 1, d+1)
        lin = _capped(lin, _keys_in_memory(state.seen - 1, spec), spec)
        if m_all is not m:
            lin = lin * torch.exp(m - m_all).unsqueeze(3)
    return _combine(num_sm, lin, mix, Hkv, spec.delta, norm_gain)


# ---- the sparse cache (sparse_cache.py): the exact part is every token not in the memory ----

def _cached_quadratic(streams: Streams, spec: AttentionSpec, mix, inv_freq=None) -> torch.Tensor:
    """Reference: replay the cache's selections on explicit per-head sets of memory keys, then explicit T x T weights:
    query i attends exactly to every key j <= i outside the memory it reads, and reads the memory linearly."""
    q, k, v = streams.q, streams.k, streams.v
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    pos = torch.arange(T, device=q.device)
    in_memory = torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)  # after the latest selection
    memory_of = torch.zeros(B, Hkv, T, T, dtype=torch.bool, device=q.device)  # [.., query i, key j]
    for p in range(T):
        memory_of[:, :, p] = in_memory
        cached = (pos <= p - spec.window) & (pos >= spec.sinks) & ~in_memory  # (B, Hkv, T)
        if (p + 1) % spec.cache_every or cached.sum(-1).max() <= spec.cache:
            continue
        memory = None
        if spec.memory:
            memory = (streams.fk * in_memory[..., None]).transpose(-1, -2) @ _ones_column(v)
        errors = sparse_cache.self_recall_error(streams.fk, v, memory).masked_fill(~cached, float("-inf"))
        if spec.cache_pool:  # over each head's cached keys alone, in position order, as the cache holds them
            for b, h in [(b, h) for b in range(B) for h in range(Hkv)]:
                at = cached[b, h].nonzero()[:, 0]
                errors[b, h, at] = sparse_cache.pooled(errors[b, h, at][None, None], spec.cache_pool)[0, 0]
        kept = sparse_cache.worst_recalled(errors, spec.cache)
        in_memory |= cached & ~kept  # written into the memory (dropped without a linear part)
    causal = pos[None, :] <= pos[:, None]
    exact = causal & ~memory_of  # (B, Hkv, T, T)
    window = causal & (pos[None, :] > pos[:, None] - spec.window)
    s = (_group(q, Hkv) @ k.unsqueeze(2).transpose(-1, -2)) * spec.scale
    if spec.cache_distance is not None:  # exact keys outside the window (cache, sinks) at cache_distance (+ packed)
        far = (exact & ~window).int()  # (B, Hkv, T, T)
        after = far.flip(-1).cumsum(-1).flip(-1) - far  # [.., i, j]: far keys of query i after key j
        distance = spec.cache_distance + after * spec.cache_packed  # (B, Hkv, T, T)
        k_at = rotate(rotate(k, -pos, inv_freq).unsqueeze(2).expand(-1, -1, T, -1, -1), -distance, inv_freq)
        s_far = torch.einsum("bhgid,bhijd->bhgij", _group(rotate(q, -pos, inv_freq), Hkv), k_at) * spec.scale
        s = torch.where(window, s, s_far)
    s_exact = s.masked_fill(~exact.unsqueeze(2), float("-inf"))
    m = s_exact.amax(-1, keepdim=True)
    num_sm = _exact_num(s_exact, v, m)
    lin = None
    if spec.memory:  # in the units of the window and sinks: exp(s - m_ref)
        reference = window | (causal & (pos[None, :] < spec.sinks))
        m_ref = s.masked_fill(~reference, float("-inf")).amax(-1, keepdim=True)
        a = (_group(streams.fq, Hkv) @ streams.fk.unsqueeze(2).transpose(-1, -2)) * memory_of.unsqueeze(2)
        lin = _capped((a @ _ones_column(v).unsqueeze(2)) * torch.exp(m_ref - m), memory_of.sum(-1).unsqueeze(2),
                      spec)
    return _combine(num_sm, lin, mix, Hkv)


def _attention_cached(streams: Streams, spec: AttentionSpec, mix, state: LinearAttentionState, key_features,
                      longest: int, inv_freq=None) -> torch.Tensor:
    """Feed the tokens in segments of at most `longest` that never cross a selection; `state` moves on in place.
    Returns y (B, H, T, d)."""
    ys, t, T = [], 0, len(streams)
    while t < T:
        n = min(longest, spec.cache_every - state.seen % spec.cache_every, T - t)
        ys.append(_cached_segment(streams.slice(slice(t, t + n)), spec, mix, state, key_features, inv_freq))
        t += n
    return torch.cat(ys, dim=2) if ys else torch.zeros_like(streams.q)


def _cached_memory_size(state: LinearAttentionState) -> int:
    """How many keys the memory of a state with a sparse cache holds: every token seen that is not exact (in the
    window, the sinks or the cache)."""
    return state.seen - len(state.win) - sum(0 if p is None else len(p) for p in (state.sinks, state.cache))


def _to_cache(keys: Streams, first: int, spec: AttentionSpec, inv_freq) -> Streams:
    """Keys (B, Hkv, n, .) at positions first, first + 1, ... as the sparse cache holds them: k, v; where the cache
    scores them at a distance, k rotated back to position 0 (its RoPE undone, so a step rotates its query alone)
    and their positions (to redo it: _rope_keys)."""
    if spec.cache_distance is None:
        return Streams(keys.k, keys.v)
    B, Hkv, n, _ = keys.k.shape
    position = torch.arange(first, first + n, device=keys.k.device, dtype=torch.int32).expand(B, Hkv, n)
    return Streams(rotate(keys.k, -position, inv_freq), keys.v, position=position)


def _rope_keys(cache: Streams, inv_freq) -> torch.Tensor:
    """The cache's keys (B, Hkv, m, d) with RoPE at their own positions, as they left the window."""
    return cache.k if cache.position is None else rotate(cache.k, cache.position, inv_freq)


def _cache_queries(qg, pos_q, spec: AttentionSpec, inv_freq, n_far=0) -> torch.Tensor:
    """Queries qg (B, Hkv, G, n, d) at positions pos_q (n,) as they score the exact keys outside the window (sinks,
    cache): as they are, or, where those are scored at a distance, rotated to it (their keys at position 0; packed:
    the r-th of a query's n_far (int or (n,)) such keys at r, the query at distance + n_far - 1: _in_row)."""
    if spec.cache_distance is None:
        return qg
    return rotate(qg, spec.cache_distance + (n_far - 1 if spec.cache_packed else 0) - pos_q, inv_freq)


def _in_row(k: torch.Tensor, first: int, spec: AttentionSpec, inv_freq) -> torch.Tensor:
    """Keys (B, Hkv, m, d) outside the window, the first..first+m-1-th of their row, as _cache_queries scores them:
    packed, RoPE'd to positions first, first + 1, ... (their RoPE was undone: _to_cache); else as they are."""
    if not spec.cache_packed:
        return k
    return rotate(k, torch.arange(first, first + k.shape[2], device=k.device), inv_freq)


def _cache_scores(qg_cache, cache: Streams, spec: AttentionSpec, inv_freq=None, first: int = 0) -> torch.Tensor:
    """Queries (B, Hkv, G, n, d) from _cache_queries against m keys outside the window, from the first-th of their
    row on -> scores (B, Hkv, G, n, m)."""
    return _per_group(qg_cache, _in_row(cache.k, first, spec, inv_freq).transpose(-1, -2)) * spec.scale


def _cached_segment(streams: Streams, spec: AttentionSpec, mix, state: LinearAttentionState, key_features,
                    inv_freq=None):
    """n tokens that end at or before the next selection: each query attends exactly to the state's sinks and cache
    and (causally) to the window and the segment's keys, and reads the memory, which is fixed until the selection.
    Then the keys that left the window join the sinks or the cache, and at a selection the cache keeps its worst
    recalled keys (sparse_cache.py). Returns y (B, H, n, d); replaces the state's fields (no tensor is written)."""
    if streams.log_gate is not None:
        raise ValueError("the sparse cache supports the sum rule without a forget gate")
    q = streams.q
    n = q.shape[2]
    in_memory = _cached_memory_size(state)
    keys = state.in_order().append(streams.keys())  # k, v (a cache has no gate or strength)
    w, Hkv = len(keys) - n, keys.k.shape[1]
    qg = _group(q, Hkv)
    first = state.seen - w  # the position of keys[0]
    pos_q = torch.arange(state.seen, state.seen + n, device=q.device)[:, None]
    pos_k = torch.arange(first, first + w + n, device=q.device)[None, :]
    causal = pos_k <= pos_q
    reference = causal & ((pos_k > pos_q - spec.window) | (pos_k < spec.sinks))  # the window and the sinks
    s = _per_group(qg, keys.k.transpose(-1, -2)) * spec.scale  # (B, Hkv, G, n, len(keys))
    left = max(len(keys) - spec.window, 0)  # keys 0 .. left-1 leave the window during the segment
    leaving = _to_cache(keys.slice(slice(0, left)), first, spec, inv_freq)
    n_sinks = 0 if state.sinks is None else len(state.sinks)
    n_held = n_sinks + (0 if state.cache is None else len(state.cache))  # exact keys held outside the window
    out_of_reach = (pos_q[:, 0] - spec.window - first + 1).clamp(0, left)  # leaving keys outside each query's window
    qg_cache = _cache_queries(qg, pos_q[:, 0], spec, inv_freq, n_held + out_of_reach)
    if spec.cache_distance is not None and left:  # such a key is cached (or a sink) for the queries it is out of
        near = (pos_k > pos_q - spec.window) | ~causal  # reach of: scored at the distance, after sinks and cache
        far = _cache_scores(qg_cache, leaving, spec, inv_freq, first=n_held)
        s[..., :left] = torch.where(near[:, :left], s[..., :left], far)
    s = s.masked_fill(~causal, float("-inf"))
    parts = [(keys, s)]
    m_ref = s.masked_fill(~reference, float("-inf")).amax(-1, keepdim=True)  # the largest window/sink score
    if state.sinks is not None:
        parts.append((state.sinks, _cache_scores(qg_cache, state.sinks, spec, inv_freq)))  # held, scored as the cache
        m_ref = torch.maximum(m_ref, parts[-1][1].amax(-1, keepdim=True))
    if state.cache is not None:
        parts.append((state.cache, _cache_scores(qg_cache, state.cache, spec, inv_freq, first=n_sinks)))
    m = torch.stack([s.amax(-1, keepdim=True) for _, s in parts]).amax(0)
    num_sm = sum(_exact_num(s, part.v, m) for part, s in parts)
    lin = None
    if spec.memory:  # the memory was trained against the window and sinks: in units of exp(s - m_ref)
        lin = _capped(_per_group(_group(streams.fq, Hkv), state.kv) * torch.exp(m_ref - m), in_memory, spec)
    y = _combine(num_sm, lin, mix, Hkv)
    n_sink = min(max(spec.sinks - first, 0), left)
    if n_sink:
        state.sinks = _then(state.sinks, leaving.slice(slice(0, n_sink)))
    if left > n_sink:
        state.cache = _then(state.cache, leaving.slice(slice(n_sink, left)))
    state.win, state.start, state.seen = keys.slice(slice(left, None)), 0, state.seen + n
    _select_when_due(state, spec, key_features, inv_freq)
    return y


def _cached_step(streams: Streams, spec: AttentionSpec, mix, state: LinearAttentionState, key_features,
                 inv_freq=None):
    """One token (B, ., 1, .) with the sparse cache and a window W > 0, for decoding: _cached_segment with n = 1,
    but the window is the ring of _push_window, written in place (the key leaving it joins the sinks or the cache),
    and no mask is built. Returns y (B, H, 1, d)."""
    q = streams.q
    B, _, _, d = q.shape
    Hkv = streams.k.shape[1]
    in_memory = _cached_memory_size(state)
    _push_window(state, spec, streams, key_features, inv_freq)
    qg = q.reshape(B, Hkv, -1, d)
    parts = [state.win] + [p for p in (state.sinks, state.cache) if p is not None]
    n_ref = len(state.win) + (0 if state.sinks is None else len(state.sinks))  # the window and sinks come first
    v = torch.cat([p.v for p in parts], dim=2)
    if spec.cache_distance is None or len(parts) == 1:
        scores = (qg @ torch.cat([p.k for p in parts], dim=2).transpose(-1, -2)) * spec.scale  # (B, Hkv, G, n)
    else:  # the window as it is, the sinks and the cache (after it) at their distance
        near = (qg @ state.win.k.transpose(-1, -2)) * spec.scale
        pos_q = torch.full((1,), state.seen - 1, device=q.device)
        far_k = _in_row(torch.cat([p.k for p in parts[1:]], dim=2), 0, spec, inv_freq)
        far = (_cache_queries(qg, pos_q, spec, inv_freq, far_k.shape[2]) @ far_k.transpose(-1, -2)) * spec.scale
        scores = torch.cat([near, far], dim=-1)
    m_ref = scores[..., :n_ref].amax(-1, keepdim=True)  # the largest window/sink score: the memory's units
    m = scores.amax(-1, keepdim=True)
    num_sm = (torch.exp(scores - m) @ _ones_column(v)).unsqueeze(3)
    lin = None
    if spec.memory:
        lin = (streams.fq.reshape(B, Hkv, -1, streams.fq.shape[-1]) @ state.kv).unsqueeze(3)  # (B, Hkv, G, 1, d+1)
        lin = _capped(lin * torch.exp(m_ref - m).unsqueeze(3), in_memory, spec)
    y = _combine(num_sm, lin, mix, Hkv)
    _select_when_due(state, spec, key_features, inv_freq)
    return y


def _select_when_due(state: LinearAttentionState, spec: AttentionSpec, key_features, inv_freq=None):
    """After the tokens at positions p with (p + 1) % cache_every == 0: a selection, if the cache has too many keys."""
    if state.seen % spec.cache_every == 0 and state.cache is not None and len(state.cache) > spec.cache:
        _select(state, spec, key_features, inv_freq)


def _select(state: LinearAttentionState, spec: AttentionSpec, key_features, inv_freq=None):
    """The cache keeps the spec.cache keys of each head the memory recalls worst; the rest enter the memory."""
    cache = state.cache
    fk = key_features(_rope_keys(cache, inv_freq)) if spec.memory else None
    errors = sparse_cache.pooled(sparse_cache.self_recall_error(fk, cache.v, state.kv), spec.cache_pool)
    kept, evicted = sparse_cache.keep_worst_recalled(errors, spec.cache)
    if spec.memory:
        fk_out, v_out = sparse_cache.gather_time(fk, evicted), sparse_cache.gather_time(cache.v, evicted)
        state.kv = state.kv + fk_out.transpose(-1, -2) @ _ones_column(v_out)  # S += sum phi(k)^T [v, 1]
    state.cache = Streams(sparse_cache.gather_time(cache.k, kept), sparse_cache.gather_time(cache.v, kept),
                          position=None if cache.position is None else torch.take_along_dim(cache.position, kept, 2))
