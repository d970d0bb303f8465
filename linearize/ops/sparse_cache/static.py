"""The sparse cache's decoding step in buffers of fixed shape, for a captured step (CUDA graphs): recurrent.py's
cached_step and segment.py's selection with every size a constant, every count a tensor and every write in place,
so a graph recorded once reads and writes the same addresses for every token.

A StaticCacheState holds what a LinearAttentionState holds once its window is full and its sinks have left it (the
prompt was longer than W + S tokens):

    win_k, win_v (B, Hkv, W, d)      the window, a ring: `slot` is the oldest key's slot, the next one written;
    far_k, far_v (B, Hkv, S + C, d)  the sinks, then C = M + N slots of the cache (M keys, re-selected every N
                                     tokens), of which the first `count` hold keys in position order, the others
                                     zeros, masked out; far_position (B, Hkv, S + C) int32 with a cache distance;
    kv (B, Hkv, F, d + 1)            the memory (sum rule);
    seen, count, slot                () int64 tensors: tokens consumed, keys in the cache, the ring's next slot.

C is one more than a LinearAttentionState ever holds between steps (M + N - 1): the N-th key waits there during
the step that ends with a selection.

- static_step(streams, spec, layer, state): one token; the selection is the caller's (its host knows when one is
  due: after the tokens at positions p with (p + 1) % N == 0, when the cache holds more than M keys: selection_due);
- static_select(spec, layer, state): the selection, in place.
Both equal cached_step and select to rounding (tests/test_static_step.py).
"""

from dataclasses import dataclass, fields

import torch

from ..heavy_hitters.selection import split
from ..hybrid.spec import AttentionSpec, LayerConstants
from ..hybrid.state import LinearAttentionState, Streams
from ..hybrid.terms import ones_column
from ..rotary import rotate
from .positions import cache_queries, in_row, rope_keys
from .recurrent import step_output
from .segment import ranking
from .selection import pooled, worst_recalled


@dataclass
class StaticCacheState:
    """A sparse-cache decoding state in fixed buffers (module docstring); from_state / to_state convert."""

    win_k: torch.Tensor
    win_v: torch.Tensor
    far_k: torch.Tensor
    far_v: torch.Tensor
    far_position: torch.Tensor | None
    kv: torch.Tensor | None
    seen: torch.Tensor
    count: torch.Tensor
    slot: torch.Tensor

    @staticmethod
    def spec_unsupported(spec: AttentionSpec) -> str | None:
        """Why no state of this attention can be held in fixed buffers (None: once the prompt is long enough)."""
        if not spec.cache or not spec.window or spec.heavy or spec.delta:
            return "a fixed-shape step needs a sparse cache beside a window, the sum rule and no heavy hitters"
        return None

    @classmethod
    def unsupported(cls, state: LinearAttentionState | None, spec: AttentionSpec) -> str | None:
        """Why this state cannot be held in fixed buffers (None: it can)."""
        if reason := cls.spec_unsupported(spec):
            return reason
        if state is None or state.seen < spec.window + spec.sinks:  # the next key to leave the window may be a sink
            return f"the prompt must fill the window and the sinks first (at least {spec.window + spec.sinks} tokens)"
        if state.win.log_gate is not None:
            return "a fixed-shape step does not support a forget gate"
        return None

    @classmethod
    def from_state(cls, state: LinearAttentionState, spec: AttentionSpec) -> "StaticCacheState":
        """The same state in fixed buffers (copies: `state` is left as it was)."""
        if reason := cls.unsupported(state, spec):
            raise ValueError(reason)
        win = state.win
        B, Hkv = win.k.shape[:2]
        count = 0 if state.cache is None else len(state.cache)
        held = [p for p in (state.sinks, state.cache) if p is not None]
        free = spec.sinks + spec.cache + spec.cache_every - sum(len(p) for p in held)

        def far(name):  # the sinks' and the cache's stream `name`, then zeros up to S + C slots
            like = win.k if name == "position" else getattr(win, name)
            empty = like.new_zeros((B, Hkv, free), dtype=torch.int32) if name == "position" else \
                like.new_zeros((B, Hkv, free, like.shape[-1]))
            return torch.cat([*(getattr(p, name) for p in held), empty], dim=2)

        distance = spec.cache_distance is not None
        return cls(win_k=win.k.clone(), win_v=win.v.clone(), far_k=far("k"), far_v=far("v"),
                   far_position=far("position") if distance else None,
                   kv=None if state.kv is None else state.kv.clone(),
                   seen=torch.tensor(state.seen, device=win.k.device),
                   count=torch.tensor(count, device=win.k.device),
                   slot=torch.tensor(state.start, device=win.k.device))

    def to_state(self, spec: AttentionSpec) -> LinearAttentionState:
        """The LinearAttentionState of these buffers (copies), for every other form (chunked prefill, state files)."""
        S, count = spec.sinks, int(self.count)
        position = self.far_position

        def part(lo, hi):
            return Streams(self.far_k[:, :, lo:hi].clone(), self.far_v[:, :, lo:hi].clone(),
                           position=None if position is None else position[:, :, lo:hi].clone())

        return LinearAttentionState(kv=None if self.kv is None else self.kv.clone(),
                                    win=Streams(self.win_k.clone(), self.win_v.clone()), start=int(self.slot),
                                    sinks=part(0, S) if S else None, seen=int(self.seen),
                                    cache=part(S, S + count) if count else None)

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (getattr(self, f.name) for f in fields(self)) if t is not None]

    def nbytes(self) -> int:
        """The buffers' bytes: constant, whatever the context."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def selection_due(seen: int, count: int, spec: AttentionSpec) -> bool:
    """After a step that leaves `seen` tokens consumed and `count` keys in the cache: is a selection due (as
    segment.select_when_due decides)?"""
    return seen % spec.cache_every == 0 and count > spec.cache


def static_step(streams: Streams, spec: AttentionSpec, layer: LayerConstants, state: StaticCacheState):
    """One token (B, ., 1, .): the oldest window key joins the cache in its next free slot, the new key takes its
    slot in the ring, and the query attends exactly to the window, the sinks and the cache's `count` keys, and reads
    the memory (cached_step, in fixed shapes). Returns y (B, H, 1, d); the state moves on in place."""
    q, inv_freq = streams.q, layer.inv_freq
    B, _, _, d = q.shape
    Hkv, W, S = streams.k.shape[1], spec.window, spec.sinks
    in_memory = state.seen - W - S - state.count  # every key seen that is not exact (before this token)
    leaving = state.slot.view(1)
    free = (S + state.count).view(1)
    k_out, v_out = state.win_k.index_select(2, leaving), state.win_v.index_select(2, leaving)
    if state.far_position is not None:  # held with its RoPE undone, and its position (positions.to_cache)
        position = (state.seen - W).to(torch.int32).expand(B, Hkv, 1)
        k_out = rotate(k_out, -position, inv_freq)
        state.far_position.index_copy_(2, free, position)
    state.far_k.index_copy_(2, free, k_out)
    state.far_v.index_copy_(2, free, v_out)
    state.win_k.index_copy_(2, leaving, streams.k)
    state.win_v.index_copy_(2, leaving, streams.v)
    state.slot.copy_((state.slot + 1) % W)
    state.count.add_(1)
    state.seen.add_(1)

    qg = q.reshape(B, Hkv, -1, d)
    near = (qg @ state.win_k.transpose(-1, -2)) * spec.scale  # (B, Hkv, G, W)
    n_far = S + state.count
    pos_q = (state.seen - 1).view(1)
    far = (cache_queries(qg, pos_q, spec, inv_freq, n_far)
           @ in_row(state.far_k, 0, spec, inv_freq).transpose(-1, -2)) * spec.scale
    far = far.masked_fill(torch.arange(far.shape[-1], device=q.device) >= n_far, float("-inf"))
    scores = torch.cat([near, far], dim=-1)
    v = torch.cat([state.win_v, state.far_v], dim=2)
    return step_output(scores, W + S, v, streams.fq, state.kv, in_memory, spec, layer)


def static_select(spec: AttentionSpec, layer: LayerConstants, state: StaticCacheState):
    """The selection (segment.select) in place, for a cache holding more than M keys: each head keeps its M keys
    ranked highest, moved to the first M slots in position order; the other valid keys enter the memory."""
    S, M = spec.sinks, spec.cache
    C = state.far_k.shape[2] - S
    cache = Streams(state.far_k[:, :, S:], state.far_v[:, :, S:],
                    position=None if state.far_position is None else state.far_position[:, :, S:])
    valid = torch.arange(C, device=state.count.device) < state.count
    fk = layer.key_features(rope_keys(cache, layer.inv_freq)) if spec.memory else None
    score = ranking(cache, fk, state.kv, spec, layer).masked_fill(~valid, float("-inf"))
    keep = worst_recalled(pooled(score, spec.cache_pool), M)  # the M largest, all valid: the cache holds more
    kept, _ = split(keep, M)
    if spec.memory:
        evicted = (valid & ~keep).to(fk.dtype).unsqueeze(-1)
        state.kv.add_((fk * evicted).transpose(-1, -2) @ ones_column(cache.v))  # S += sum phi(k)^T [v, 1]
    for buffer in (state.far_k, state.far_v, state.far_position):
        if buffer is not None:
            kept_values = torch.take_along_dim(buffer[:, :, S:], kept if buffer.dim() == 3 else kept[..., None], 2)
            buffer[:, :, S + M :].zero_()
            buffer[:, :, S : S + M].copy_(kept_values)
    state.count.fill_(M)
