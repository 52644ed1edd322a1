"""`mlx_gemma4.convert` command line (also `python -m mlx_gemma4.convert`)."""

import argparse
import sys

from ..config import ConfigError
from ..loading import LoadError
from .errors import ConvertError
from .pipeline import DTYPES, convert
from .recipes import AFFINE_BITS, AFFINE_GROUPS, MIXED, MODES


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlx_gemma4.convert",
        description="Convert a Gemma 4 checkpoint (Hugging Face or MLX) to an MLX checkpoint, optionally quantized.",
    )
    p.add_argument("--hf-path", "--model", required=True, help="hub id (owner/name) or local folder")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the text decoder")
    p.add_argument("--q-bits", type=int, help=f"bits per weight (affine: {AFFINE_BITS}; default per mode)")
    p.add_argument("--q-group-size", type=int, help=f"group size (affine: {AFFINE_GROUPS}; default per mode)")
    p.add_argument("--q-mode", default="affine", choices=list(MODES), help="quantization mode (default affine)")
    p.add_argument("--quant-recipe", choices=list(MIXED), help="mixed-bit recipe (implies -q; affine)")
    p.add_argument("--dtype", choices=DTYPES, help="dtype of unquantized tensors (default: the source's)")
    p.add_argument("--upload-repo", help="hub repo to upload the result to")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--report", action="store_true", help="print KL divergence and top-1 agreement vs the source")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        convert(**vars(args))
    except (ConvertError, LoadError, ConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
