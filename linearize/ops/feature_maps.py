"""Learnable feature maps phi: R^d -> R^F_+ that make phi(q) . phi(k) mimic exp(q . k / sqrt(d)).

Each map holds one weight per head. Input x: (B, H, T, d); output: (B, H, T, F).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureMap(nn.Module):
    """Base: a per-head projection x @ W_h + b_h, identity-initialised so training starts from the teacher's
    own q/k geometry. Subclasses say what follows the projection."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
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
    """phi(x) = elu(x) + 1 (Katharopoulos et al. 2020): no parameters; output dim d."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.elu(x) + 1

    @staticmethod
    def output_dim(feature_dim: int) -> int:
        return feature_dim


FEATURE_MAPS = {"hedgehog": HedgehogMap, "t2r": T2RMap, "elu": EluMap}


def make_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int | None = None) -> nn.Module:
    if name not in FEATURE_MAPS:
        from ..errors import LinearizeError

        raise LinearizeError(f"unknown feature map {name!r}; choose one of {sorted(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](num_heads, head_dim, feature_dim)
