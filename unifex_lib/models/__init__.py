"""Model zoo: backbones (timm / open_clip families), necks, margin heads, PartialFC, the embedding model."""
from .backbones import Backbone, create_backbone, list_backbones
from .embedding import EmbeddingModel, create_model
from .heads import MarginHead, TripletHead, create_head, list_heads
from .necks import create_neck, list_necks
from .partial_fc import PartialFC
from .sampler import PKBatchSampler

__all__ = ["Backbone", "EmbeddingModel", "MarginHead", "PKBatchSampler", "PartialFC", "TripletHead",
           "create_backbone", "create_head", "create_model", "create_neck", "list_backbones", "list_heads",
           "list_necks"]
