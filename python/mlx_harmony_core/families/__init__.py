"""Model families: what each family of models decides (chat format, CPU dtype, GGUF
mapping), registered by model type and GGUF architecture (see :mod:`.registry`).

Adding a family with its own chat format: one module here that builds a
:class:`~mlx_harmony_core.chat_format.ChatFormat` and calls :func:`register`, plus its
import below.
"""

from . import chat_template, gpt_oss  # noqa: F401  (each registers its families)
from .registry import (
    Family,
    chat_format_for,
    families,
    family_for,
    gguf_architectures,
    register,
    template_chat_format,
)

__all__ = [
    "Family",
    "chat_format_for",
    "families",
    "family_for",
    "gguf_architectures",
    "register",
    "template_chat_format",
]
