"""gkpd: compress PyTorch models with the Generalized Kronecker Product Decomposition."""

from gkpd import data, export, models, runtime, train  # export imports onnx only when it writes
from gkpd.apply import apply_, compress
from gkpd.calibration import Calibration
from gkpd.decompose import KroneckerFactors, decompose, kron, kron_sum, rearrange
from gkpd.io import load, save
from gkpd.layers import (
    KroneckerConv1d,
    KroneckerConv2d,
    KroneckerConv3d,
    KroneckerEmbedding,
    KroneckerLinear,
    clear_caches,
)
from gkpd.methods import KroneckerConfig, LayerMethod, ModelMethod, register_method

# bound last: the function gkpd.plan shadows the subpackage of the same name
from gkpd.plan import CompressionPlan, LatencyObjective, LayerPlan, plan
from gkpd.report import Report, summary

__version__ = "0.1.0"

__all__ = [
    "Calibration",
    "CompressionPlan",
    "KroneckerConfig",
    "LatencyObjective",
    "LayerMethod",
    "LayerPlan",
    "ModelMethod",
    "Report",
    "apply_",
    "clear_caches",
    "compress",
    "plan",
    "KroneckerConv1d",
    "KroneckerConv2d",
    "KroneckerConv3d",
    "KroneckerEmbedding",
    "KroneckerFactors",
    "KroneckerLinear",
    "__version__",
    "data",
    "decompose",
    "export",
    "kron",
    "kron_sum",
    "load",
    "models",
    "rearrange",
    "register_method",
    "runtime",
    "save",
    "summary",
    "train",
]
