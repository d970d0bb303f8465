"""Learnable feature maps phi: R^d -> R^F_+ that make phi(q) . phi(k) mimic exp(q . k / sqrt(d)).

Each map holds one weight per head. Input x: (B, H, T, d); output: (B, H, T, F). `query`: the map is built for
the queries (True) or the keys; only the norm-aware map treats them differently.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Base: a per-head projection x @ W_h + b_h, identity-initialised so training starts from the teacher's
    own q/k geometry. Subclasses say what follows the projection."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, query: bool = False):
        super().__init__()
        feature_dim = feature_dim or head_dim
        self.weight = nn.Parameter(torch.eye(head_dim, feature_dim).repeat(num_heads, 1, 1))  # (H, d, F)
        self.bias = nn.Parameter(torch.zeros(num_heads, 1, feature_dim))  # (H, 1, F)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, T, d) -> (B, H, T, F)"""
        return x @ self.weight.to(x.dtype) + self.bias.to(x.dtype)


class HedgehogMap(FeatureMap):
    """Hedgehog (Zhang et al. 2024): phi(x) = [softmax(xW) || softmax(-xW)] over the feature dimension.
    Non-negative, sums to 2, so phi(q).phi(k) lies in (0, 2]; output dim 2F."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x).float()
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1).to(x.dtype)

    @staticmethod
    def output_dim(feature_dim: int) -> int:
        return 2 * feature_dim


class T2RMap(FeatureMap):
    """T2R (Kasai et al. 2021): phi(x) = ReLU(xW + b). A simple learnable baseline; output dim F."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.project(x))

    @staticmethod
    def output_dim(feature_dim: int) -> int:
        return feature_dim


class EluMap(nn.Module):
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020; TransNormer's kernel): no parameters; output dim d."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, query: bool = False):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1

    @staticmethod
    def output_dim(feature_dim: int) -> int:
        return feature_dim


def _sign_split(x: torch.Tensor) -> torch.Tensor:
    """[relu(x), relu(-x)]: non-negative and norm-preserving (||split(x)|| = ||x||); split(a) . split(b) keeps the
    products of same-sign components only, so a dimension where a and b point opposite ways adds nothing."""
    return torch.cat([F.relu(x), F.relu(-x)], dim=-1)


class NormAwareMap(FeatureMap):
    """Norm-aware map after NaLaFormer (Meng et al. 2025, arXiv 2506.21137, and its official code): z = xW + b is
    split into its norm ||z|| and direction u = z / ||z||, and the direction goes through the norm-preserving,
    non-negative sign split [relu(u), relu(-u)] (a cosine similarity that drops opposite-sign dimensions):

        query:  phi(z) = split(u) ** p,  p = 3 (1/2 + tanh(g_h ||z||))     (spikier for larger query norms)
        key:    phi(z) = ||z|| split(u) ** 3                               (the key norm is kept)

    The power range p in [1.5, 4.5) and the key's cube are the paper's; g_h = exp(log_gain_h) > 0 is our
    learnable per-head scale of the query norm (the paper has g = 1 on its own trained queries; a pretrained
    teacher's query norms are larger), initialised to 1 / sqrt(d). The paper's key keeps its norm cubed (z ** 3);
    here it enters linearly, so the memory's scale follows the keys' as in softmax's exponent. Output dim 2F."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None, query: bool = False):
        super().__init__(num_heads, head_dim, feature_dim)
        self.query = query
        if query:
            self.log_gain = nn.Parameter(torch.full((num_heads, 1, 1), -0.5 * math.log(head_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.project(x)
        z = z.to(torch.promote_types(z.dtype, torch.float32))  # bfloat16 in: the powers in float32
        norm = z.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        split = _sign_split(z / norm)
        if self.query:
            power = 3 * (0.5 + torch.tanh(self.log_gain.exp() * norm))
            return split.pow(power).to(x.dtype)
        return (norm * split.pow(3)).to(x.dtype)

    @staticmethod
    def output_dim(feature_dim: int) -> int:
        return 2 * feature_dim


FEATURE_MAPS = {"hedgehog": HedgehogMap, "t2r": T2RMap, "elu": EluMap, "nala": NormAwareMap}


def make_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int | None = None,
                     query: bool = False) -> nn.Module:
    if name not in FEATURE_MAPS:
        from ..errors import LinearizeError

        raise LinearizeError(f"unknown feature map {name!r}; choose one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim, query)
