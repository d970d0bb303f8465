"""The streams an attention call reads and the state decoding carries.

- Streams: per-token streams along time (dim 2) that travel together: q (B, H, T, d), k, v (B, Hkv, T, d) after
  RoPE, fq = phi(q) (B, H, T, F), fk = phi(k) (B, Hkv, T, F), log_gate, beta (B, Hkv, T), received, position
  (B, Hkv, T); a stream the mode does not use is None.
- LinearAttentionState: everything decoding needs (the memory, the window ring, the sinks, the sparse cache's and
  the heavy hitters' keys).
"""

from dataclasses import dataclass, fields, replace

import torch


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

    def slice(self, s: slice | torch.Tensor) -> "Streams":
        """The time steps s (a slice, or a 1-D tensor of indices) of every stream."""
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


def then(a: Streams | None, b: Streams) -> Streams:
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
    cache: the key streams (k, v) of the sparse cache (sparse_cache/), per KV head, None until a key is cached
    (scored at a distance: k with its RoPE undone, and each key's position; the sinks alike);
    heavy: the key streams (k, v, received) of the heavy hitters (heavy_hitters/), per KV head in position order,
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
