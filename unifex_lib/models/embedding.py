"""The embedding model: backbone -> neck -> L2 normalisation, ``[B,3,H,W] -> [B, D]`` float32."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import Backbone, create_backbone, param_counts
from .necks import create_neck


class EmbeddingModel(nn.Module):
    """``forward(images [B,3,H,W] normalised) -> [B, embedding_dim]`` L2-normalised float32.

    ``embed_features(features [B, num_features])`` runs only neck + normalisation (training on cached
    backbone features). Attributes: ``embedding_dim``, ``data_config`` (the backbone's), ``backbone``, ``neck``.
    """

    def __init__(self, backbone: Backbone, neck: nn.Module, embedding_dim: Optional[int] = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        if embedding_dim is None:
            with torch.no_grad():
                embedding_dim = neck.eval()(torch.zeros(1, backbone.num_features)).shape[1]
        self.embedding_dim = int(embedding_dim)
        self.data_config = backbone.data_config

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(features).float(), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_features(self.backbone(images))

    def param_counts(self) -> dict:
        """{"total": int, "trainable": int} over backbone and neck."""
        return param_counts(self)


def create_model(model_params, image_size: Optional[int] = None) -> EmbeddingModel:
    """Build the embedding model from :class:`unifex_lib.params.ModelParams` (``image_size`` overrides the
    backbone's own input size)."""
    p = model_params
    backbone = create_backbone(p.backbone_type, p.backbone, pretrained=p.pretrained, feature=p.feature,
                               image_size=image_size, freeze=p.freeze)
    neck = create_neck(p.neck, backbone.num_features, p.embedding_dim, dropout=p.dropout)
    return EmbeddingModel(backbone, neck, p.embedding_dim)
