"""mlx-gemma4: Gemma 4 on MLX (Apple silicon Metal, Linux CPU, NVIDIA CUDA)."""

from .config import ConfigError, TextConfig
from .loading import LoadError, load_model, resolve_path
from .model import Model


def load(path_or_repo: str, lazy: bool = False):
    """(model, tokenizer) for a local folder or hub id; the tokenizer is mlx-lm's `TokenizerWrapper`."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = resolve_path(str(path_or_repo))
    model = load_model(path, lazy=lazy)
    return model, load_tokenizer(path, eos_token_ids=_eos_ids(path))


def _eos_ids(path):
    import json

    ids = []
    for name in ("generation_config.json", "config.json"):
        file = path / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            if value is not None:
                ids += value if isinstance(value, list) else [value]
                break
    return sorted(set(ids)) or None


__all__ = ["ConfigError", "LoadError", "Model", "TextConfig", "load", "load_model"]
