"""What an attention call is told besides the tokens: its mode (AttentionSpec), the layer's constants
(LayerConstants), and the one statement of which settings combine (check_settings, which the layer's
LinearAttentionConfig calls too).

- AttentionSpec: window W (0: pure linear; None: full causal softmax, no linear part), scale, sinks S (the first S
  tokens stay in exact softmax for ever and never enter the memory), rule ("sum" | "delta"), linear (False: no
  linear part), memory_cap C (0: none), the sparse cache (cache M, cache_every, cache_pool; sparse_cache/), its
  cache_distance (None: a cached key is scored at its own position; D: as if it sat D tokens before every query)
  and cache_packed (with D: in a row from D back), cache_score (how the cache ranks its keys: "recall", the
  memory's self-recall error, or "learned", the layer's fitted scorer), heavy M (heavy_hitters/).
- LayerConstants: mix (H,) the exact part's weight, key_features k (B, Hkv, n, d) -> phi(k) (B, Hkv, n, F) (a state
  keeps its window keys, not their features), norm_gain (H, d) the output normalisation's gain (None: the shared
  normaliser), inv_freq (d/2,) the RoPE frequencies (needed where cache_distance is set), cache_scorer (Hkv, 2d + 1)
  the fitted cache score (needed where cache_score is "learned").
"""

from dataclasses import dataclass
from typing import Callable

import torch

from ...errors import LinearizeError

RULES = ("sum", "delta")
GATES = ("none", "key")
NORMS = ("shared", "rms")
CACHE_SCORES = ("recall", "learned")


class SettingsError(LinearizeError, ValueError):
    """Attention settings that do not combine: a LinearizeError for the user, a ValueError for code."""


def plain_sum_memory(rule: str = "sum", gate: str = "none", norm: str = "shared") -> bool:
    """The sum rule without a forget gate, under the shared normaliser: a memory whose weight grows with the keys it
    holds (what the sparse cache, the memory cap and the heavy hitters work with)."""
    return rule == "sum" and gate == "none" and norm == "shared"


def check_settings(*, window: int | None, sinks: int = 0, rule: str = "sum", gate: str = "none",
                   norm: str = "shared", cache: int = 0, cache_every: int = 64, cache_pool: int = 0,
                   memory_cap: int = 0, heavy: int = 0, cache_distance: int | None = None, cache_packed: bool = False,
                   cache_score: str = "recall"):
    """Raise SettingsError for the first rule these settings break. The one place that says which settings of a
    hybrid attention combine: AttentionSpec checks its mode here (gate and norm are not part of it: the streams and
    the layer's constants carry them), LinearAttentionConfig its settings."""
    if window is not None and window < 0:
        raise SettingsError(f"window must be >= 0 (got {window})")
    if gate not in GATES or rule not in RULES or norm not in NORMS:
        raise SettingsError(f"gate must be one of {GATES}, rule one of {RULES} and norm one of {NORMS} "
                            f"(got {gate!r}, {rule!r}, {norm!r})")
    if sinks < 0 or (sinks and window is None):
        raise SettingsError(f"sinks must be >= 0, and need a bounded window (got sinks={sinks}, window={window})")
    if cache < 0 or cache_every < 1 or cache_pool < 0:
        raise SettingsError(f"cache must be >= 0, cache_every >= 1 and cache_pool >= 0 (got {cache}, {cache_every}, "
                            f"{cache_pool})")
    if memory_cap < 0:
        raise SettingsError(f"memory_cap must be >= 0 (got {memory_cap})")
    plain = plain_sum_memory(rule, gate, norm)
    if memory_cap and not plain:
        raise SettingsError("the memory cap (--memory-cap) works with the sum rule without a gate and the shared "
                            "normaliser (a gate or the delta rule already bound the memory): drop --memory-cap")
    if heavy < 0:
        raise SettingsError(f"heavy (--heavy) must be >= 0 (got {heavy})")
    if heavy and (not window or not plain or cache):
        raise SettingsError("heavy hitters (--heavy) need a softmax window (window > 0) and the sum rule without a "
                            "gate, with the shared normaliser, and no sparse cache (--cache): --heavy 0 switches them "
                            "off, or choose such an attention (e.g. --attention lolcats)")
    if cache and (window is None or not plain):
        raise SettingsError("the sparse cache (--cache) works with a bounded window and the sum rule without a gate, "
                            "with the shared normaliser: drop --cache, or choose such an attention (e.g. --attention "
                            "lolcats)")
    if cache and not (window or sinks):
        raise SettingsError("the sparse cache (--cache) needs a softmax window (window > 0) or sinks beside it")
    if cache_distance is not None and (not cache or cache_distance < 0):
        raise SettingsError("cache_distance needs a sparse cache and must be >= 0")
    if cache_packed and cache_distance is None:
        raise SettingsError("cache_packed needs a cache_distance")
    if cache_score not in CACHE_SCORES:
        raise SettingsError(f"cache_score (--cache-score) must be one of {CACHE_SCORES} (got {cache_score!r})")
    if cache_score == "learned" and cache and cache_distance is None:
        raise SettingsError("the learned cache score (--cache-score learned) reads keys with their RoPE undone, which "
                            "a cache scored at a distance holds: add --cache-position packed (or edge), or use "
                            "--cache-score recall")


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
    cache_score: str = "recall"

    def __post_init__(self):
        check_settings(window=self.window, sinks=self.sinks, rule=self.rule, cache=self.cache,
                       cache_every=self.cache_every, cache_pool=self.cache_pool, memory_cap=self.memory_cap,
                       heavy=self.heavy, cache_distance=self.cache_distance, cache_packed=self.cache_packed,
                       cache_score=self.cache_score)

    @property
    def memory(self) -> bool:
        """True when there is a linear memory (a linear part and a bounded window)."""
        return self.linear and self.window is not None

    @property
    def delta(self) -> bool:
        return self.rule == "delta"


@dataclass(frozen=True)
class LayerConstants:
    """What a layer's attention reads besides the tokens and its mode; the same for every token.
    mix (H,): the exact part's weight w_h (unused without a linear part; None there);
    key_features: k (B, Hkv, n, d) -> phi(k) (B, Hkv, n, F), the map that made the streams' fk (a state keeps its
      window keys, not their features, and recomputes them as they leave the window); None without a memory;
    norm_gain (H, d): the gain of the linear part's output normalisation (None: the shared normaliser);
    inv_freq (d/2,): the model's RoPE frequencies, needed where spec.cache_distance is set;
    cache_scorer (Hkv, 2d + 1): the fitted cache score's weights (sparse_cache/selection.learned_score), needed where
      spec.cache_score is "learned"."""

    mix: torch.Tensor | None
    key_features: Callable[[torch.Tensor], torch.Tensor] | None = None
    norm_gain: torch.Tensor | None = None
    inv_freq: torch.Tensor | None = None
    cache_scorer: torch.Tensor | None = None
