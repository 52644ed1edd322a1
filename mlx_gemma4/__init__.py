"""mlx-gemma4: Gemma 4 on MLX (Apple silicon Metal, Linux CPU, NVIDIA CUDA)."""

import json
from pathlib import Path

from .config import ConfigError, TextConfig
from .loading import LoadError, load_model, resolve_path
from .generate import GenerationResponse, SamplingParams, generate, stream_generate
from .model import Model
from .processing import prepare_inputs
from .quantized_cache import KVQuantConfig


BUNDLED_MODEL = Path(__file__).parent / "bundled" / "gemma4-tiny"


def load(path_or_repo: str = str(BUNDLED_MODEL), lazy: bool = False):
    """(model, tokenizer) for a local folder or hub id (default: the bundled tiny model).

    The tokenizer is mlx-lm's `TokenizerWrapper`; `model.generation_defaults` holds the checkpoint's
    generation_config.json (sampling defaults, EOS ids).
    """
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = resolve_path(str(path_or_repo))
    model = load_model(path, lazy=lazy)
    defaults = _read_json(path / "generation_config.json")
    model.generation_defaults = defaults
    eos = defaults.get("eos_token_id", _read_json(path / "config.json").get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else eos
    return model, load_tokenizer(path, eos_token_ids=eos)


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.exists() else {}


__all__ = [
    "ConfigError",
    "GenerationResponse",
    "KVQuantConfig",
    "LoadError",
    "Model",
    "SamplingParams",
    "TextConfig",
    "generate",
    "load",
    "load_model",
    "prepare_inputs",
    "stream_generate",
]
