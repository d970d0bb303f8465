"""LinearAttention: the drop-in replacement for a teacher's softmax attention module.

It keeps the teacher's q/k/v/o projections (same parameter names, so checkpoints and LoRA target names line
up) and rotary embedding, and adds a learnable feature map for queries and keys plus, for the hybrid variant,
a per-head mixing factor. Every variant (Hedgehog, T2R, ELU; window 0 or > 0) is a LinearAttentionConfig.
"""

import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import LinearizeError
from ..ops.feature_maps import FEATURE_MAPS, make_feature_map
from ..ops.hybrid.chunked import attention_chunked
from ..ops.hybrid.naive import attention_quadratic
from ..ops.hybrid.recurrent import attention_recurrent
from ..ops.hybrid.spec import AttentionSpec, LayerConstants, check_settings, plain_sum_memory
from ..ops.hybrid.state import Streams


CACHE_POSITIONS = ("own", "edge", "packed")


@dataclass
class LinearAttentionConfig:
    """One attention mechanism, many configurations.
    feature_map: "hedgehog" | "t2r" | "elu" | "nala" (norm-aware, NaLaFormer); feature_dim: projection width
      (default head_dim);
    window: softmax sliding window (0 = pure linear; None = unbounded, i.e. full softmax attention);
    sinks: the first `sinks` tokens of a sequence stay in exact softmax for ever (attention sinks, as in
      StreamingLLM) and never enter the linear memory; 0 = none;
    chunk_size: block length of the chunked form;
    gate: "none" | "key": a per-token forget gate on the linear memory, built from the pretrained key projection
      with no new parameters (Liger): log g_t = logsigmoid(mean over head_dim of k_t) / gate_norm (pre-RoPE k);
    rule: "sum" (linear attention) | "delta" (delta rule; with gate="key" the gated delta rule), write strength
      beta = sigmoid(a learned per-KV-head logit), phi(q), phi(k) L2-normalised;
    linear: False drops the linear part: exact (sliding-window) softmax, no feature maps (no new parameters);
    cache: a sparse cache of the `cache` keys per KV head that the linear memory recalls worst, kept exact (LoLA;
      ops/sparse_cache/), re-selected every `cache_every` tokens, each key ranked by the worst error within
      `cache_pool` keys on either side of it (whole numbers stay: 4k passkey 60 -> 100 %, 10 trials,
      docs/results/recall_pooled_probe.json); 0 = none. Sum rule without a gate only; it
      needs no training and can be switched on for a converted model (training_free.TrainingFree);
    cache_position: where the cache's keys (and the sinks, once out of the window) are scored: "own" (their own
      positions, however far back) | "edge" (as if each sat `window` tokens before the query, just beyond the window,
      ops/rotary.py) | "packed" (in a row from there back, in their order, one position apart: as if the text
      between them were cut out; ops/sparse_cache/positions.py); training-free like the cache
      (training_free.TrainingFree). Needs the teacher's RoPE frequencies;
    cache_score: how the cache ranks its keys: "recall" (the memory's self-recall error, training-free) | "learned"
      (a linear score of each key and value per KV head, fitted to the attention that questions far beyond the
      window pay in look-up exercises: transfer/cache_score.py; the layer then holds its weights, `cache_scorer`,
      and needs cache_position edge or packed);
    norm: "shared" (one normaliser for the window and the linear memory) | "rms" (TransNormer's NormAttention: the
      linear part has no denominator; its output is RMS-normalised per head with a learnable gain (H, d), init 1,
      then mixed with the window's softmax output by the same per-head factor);
    local_layers: the first `local_layers` layers of the model keep only the exact softmax window (+ sinks), no
      linear part (TransNormer's DiagAttention in the early layers; applied by models.linearized);
    memory_cap: C > 0 scales the linear memory by C / n once it holds n > C keys, so it never weighs more than C
      keys (sum rule, shared normaliser, no gate; 0 = none). Training-free (training_free.TrainingFree): a cap
      of at least the training length minus window and sinks leaves every training-length output as it was and
      stops the memory from drowning the window, sinks and cache on longer contexts;
    heavy: heavy hitters ("dynamic sinks", ops/heavy_hitters/): of the keys that left the window, the `heavy` per KV
      head that drew the most window attention stay in exact softmax instead of the linear memory; 0 = none. Sum
      rule without a gate, shared normaliser, no sparse cache; training-free (training_free.TrainingFree);
    mix_init: the initial mixing logit of every head (the exact part's weight starts at sigmoid(mix_init); 0: half
      the weight to the linear memory; 4: about 2 %, the model starts near its window + sinks alone)."""

    feature_map: str = "hedgehog"
    feature_dim: int | None = None
    window: int | None = 64
    sinks: int = 0
    chunk_size: int = 64
    gate: str = "none"
    gate_norm: float = 16.0
    rule: str = "sum"
    linear: bool = True
    cache: int = 0
    cache_every: int = 64
    cache_pool: int = 2
    norm: str = "shared"
    local_layers: int = 0
    mix_init: float = 0.0
    memory_cap: int = 0
    heavy: int = 0
    cache_position: str = "own"
    cache_score: str = "recall"

    def __post_init__(self):
        """The layer's own settings here; which attention settings combine: ops/hybrid/spec.py check_settings."""
        if self.feature_map not in FEATURE_MAPS:
            raise LinearizeError(f"unknown feature map {self.feature_map!r}; choose one of {sorted(FEATURE_MAPS)}")
        if self.chunk_size < 1:
            raise LinearizeError(f"chunk_size must be >= 1 (got {self.chunk_size})")
        if self.feature_dim is not None and self.feature_dim < 1:
            raise LinearizeError(f"feature_dim (--feature-dim) must be >= 1 (got {self.feature_dim})")
        if self.local_layers < 0:
            raise LinearizeError(f"local_layers must be >= 0 (got {self.local_layers})")
        if (not self.linear or self.local_layers) and self.window == 0:
            raise LinearizeError("linear=False and local_layers need a softmax window (window > 0, or None for full "
                                 "attention)")
        if self.cache_position not in CACHE_POSITIONS:
            raise LinearizeError(f"cache_position (--cache-position) must be one of {CACHE_POSITIONS} (got "
                                 f"{self.cache_position!r})")
        check_settings(window=self.window, sinks=self.sinks, rule=self.rule, gate=self.gate, norm=self.norm,
                       cache=self.cache, cache_every=self.cache_every, cache_pool=self.cache_pool,
                       memory_cap=self.memory_cap, heavy=self.heavy, cache_distance=self.cache_distance,
                       cache_score=self.cache_score)

    @property
    def cache_distance(self) -> int | None:
        """How far back the cache's keys (and the sinks beyond the window) are scored: `window` tokens before each
        query where the cache sits at the edge or packed (its keys then held with their RoPE undone, which a learned
        score reads), None at their own positions or without a cache."""
        return self.window if self.cache and self.cache_position != "own" else None

    @property
    def plain_sum_memory(self) -> bool:
        """The sum rule without a forget gate, under the shared normaliser (ops/hybrid/spec.py plain_sum_memory)."""
        return plain_sum_memory(self.rule, self.gate, self.norm)

    @property
    def plain_memory_beside_exact(self) -> bool:
        """A linear part whose plain sum memory sits beside a softmax window or sinks: the attention a memory cap
        and a sparse cache are made for."""
        return self.linear and self.window is not None and bool(self.window or self.sinks) and self.plain_sum_memory

    @property
    def takes_cache(self) -> bool:
        """Whether a sparse cache (`cache` > 0) works with this attention: plain_memory_beside_exact, and no heavy
        hitters."""
        return self.plain_memory_beside_exact and not self.heavy

    def to_dict(self) -> dict:
        return asdict(self)


# Exact causal softmax attention as a configuration of the same module: layers kept by --keep-softmax, and the
# "linear part switched off" check. Its decoding state is a KV cache (the unbounded window).
FULL_SOFTMAX = LinearAttentionConfig(window=None, linear=False)

# Named presets for `--attention NAME`.
ATTENTION_PRESETS: dict[str, LinearAttentionConfig] = {
    # the default: Hedgehog + a 256-token window + 4 attention sinks. The sinks took the held-out ppl ratio from
    # 1.74 to 1.32 at window 64 (docs/results/baseline.md); the window sets top-1 agreement (about 75 % at 64 with
    # or without a trained memory, experiments/stage1_probe.py), so the default keeps 256 (the paper's 64: --window 64).
    # The memory starts at about 2 % of the window's weight (mix_init 4): better than half on every column of the
    # 6-minute ablation (docs/results/ablation_6min.md), confirmed at the default budget (docs/results/quality.json).
    # Heavy hitters (--heavy 32) are better on every teacher-forced column (held-out 1.124x -> 1.080x in 25 minutes)
    # but repeat more in greedy answers (0.186 against the teacher's 0.129): an option, not the default (README)
    # `linearize convert` adds a sparse cache of 64 keys after training (training_free.CONVERT_DEFAULT), and its stage 2
    # trains this attention alone, without LoRA (ConvertSettings.lora_targets "none")
    "lolcats": LinearAttentionConfig(feature_map="hedgehog", window=256, sinks=4, mix_init=4.0),
    "hedgehog": LinearAttentionConfig(feature_map="hedgehog", window=0),
    "t2r": LinearAttentionConfig(feature_map="t2r", window=0),
    "elu": LinearAttentionConfig(feature_map="elu", window=0),
    "liger": LinearAttentionConfig(feature_map="hedgehog", window=0, gate="key"),  # gated linear attention
    "liger-swa": LinearAttentionConfig(feature_map="hedgehog", window=64, gate="key"),  # + sliding window
    "gated-delta": LinearAttentionConfig(feature_map="hedgehog", window=0, gate="key", rule="delta"),
    "gated-delta-swa": LinearAttentionConfig(feature_map="hedgehog", window=64, gate="key", rule="delta"),
    # the training-free baseline (StreamingLLM): the teacher's own softmax over 4 sinks + the last 64 tokens
    "streaming": LinearAttentionConfig(window=64, sinks=4, linear=False),
    # issue 16, lolcats with one idea changed each. TransNormer (Qin et al. 2022): NormAttention (output RMSNorm
    # instead of the normaliser; our learnable Hedgehog map, not the paper's parameter-free 1 + elu, which
    # `--feature-map elu` gives) and, in "transnormer", DiagAttention: the first half of the layers (15 of
    # SmolLM2-135M's 30) window + sinks only. NaLaFormer (Meng et al. 2025): the norm-aware feature map.
    "transnormer": LinearAttentionConfig(feature_map="hedgehog", window=64, sinks=4, norm="rms", local_layers=15),
    "transnormer-norm": LinearAttentionConfig(feature_map="hedgehog", window=64, sinks=4, norm="rms"),
    "nalaformer": LinearAttentionConfig(feature_map="nala", window=64, sinks=4),
}


def attention_preset(name: str, **overrides) -> LinearAttentionConfig:
    if name not in ATTENTION_PRESETS:
        raise LinearizeError(f"unknown attention {name!r}; choose one of {sorted(ATTENTION_PRESETS)}")
    cfg = asdict(ATTENTION_PRESETS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return LinearAttentionConfig(**cfg)


DROPPED_WINDOW = 1  # a window dropped in training (transfer/window_dropout.py) keeps the current token exact


def dropped_window(spec: AttentionSpec) -> AttentionSpec:
    """spec with its window shrunk to DROPPED_WINDOW (the sinks stay) and no memory cap, heavy hitters or cache
    (the cap was set for the full window: it would scale the larger memory down)."""
    return replace(spec, window=min(spec.window, DROPPED_WINDOW), memory_cap=0, heavy=0, cache=0,
                   cache_distance=None, cache_packed=False)


class DecodingState(list):
    """Per-layer LinearAttentionState list, passed to the model as `linear_state=` to decode step by step.
    An entry is None until that layer has seen its prompt."""

    def __init__(self, num_layers: int):
        super().__init__([None] * num_layers)
        self.seen = 0  # tokens consumed so far: the position of the next one

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self if s is not None)


class LinearAttention(nn.Module):
    """Replaces `teacher_attn` (a transformers attention module with q_proj/k_proj/v_proj/o_proj, optional
    q_norm/k_norm, attributes head_dim, scaling, layer_idx). Called exactly like it:
    forward(hidden_states (B, T, D), position_embeddings=(cos, sin), ...) -> (output (B, T, D), None)."""

    # forms: "chunked" (default), "quadratic" (reference) -- selectable for tests and debugging
    form: str = "chunked"
    # True: the teacher's own attention (exact causal softmax) in the layers that have a linear part; with the LoRA
    # adapters disabled the model then *is* the teacher (stage 2 distils from it without a second copy, teacher_view)
    exact_softmax: bool = False
    # True for one training step (transfer/window_dropout.py): the window shrinks to the current token, the sinks
    # stay, so the linear memory carries the rest
    window_dropped: bool = False

    def __init__(self, teacher_attn: nn.Module, config: LinearAttentionConfig, num_heads: int, num_kv_heads: int,
                 rope_frequencies=None):
        super().__init__()
        self.config = config
        self.layer_idx = teacher_attn.layer_idx
        self.head_dim = teacher_attn.head_dim
        self.scaling = teacher_attn.scaling
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"):
            if hasattr(teacher_attn, name):
                setattr(self, name, getattr(teacher_attn, name))
        # the teacher's own rotary function (identical math across Llama-style families)
        self._apply_rotary = getattr(teacher_attn, "_apply_rotary", None) or sys.modules[
            type(teacher_attn).__module__].apply_rotary_pos_emb
        if config.linear:
            self.feature_map_q = make_feature_map(config.feature_map, num_heads, self.head_dim, config.feature_dim,
                                                  query=True)
            self.feature_map_k = make_feature_map(config.feature_map, num_kv_heads, self.head_dim, config.feature_dim)
        linear_and_window = config.linear and config.window is not None
        exact_part = config.window > 0 or config.sinks > 0 or config.cache > 0 if linear_and_window else False
        self.mix_logit = nn.Parameter(torch.full((num_heads,), float(config.mix_init))) if exact_part else None
        self.beta_logit = nn.Parameter(torch.zeros(num_kv_heads)) if linear_and_window and config.rule == "delta" else None
        # output normalisation (norm "rms"): the RMSNorm gain of the linear part, per head and channel
        rms = linear_and_window and config.norm == "rms"
        self.norm_gain = nn.Parameter(torch.ones(num_heads, self.head_dim)) if rms else None
        # () -> the teacher's RoPE frequencies (d/2,) or None, for a cache scored away from its own positions: read
        # from the model's rotary module when used (transformers fills that buffer in after loading the weights)
        self._rope_frequencies = rope_frequencies or (lambda: None)
        if config.cache_score == "learned":  # the fitted cache score (transfer/cache_score.py), saved with the model
            self.register_buffer("cache_scorer", torch.zeros(num_kv_heads, 2 * self.head_dim + 1))
        self.spec = self.make_spec()
        self.teacher_spec = AttentionSpec(window=None, scale=self.scaling, linear=False)  # for exact_softmax

    @property
    def rope_frequencies(self) -> torch.Tensor | None:
        return self._rope_frequencies()

    def make_spec(self) -> AttentionSpec:
        """The mode of this layer's attention calls, from its config: made once (not on every decoding step), again
        when a training-free setting changes (models.linearized.reconfigure)."""
        c = self.config
        distance = c.cache_distance
        if distance is not None and self.rope_frequencies is None:
            raise LinearizeError(f"--cache-position {c.cache_position} needs the teacher's RoPE frequencies, which "
                                 "this model's rotary module does not expose; use --cache-position own")
        if c.cache and c.cache_score == "learned" and getattr(self, "cache_scorer", None) is None:
            raise LinearizeError("this model has no fitted cache score: fit one with `linearize cache-score RUN`, or "
                                 "use --cache-score recall")
        return AttentionSpec(window=c.window, scale=self.scaling, sinks=c.sinks, rule=c.rule, linear=c.linear,
                             cache=c.cache, cache_every=c.cache_every, cache_pool=c.cache_pool,
                             memory_cap=c.memory_cap, heavy=c.heavy, cache_distance=distance,
                             cache_packed=distance is not None and c.cache_position == "packed",
                             cache_score=c.cache_score)

    @property
    def approximates_teacher(self) -> bool:
        """True where this layer differs from the teacher's full softmax: a linear part, or a DiagAttention window
        (config.local_layers); False for the teacher's own local layers and layers kept in exact softmax."""
        return self.config.linear or self.layer_idx < self.config.local_layers

    TRANSFER_PARAMETERS = ("feature_map_", "mix_logit", "beta_logit", "norm_gain")

    def trainable_transfer_parameters(self):
        """What attention transfer trains: the feature maps, the mixing factor, the delta-rule strength and the
        output normalisation's gain."""
        return [p for n, p in self.named_parameters() if n.startswith(self.TRANSFER_PARAMETERS)]

    def project(self, hidden_states, position_embeddings, projected=None) -> Streams:
        """(B, T, D) -> Streams q (B, H, T, d), k, v (B, Hkv, T, d) after the teacher's norms and RoPE, and the log
        forget gate (B, Hkv, T) (None without a gate). Use as attend(project(...)). `projected`: the outputs of
        q_proj, k_proj, v_proj on hidden_states if already computed (attention transfer reuses the teacher's)."""
        B, T, _ = hidden_states.shape
        q, k, v = projected or (self.q_proj(hidden_states), self.k_proj(hidden_states), self.v_proj(hidden_states))
        q = q.view(B, T, -1, self.head_dim)
        k = k.view(B, T, -1, self.head_dim)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        log_gate = None
        if self.config.gate == "key" and self.config.linear:  # Liger: the gate reuses the pretrained key projection
            log_gate = F.logsigmoid(k.float().mean(-1)).transpose(1, 2).to(k.dtype) / self.config.gate_norm
        cos, sin = position_embeddings
        q, k = self._apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return Streams(k=k, v=v, q=q, log_gate=log_gate)

    def key_features(self, k: torch.Tensor) -> torch.Tensor:
        """phi(k): (B, Hkv, T, d) -> (B, Hkv, T, F) (unit norm for the delta rule)."""
        fk = self.feature_map_k(k)
        return fk if self.beta_logit is None else F.normalize(fk, dim=-1)

    def mix(self, like: torch.Tensor) -> torch.Tensor:
        """(H,) weight of the softmax window vs the linear term (unused when window = 0)."""
        if self.mix_logit is None:
            return like.new_zeros(self.num_heads)
        return torch.sigmoid(self.mix_logit).to(like.dtype)

    def constants(self, like: torch.Tensor) -> LayerConstants:
        """What the attention ops read of this layer besides the tokens: the mixing factor (in like's dtype), the
        key feature map, the output normalisation's gain, the RoPE frequencies, the fitted cache score."""
        return LayerConstants(self.mix(like), self.key_features, self.norm_gain, self.rope_frequencies,
                              getattr(self, "cache_scorer", None))

    def features(self, streams: Streams, keys: bool = True) -> Streams:
        """Add what the linear part reads: fq, fk (unit norm for the delta rule; None with keys=False) and the
        delta-rule strength beta."""
        if not self.config.linear:
            return streams
        fq, fk, beta = self.feature_map_q(streams.q), self.key_features(streams.k) if keys else None, None
        if self.beta_logit is not None:  # delta rule: unit-norm features, per-head write strength
            fq = F.normalize(fq, dim=-1)
            beta = torch.sigmoid(self.beta_logit).to(streams.k.dtype)[None, :, None].expand(streams.k.shape[:3])
        return replace(streams, fq=fq, fk=fk, beta=beta)

    def attend(self, streams: Streams, state: DecodingState | None = None):
        """Streams q (B, H, T, d), k, v (B, Hkv, T, d), log_gate (B, Hkv, T) -> (B, H, T, d); with a DecodingState,
        prefill (a prompt, or its next block) or decode (one token)."""
        if self.exact_softmax and self.approximates_teacher and state is None:  # causal softmax (SDPA)
            return attention_chunked(streams, self.teacher_spec, LayerConstants(None))[0]
        step = state is not None and state[self.layer_idx] is not None and len(streams) == 1
        # a decoding step with a window needs no features of its key: they are made when the key leaves the window
        spec, layer = self.spec, self.constants(streams.q)
        if self.window_dropped and state is None and spec.memory and spec.window:
            spec = dropped_window(spec)
        streams = self.features(streams, keys=not (step and spec.window))
        if state is not None:  # one new token: recurrent step; a prompt or a block of one: chunked from the state
            # the state keeps window keys, not their features: layer.key_features recomputes them
            if step:
                y, state[self.layer_idx] = attention_recurrent(streams, spec, layer, state[self.layer_idx], True)
            else:
                y, state[self.layer_idx] = attention_chunked(streams, spec, layer, state[self.layer_idx], True,
                                                             chunk=self.config.chunk_size)
            return y
        if self.form == "quadratic":
            return attention_quadratic(streams, spec, layer)
        return attention_chunked(streams, spec, layer, chunk=self.config.chunk_size)[0]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, linear_state=None, **kwargs):
        B, T, _ = hidden_states.shape
        y = self.attend(self.project(hidden_states, position_embeddings), state=linear_state)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), None
