"""Small, readable model definitions."""
from fanin.models.cnn import cnn
from fanin.models.mlp import mlp

__all__ = ["mlp", "cnn"]
