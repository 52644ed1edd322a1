"""mlx_gemma4.server: an OpenAI-compatible HTTP server (`python -m mlx_gemma4.server --model PATH`)."""

from .app import create_app

__all__ = ["create_app"]
