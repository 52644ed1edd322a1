"""Gemma 4 checkpoints (Hugging Face or MLX) -> MLX checkpoints, quantized by documented recipes.

`convert(hf_path, mlx_path, ...)` is the Python form of the `mlx_gemma4.convert` command; see
convert/README.md for the output layout, the recipes and the quality report.
"""

from .errors import ConvertError
from .pipeline import convert
from .recipes import MIXED as RECIPES

__all__ = ["ConvertError", "RECIPES", "convert"]
