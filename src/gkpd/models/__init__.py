"""Model zoo: ``create(name, **kwargs)``, ``list_models()``, ``load_pretrained(name)``."""

from gkpd.models import (
    i3d,  # noqa: F401  (registers its models)
    mobilenetv2,  # noqa: F401  (registers its models)
    resnet,  # noqa: F401  (registers its models)
    resnet_cifar,  # noqa: F401  (registers its models)
    se_resnet,  # noqa: F401  (registers its models)
)
from gkpd.models.minilm import load_minilm, minilm_path, minilm_tokenizer
from gkpd.models.pretrained import load_pretrained, load_trained, pretrained_names, save_trained
from gkpd.models.registry import canonical_name, create, list_models

__all__ = [
    "canonical_name",
    "create",
    "list_models",
    "load_minilm",
    "load_pretrained",
    "load_trained",
    "minilm_path",
    "minilm_tokenizer",
    "pretrained_names",
    "save_trained",
]
