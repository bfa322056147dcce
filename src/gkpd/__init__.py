"""gkpd: compress PyTorch models with the Generalized Kronecker Product Decomposition."""

from gkpd import data, models, train

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "data",
    "models",
    "train",
]
