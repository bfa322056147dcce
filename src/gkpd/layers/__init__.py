"""Kronecker layers: drop-in replacements for ``nn.Conv1d/2d/3d``, ``nn.Linear`` and
``nn.Embedding``."""

from gkpd.counting import group_split
from gkpd.decompose import b_shape_for, check_factor_shapes, check_rank, full_rank
from gkpd.layers.base import KroneckerLayer, clear_caches
from gkpd.layers.conv import KroneckerConv1d, KroneckerConv2d, KroneckerConv3d, KroneckerConvNd
from gkpd.layers.embedding import KroneckerEmbedding
from gkpd.layers.linear import KroneckerLinear

__all__ = [
    "KroneckerConv1d",
    "KroneckerConv2d",
    "KroneckerConv3d",
    "KroneckerConvNd",
    "KroneckerEmbedding",
    "KroneckerLayer",
    "KroneckerLinear",
    "b_shape_for",
    "check_factor_shapes",
    "check_rank",
    "clear_caches",
    "full_rank",
    "group_split",
]
