"""Read and check the checkpoint to convert: config, safetensors files, text and tower tensors.

Everything that can be checked before writing is checked here, so that a bad source fails before the
output folder exists: missing files, a foreign model type, a source that is already quantized,
truncated or unreadable safetensors, tensors whose shapes do not match config.json.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from ..config import ConfigError, TextConfig
from ..loading import (
    MULTIMODAL_PREFIXES,
    LoadError,
    check_shapes,
    read_config,
    read_weights,
    resolve_path,
    sanitize,
    weight_files,
)
from ..model import Model
from .errors import ConvertError

# Source files not copied to the output: rewritten ones, and weights with their indexes.
SKIPPED_FILES = ("config.json", "README.md")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Source:
    path: Path
    config: dict  # config.json as read
    text_config: TextConfig
    text: dict  # our canonical name -> lazy array (the text decoder)
    towers: dict  # vision/audio tower and projector tensors, named as mlx-vlm names them

    @property
    def multimodal(self) -> bool:
        return self.config.get("model_type") == "gemma4"

    def side_files(self) -> list[Path]:
        """Tokenizer, chat template, generation and processor configs: every file that is not weights."""
        return sorted(
            f
            for f in self.path.iterdir()
            if f.is_file()
            and not f.name.startswith(".")
            and f.name not in SKIPPED_FILES + WEIGHT_INDEXES
            and not f.name.endswith(WEIGHT_SUFFIXES)
        )


def read_source(path_or_repo: str) -> Source:
    try:
        path = resolve_path(str(path_or_repo))
        config = read_config(path)
        text_config = TextConfig.from_dict(config)
    except (LoadError, ConfigError) as error:
        raise ConvertError(f"cannot convert {path_or_repo}: {error}") from error
    if config.get("quantization") or config.get("quantization_config"):
        raise ConvertError(
            f"{path} is already quantized; convert from the unquantized (bf16/float) checkpoint instead"
        )
    try:
        files = weight_files(path)
    except LoadError as error:
        raise ConvertError(str(error)) from error
    for file in files:
        check_safetensors(file)
    text, towers = split_tensors(files, text_config)
    return Source(path, config, text_config, text, towers)


def check_safetensors(file: Path):
    """A readable header whose tensors all lie inside the file (catches truncated downloads)."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise ConvertError(f"{file} is not a valid safetensors file ({error}); download it again") from error
    if 8 + header_len + end != size:
        raise ConvertError(
            f"{file} is corrupt: its header describes {8 + header_len + end} bytes but the file has {size}; "
            "download it again"
        )


def split_tensors(files: list[Path], config: TextConfig) -> tuple[dict, dict]:
    """(text decoder tensors in our names, tower tensors); shapes checked against config.json."""
    try:
        weights, origin = read_weights(files)
    except LoadError as error:
        raise ConvertError(str(error)) from error
    towers = {}
    for name, value in weights.items():
        bare = name.removeprefix("model.")
        if bare.startswith(MULTIMODAL_PREFIXES):
            towers[bare] = value
    try:
        text, text_origin = sanitize(weights, origin, config)
        check_shapes(Model(config), text, text_origin)
    except LoadError as error:
        raise ConvertError(str(error)) from error
    return text, towers
