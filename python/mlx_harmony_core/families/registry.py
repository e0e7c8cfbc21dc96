"""The model-family registry: what one family of models decides, in one place.

A :class:`Family` names the mlx-lm model types and GGUF architectures it covers and says
how to talk to them (their chat format), how they run on the CPU (a dtype rule), and how a
GGUF file of theirs maps onto mlx-lm (config from metadata, tensor fix-ups, tokenizer files).
The load paths (:mod:`mlx_harmony_core.models`) ask :func:`family_for`; nothing else
branches on a model type. A family registers itself with :func:`register` when its module
is imported (:mod:`mlx_harmony_core.families` imports the built-in ones).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import mlx.core as mx

    from ..chat_format import ChatFormat

__all__ = [
    "Family",
    "MetadataGetter",
    "TokenizerLoader",
    "chat_format_for",
    "families",
    "family_for",
    "gguf_architectures",
    "register",
    "template_chat_format",
]

logger = logging.getLogger(__name__)

# A model's tokenizer (an mlx-lm ``TokenizerWrapper``), loaded only when a format needs it.
TokenizerLoader = Callable[[], Any]
# A GGUF file's metadata by architecture key (``block_count``) or full key, with a default.
MetadataGetter = Callable[..., Any]
# One GGUF tensor's MLX arrays (``""``: the weight; ``scales``/``biases`` when quantized),
# its llama.cpp name stem, the mlx-lm config and whether it is stored as floats.
TensorFixup = Callable[[str, dict[str, "mx.array"], Mapping[str, Any], bool], dict[str, "mx.array"]]


def template_chat_format(load_tokenizer: TokenizerLoader) -> ChatFormat:
    """The tokenizer's own chat template (every family without a format of its own)."""
    from ..chat_format import ChatTemplateFormat

    return ChatTemplateFormat(load_tokenizer())


@dataclass(frozen=True)
class Family:
    """Everything the code knows about one family of models.

    ``chat_format`` builds the family's :class:`~mlx_harmony_core.chat_format.ChatFormat`
    from a tokenizer loader (a family with its own vocabulary, like GPT-OSS's Harmony, need
    not call it). ``cpu_dtype``: with ``dtype="auto"`` on a CPU device, floating weights are
    cast to it (``None``: kept as stored). ``gguf_required`` are the architecture metadata
    keys a GGUF file must have beyond the common ones; ``gguf_config(get, config)`` returns
    the mlx-lm config given the common mapping; ``fix_tensor`` undoes what llama.cpp's
    converter changed in a tensor; ``write_tokenizer(directory)`` writes the family's own
    Hugging Face tokenizer files when a GGUF file is converted (``None``: built from the
    file's metadata).
    """

    name: str
    model_types: tuple[str, ...]
    gguf_architectures: tuple[str, ...] = ()
    chat_format: Callable[[TokenizerLoader], ChatFormat] = template_chat_format
    cpu_dtype: str | None = None
    gguf_required: tuple[str, ...] = ()
    gguf_config: Callable[[MetadataGetter, dict[str, Any]], dict[str, Any]] | None = None
    fix_tensor: TensorFixup | None = None
    write_tokenizer: Callable[[Path], None] | None = None

    @property
    def model_type(self) -> str:
        """The mlx-lm model type a GGUF file of this family loads as."""
        return self.model_types[0]


_BY_MODEL_TYPE: dict[str, Family] = {}
_BY_ARCH: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` the one :func:`family_for` returns for its model types and GGUF
    architectures (a later registration of the same name replaces it). Returns it."""
    if not family.model_types:
        raise ValueError(f"family {family.name!r} names no mlx-lm model type")
    for model_type in family.model_types:
        _BY_MODEL_TYPE[model_type] = family
    for arch in family.gguf_architectures:
        _BY_ARCH[arch] = family
    logger.debug("registered model family %s", family.name)
    return family


def family_for(*, model_type: str | None = None, arch: str | None = None) -> Family | None:
    """The family of an mlx-lm ``model_type`` or a GGUF ``arch`` (pass one).

    Every mlx-lm model type has one: one not registered gets a family of its own name that
    only uses the tokenizer's chat template. A GGUF architecture not registered has none
    (``None``): its names and metadata are not mapped.
    """
    if (model_type is None) == (arch is None):
        raise TypeError("family_for() takes model_type or arch, one of them")
    if arch is not None:
        return _BY_ARCH.get(arch)
    assert model_type is not None
    return _BY_MODEL_TYPE.get(model_type) or Family(name=model_type, model_types=(model_type,))


def families() -> list[Family]:
    """The registered families, each once, in registration order."""
    return list({id(f): f for f in _BY_MODEL_TYPE.values()}.values())


def gguf_architectures() -> dict[str, str]:
    """GGUF architecture -> the mlx-lm model type it loads as (the architectures we map)."""
    return {arch: family.model_type for arch, family in _BY_ARCH.items()}


def chat_format_for(model_type: str, load_tokenizer: TokenizerLoader) -> ChatFormat:
    """The one place a model picks its chat format: its family's (Harmony for GPT-OSS, the
    tokenizer's chat template for the rest), whether it loaded from a directory or a GGUF
    file (``load_tokenizer`` reads the tokenizer from where the model came from)."""
    family = family_for(model_type=model_type)
    assert family is not None
    return family.chat_format(load_tokenizer)
