"""A model entry that shares another's weights: LoRA adapters on a structural copy.

mlx-lm's LoRA layers wrap the linear layer they adapt (``LoRALinear.linear``) and leave its
arrays alone, so an adapted model can hold the very arrays of the base model: the module
tree is copied (new module objects, the same ``mx.array`` objects), the copy gets the
adapters with mlx-lm's own ``load_adapters``, and only the adapters' small matrices are
new memory. The base model's modules are never touched (its outputs stay as they were).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import mlx.nn as nn
from mlx.utils import tree_flatten

from ..errors import ModelLoadError


def share_weights(value: Any) -> Any:
    """A copy of a module tree whose modules are new objects and whose arrays are the
    original's (no array is copied)."""
    if isinstance(value, nn.Module):
        clone = copy.copy(value)  # a dict subclass: the same items, its own __dict__
        for key, child in value.items():
            dict.__setitem__(clone, key, share_weights(child))
        return clone
    if isinstance(value, list):
        return [share_weights(v) for v in value]
    if isinstance(value, dict):
        return {k: share_weights(v) for k, v in value.items()}
    return value


def adapted(base: Any, adapter_path: str | os.PathLike[str], **engine_options: Any) -> Any:
    """An :class:`~mlx_harmony_core.Engine` for ``base``'s model with the LoRA adapters in
    ``adapter_path`` (mlx-lm's format), sharing ``base``'s weights; its own KV and prefix
    caches, the same chat format and limits. ``engine_options``: the Engine's (prefix
    cache sizes)."""
    from mlx_lm.tuner.utils import load_adapters

    from ..engine import Engine

    directory = Path(adapter_path)
    try:
        model = load_adapters(share_weights(base.model), str(directory))
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot apply the adapters in {directory}: {exc}") from exc
    model.eval()
    runner = base.runner
    return Engine(
        model,
        chat_format=base.chat_format,
        config=base.config,
        context_length=base.context_length,
        prefill_step_size=runner.prefill_step_size,
        cache_options=runner.cache_options,
        **engine_options,
    )


def own_bytes(model: Any, shared_with: Any = None) -> int:
    """Bytes of ``model``'s weight arrays, each counted once, leaving out those it shares
    with ``shared_with``."""
    seen = {id(a) for _, a in tree_flatten(shared_with.parameters())} if shared_with else set()
    total = 0
    for _, a in tree_flatten(model.parameters()):
        if id(a) not in seen:
            seen.add(id(a))
            total += a.nbytes
    return total
