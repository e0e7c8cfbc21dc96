"""Moved: the load path to :mod:`mlx_harmony_core.models.load`, test models to
:mod:`mlx_harmony_core.models.builder` (``gpt_oss_config`` is
:func:`mlx_harmony_core.families.gpt_oss.config`). This module re-exports their public
names for one release."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .models.builder import (
    DEMO_NAME,
    PRESETS,
    QUANTIZATIONS,
    TEST_MODEL_VERSION,
    demo_model_path,
    gpt_oss_config,
    make_test_model,
)
from .models.load import directory_tokenizer, is_gguf, load, load_model, read_config, resolve_path

if TYPE_CHECKING:
    from .chat_format import ChatFormat

__all__ = [
    "DEMO_NAME",
    "PRESETS",
    "QUANTIZATIONS",
    "TEST_MODEL_VERSION",
    "chat_format_for",
    "demo_model_path",
    "directory_tokenizer",
    "gpt_oss_config",
    "is_gguf",
    "load",
    "load_model",
    "make_test_model",
    "read_config",
    "resolve_path",
]


def chat_format_for(config: dict[str, Any], directory: Path) -> ChatFormat:
    """Deprecated: :func:`mlx_harmony_core.families.chat_format_for` with the model type and
    a tokenizer loader."""
    from .families import chat_format_for as family_format

    return family_format(config["model_type"], partial(directory_tokenizer, directory))
