"""``serve`` with several models: the specs from ``-m NAME=PATH`` flags and ``--models-file``,
checked at startup (a bad entry is a clear error and a nonzero exit), and the
:class:`~mlx_harmony_core.server.pool.ModelPool` that serves them."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..server.model_specs import ModelSpec, check_specs, parse_model_flag, read_models_file

logger = logging.getLogger(__name__)


def model_specs(args: argparse.Namespace, values: dict[str, Any]) -> list[ModelSpec]:
    """The models to serve: ``-m`` flags first (the first is the default), then the models
    file's entries; ``demo`` when neither is given. Raises ``ValueError`` naming the entry."""
    specs = [parse_model_flag(m) for m in args.model or []]
    if values.get("models_file"):
        specs += read_models_file(values["models_file"])
    if not specs:
        specs = [ModelSpec(name="demo", path="demo")]
    check_specs(specs)
    return specs


def several(specs: list[ModelSpec], values: dict[str, Any]) -> bool:
    """Whether to serve through a model pool (more than one model, or a models file)."""
    return len(specs) > 1 or bool(values.get("models_file"))


def build_pool(args: argparse.Namespace, specs: list[ModelSpec], options: Any) -> Any:
    """The pool for ``specs`` (``--preload``: every model loaded now)."""
    from ..server.pool import ModelPool
    from .common import cache_options

    if args.group is not None:
        raise ValueError("--distributed serves one model; drop the extra -m / --models-file")
    if getattr(args, "adapter_path", None):
        raise ValueError(
            "--adapter-path applies to one model; with several, give each entry its own "
            "adapter_path in --models-file (or an entry with base + adapter_path)"
        )
    if args.model_name:
        raise ValueError("--model-name names one model; with several, use -m NAME=PATH")
    if args.speculative == "draft":
        raise ValueError("--speculative draft needs one model (its draft's tokenizer)")
    defaults = {"dequantize": args.dequantize, "cache_options": cache_options(args)}
    pool = ModelPool(specs, options, load_defaults=defaults)
    for s in specs:
        where = s.path or f"{s.base} + {Path(s.adapter_path or '').name}"
        logger.info("model %r: %s", s.name, where)
    if not options.lazy_load:
        pool.preload()
    return pool
