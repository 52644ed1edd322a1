from .text import Model

__all__ = ["Model"]
