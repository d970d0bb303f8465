"""LinearAttention: the drop-in replacement for a teacher's softmax attention module.

It keeps the teacher's q/k/v/o projections (same parameter names, so checkpoints and LoRA target names line
up) and rotary embedding, and adds a learnable feature map for queries and keys plus, for the hybrid variant,
a per-head mixing factor. Every variant (Hedgehog, T2R, ELU; window 0 or > 0) is a LinearAttentionConfig.
"""

import sys
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..errors import LinearizeError
from ..ops import hybrid_attention as ops
from ..ops.feature_maps import FEATURE_MAPS, make_feature_map


@dataclass
class LinearAttentionConfig:
    """One attention mechanism, many configurations.
    feature_map: "hedgehog" | "t2r" | "elu"; feature_dim: projection width (default head_dim);
    window: softmax sliding window (0 = pure linear); chunk_size: block length of the chunked form."""

    feature_map: str = "hedgehog"
    feature_dim: int | None = None
    window: int = 64
    chunk_size: int = 64

    def __post_init__(self):
        if self.feature_map not in FEATURE_MAPS:
            raise LinearizeError(f"unknown feature map {self.feature_map!r}; choose one of {sorted(FEATURE_MAPS)}")
        if self.window < 0 or self.chunk_size < 1:
            raise LinearizeError(f"window must be >= 0 and chunk_size >= 1 (got {self.window}, {self.chunk_size})")

    def to_dict(self) -> dict:
        return asdict(self)


# Named presets for `--attention NAME`.
ATTENTION_PRESETS: dict[str, LinearAttentionConfig] = {
    "lolcats": LinearAttentionConfig(feature_map="hedgehog", window=64),
    "hedgehog": LinearAttentionConfig(feature_map="hedgehog", window=0),
    "t2r": LinearAttentionConfig(feature_map="t2r", window=0),
    "elu": LinearAttentionConfig(feature_map="elu", window=0),
}


def attention_preset(name: str, **overrides) -> LinearAttentionConfig:
    if name not in ATTENTION_PRESETS:
        raise LinearizeError(f"unknown attention {name!r}; choose one of {sorted(ATTENTION_PRESETS)}")
    cfg = asdict(ATTENTION_PRESETS[name])
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    return LinearAttentionConfig(**cfg)


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

    def __init__(self, teacher_attn: nn.Module, config: LinearAttentionConfig, num_heads: int, num_kv_heads: int):
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
        self._apply_rotary = sys.modules[type(teacher_attn).__module__].apply_rotary_pos_emb
        self.feature_map_q = make_feature_map(config.feature_map, num_heads, self.head_dim, config.feature_dim)
        self.feature_map_k = make_feature_map(config.feature_map, num_kv_heads, self.head_dim, config.feature_dim)
        self.mix_logit = nn.Parameter(torch.zeros(num_heads)) if config.window > 0 else None

    def trainable_transfer_parameters(self):
        """What attention transfer trains: the feature maps and the mixing factor."""
        return [p for n, p in self.named_parameters() if n.startswith(("feature_map_", "mix_logit"))]

    def project(self, hidden_states, position_embeddings):
        """(B, T, D) -> q (B, H, T, d), k, v (B, Hkv, T, d), after the teacher's norms and RoPE."""
        B, T, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = position_embeddings
        q, k = self._apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        return q, k, v

    def mix(self, like: torch.Tensor) -> torch.Tensor:
        """(H,) weight of the softmax window vs the linear term (unused when window = 0)."""
        if self.mix_logit is None:
            return like.new_zeros(self.num_heads)
        return torch.sigmoid(self.mix_logit).to(like.dtype)

    def attend(self, q, k, v, state: DecodingState | None = None):
        """q (B, H, T, d), k, v (B, Hkv, T, d) -> (B, H, T, d); with a DecodingState, prefill or decode."""
        fq, fk = self.feature_map_q(q), self.feature_map_k(k)
        args = (q, k, v, fq, fk, self.mix(q), self.config.window, self.scaling)
        if state is not None:
            if state[self.layer_idx] is None:
                y, state[self.layer_idx] = ops.attention_chunked(*args, chunk=self.config.chunk_size, return_state=True)
                return y
            return ops.attention_recurrent(*args, state=state[self.layer_idx])
        if self.form == "quadratic":
            return ops.attention_quadratic(*args)
        return ops.attention_chunked(*args, chunk=self.config.chunk_size)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, linear_state=None, **kwargs):
        B, T, _ = hidden_states.shape
        q, k, v = self.project(hidden_states, position_embeddings)
        y = self.attend(q, k, v, linear_state)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), None
