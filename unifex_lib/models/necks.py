"""Necks: map backbone features ``[B, D_in]`` to the embedding ``[B, embedding_dim]``.

- ``proj_layer``: Dropout(p) -> Linear(D_in -> embedding_dim).
- ``pooling``: adaptive average pooling of the D_in features down to embedding_dim
  (no weights; ``torch.nn.functional.adaptive_avg_pool1d`` bin edges).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import Registry

NECKS = Registry("neck")


class ProjLayer(nn.Module):
    """Dropout(p) -> Linear(in_features -> embedding_dim)."""

    def __init__(self, in_features: int, embedding_dim: int, dropout: float = 0.2):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features, embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.dropout(x))


class FeaturePooling(nn.Module):
    """Adaptive average pooling of the feature axis: ``[B, D_in] -> [B, embedding_dim]``."""

    def __init__(self, in_features: int, embedding_dim: int):
        super().__init__()
        if embedding_dim > in_features:
            raise ValueError(f"pooling neck cannot widen features: embedding_dim={embedding_dim} "
                             f"> in_features={in_features}; use neck 'proj_layer'")
        self.embedding_dim = embedding_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool1d(x.unsqueeze(1), self.embedding_dim).squeeze(1)


@NECKS.register("proj_layer")
def proj_layer(in_features: int, embedding_dim: int, dropout: float = 0.2) -> nn.Module:
    return ProjLayer(in_features, embedding_dim, dropout)


@NECKS.register("pooling")
def pooling(in_features: int, embedding_dim: int, dropout: float = 0.2) -> nn.Module:
    return FeaturePooling(in_features, embedding_dim)


def create_neck(name: str, in_features: int, embedding_dim: int, dropout: float = 0.2) -> nn.Module:
    """Build a registered neck (``list_necks()``): ``[B, in_features] -> [B, embedding_dim]``."""
    return NECKS.get(name)(in_features, embedding_dim, dropout)


def list_necks() -> list[str]:
    return NECKS.names()
