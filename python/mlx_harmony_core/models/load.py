"""The production load path: an mlx-lm model directory, a GGUF file or "demo" -> a model
(cast by its family's dtype rule, its layers switched to our CPU kernels) and an Engine with
its family's chat format."""

from __future__ import annotations

import json
import logging
import os
import time
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from ..cpu.layers import use_cpu_layers
from ..errors import ModelLoadError
from ..families import chat_format_for, family_for
from ..progress import BIG_FILE, ProgressBar
from .builder import DEMO_NAME, demo_model_path

if TYPE_CHECKING:
    import mlx.nn as nn

    from ..distributed import Group
    from ..engine import Engine

__all__ = ["is_gguf", "load", "load_model", "read_config", "resolve_path"]

logger = logging.getLogger(__name__)


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a model directory, with errors that say what is wrong."""
    if not path.exists():
        raise ModelLoadError(f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError(f"{path} is a file; pass the model's directory (with config.json)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path} has no config.json: it is not an mlx-lm model directory")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{cfg_path} is not valid JSON ({exc}); fix or re-download it"
        ) from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{cfg_path} must hold a JSON object")
    if not isinstance(config.get("model_type"), str):
        raise ModelLoadError(f"{cfg_path} has no 'model_type'; it is not an mlx-lm model config")
    return config


def resolve_path(path_or_name: str | os.PathLike[str]) -> Path:
    """A local model directory for ``path_or_name``: "demo", a path, or a Hugging Face repo id."""
    if str(path_or_name) == DEMO_NAME:
        return demo_model_path()
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        try:
            from mlx_lm.utils import hf_repo_to_path

            return Path(hf_repo_to_path(name))
        except Exception as exc:
            raise ModelLoadError(
                f"{name!r} is not a local directory and could not be fetched from the "
                f"Hugging Face Hub ({type(exc).__name__}: {exc}). Pass a local model directory "
                "or 'demo'."
            ) from exc
    raise ModelLoadError(f"model directory {path} does not exist (or pass 'demo')")


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: str = "auto",
    dequantize: bool = False,
    group: Group | None = None,
    adapter_path: str | os.PathLike[str] | None = None,
) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load an mlx-lm model through mlx-lm's own classes (a directory, or a ``.gguf`` file:
    ``dequantize`` applies to it). Returns (model, config, directory or file).

    With a distributed ``group`` of more than one rank, this rank loads only its shard:
    tensor parallel through the model's ``shard()``, else pipeline parallel through its
    ``model.pipeline()`` (the weights are read lazily, so the rest is never resident).

    ``dtype="auto"`` keeps the checkpoint's dtype except where MLX's CPU backend cannot run it:
    GPT-OSS's expert gather-matmul rejects bfloat16 on the CPU, so those weights become float32.

    ``adapter_path``: LoRA adapters in mlx-lm's format (``adapter_config.json`` and
    ``adapters.safetensors``), applied with mlx-lm's own ``load_adapters``, as
    ``mlx_lm.load(path, adapter_path=...)`` does.
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    sharded = group is not None and group.size > 1
    if is_gguf(path):
        if adapter_path is not None:
            raise ModelLoadError(
                "LoRA adapters apply to model directories; convert the GGUF file first "
                "(mlx-harmony-core convert FILE.gguf DIR)"
            )
        if sharded:
            raise ModelLoadError(
                "a GGUF file does not load sharded; convert it first "
                "(mlx-harmony-core convert FILE.gguf DIR) and load DIR"
            )
        model, config, header = _load_gguf(path, dtype, dequantize)
        return model, config, header.path
    directory = resolve_path(path)
    config = read_config(directory)
    if not any(directory.glob("model*.safetensors")):
        raise ModelLoadError(f"{directory} has no model*.safetensors weights")
    try:
        model, config = mlx_lm_load_model(directory, lazy=True)
        if adapter_path is not None:
            if sharded:
                raise ModelLoadError("LoRA adapters do not load on a distributed group yet")
            model = _adapters(model, adapter_path)
        if not sharded:
            _evaluate(model, directory.name)
        if sharded:
            assert group is not None
            _shard(model, config, group)
    except ValueError as exc:
        raise ModelLoadError(f"cannot load {directory}: {exc}") from exc
    except (ImportError, ModuleNotFoundError) as exc:
        raise ModelLoadError(
            f"model_type {config['model_type']!r} in {directory} is not supported by mlx-lm ({exc})"
        ) from exc
    _cast(model, config, dtype)
    use_cpu_layers(model)
    return model, config, directory


def _adapters(model: nn.Module, adapter_path: str | os.PathLike[str]) -> nn.Module:
    """``model`` with the LoRA adapters in ``adapter_path`` (mlx-lm's ``load_adapters``)."""
    from mlx_lm.tuner.utils import load_adapters

    directory = Path(adapter_path)
    missing = [
        f for f in ("adapter_config.json", "adapters.safetensors") if not (directory / f).is_file()
    ]
    if missing:
        raise ModelLoadError(f"{directory} has no {' or '.join(missing)} (mlx-lm's adapter format)")
    model = load_adapters(model, str(directory))
    model.eval()
    return model


def _evaluate(model: nn.Module, name: str) -> None:
    """Read the lazily loaded weights in, one array at a time, with progress (big models)."""
    from mlx.utils import tree_flatten

    arrays = [a for _, a in tree_flatten(model.parameters())]
    with ProgressBar(sum(a.nbytes for a in arrays), f"loading {name}", min_total=BIG_FILE) as bar:
        for a in arrays:
            mx.eval(a)
            bar.update(a.nbytes)


def _shard(model: nn.Module, config: dict[str, Any], group: Group) -> None:
    """Keep this rank's shard of ``model`` (then read only that from disk)."""
    if hasattr(model, "shard"):
        model.shard(group.group)
        from ..distributed import shard_vocab

        shard_vocab(model, group.group)  # mlx-lm keeps these whole: most of a small model
    elif hasattr(getattr(model, "model", None), "pipeline"):
        model.model.pipeline(group.group)
    else:
        raise ModelLoadError(
            f"mlx-lm's {config.get('model_type')!r} model has neither tensor (shard()) nor "
            "pipeline parallelism; it cannot run over a distributed group"
        )
    mx.eval(model.parameters())
    group.barrier()


def _load_gguf(path: str | os.PathLike[str], dtype: str, dequantize: bool) -> tuple[Any, ...]:
    from .gguf import load_gguf

    model, config, header = load_gguf(Path(path).expanduser(), dequantize=dequantize)
    _cast(model, config, dtype)
    use_cpu_layers(model)
    return model, config, header


def _cast(model: nn.Module, config: dict[str, Any], dtype: str) -> None:
    from mlx.utils import tree_flatten

    if dtype == "auto":
        family = family_for(model_type=str(config.get("model_type")))
        if mx.default_device() != mx.cpu or family is None or family.cpu_dtype is None:
            return
        target = getattr(mx, family.cpu_dtype)
    else:
        try:
            target = getattr(mx, dtype)
        except AttributeError:
            raise ValueError(
                f"unknown dtype {dtype!r}; use 'auto', 'float32', 'float16' or 'bfloat16'"
            ) from None
    params = tree_flatten(model.parameters())
    cast = {
        k: v.astype(target)
        for k, v in params
        if mx.issubdtype(v.dtype, mx.floating) and v.dtype != target
    }
    if cast:
        logger.info("casting %d weight arrays to %s", len(cast), target)
        model.load_weights(list(cast.items()), strict=False)
        mx.eval(model.parameters())


def load(
    path_or_name: str | os.PathLike[str] = DEMO_NAME,
    *,
    dtype: str = "auto",
    dequantize: bool = False,
    adapter_path: str | os.PathLike[str] | None = None,
    **engine_options: Any,
) -> Engine:
    """Load a model directory, a ``.gguf`` file (or "demo") and return an :class:`Engine`.

    A GGUF file loads directly (see :mod:`.gguf`): its quantized tensors stay quantized
    unless ``dequantize=True`` (float32: faster on the CPU today, more memory).

    The model's family picks its chat format (:func:`~mlx_harmony_core.families.chat_format_for`):
    GPT-OSS models use the Harmony encoding; other models use their own tokenizer and chat
    template (from the directory, with mlx-lm, or from the GGUF file's metadata).

    ``adapter_path``: LoRA adapters in mlx-lm's format for a model directory (see
    :func:`load_model`).
    """
    from ..engine import Engine

    start = time.perf_counter()
    if is_gguf(path_or_name):
        from .gguf_tokenizer import gguf_tokenizer_wrapper

        if adapter_path is not None:
            raise ModelLoadError(
                "LoRA adapters apply to model directories; convert the GGUF file first "
                "(mlx-harmony-core convert FILE.gguf DIR)"
            )

        group = engine_options.get("group")
        if group is not None and group.size > 1:
            raise ModelLoadError(
                "a GGUF file does not load sharded; convert it first "
                "(mlx-harmony-core convert FILE.gguf DIR) and load DIR"
            )
        model, config, header = _load_gguf(path_or_name, dtype, dequantize)
        load_tokenizer = partial(gguf_tokenizer_wrapper, header)
    else:
        model, config, directory = load_model(
            path_or_name,
            dtype=dtype,
            group=engine_options.get("group"),
            adapter_path=adapter_path,
        )
        load_tokenizer = partial(directory_tokenizer, directory)
    chat_format = chat_format_for(config["model_type"], load_tokenizer)
    engine = Engine(model, chat_format=chat_format, config=config, **engine_options)
    engine.load_seconds = time.perf_counter() - start  # (``/metrics``)
    return engine


def is_gguf(path_or_name: str | os.PathLike[str]) -> bool:
    """True for a GGUF file's path (by its name: it need not exist yet)."""
    return str(path_or_name).lower().endswith(".gguf")


def directory_tokenizer(directory: Path) -> Any:
    """A model directory's tokenizer, loaded with mlx-lm (a ``TokenizerWrapper``)."""
    from mlx_lm.utils import load_tokenizer

    try:
        return load_tokenizer(directory)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {directory}: {exc}") from exc
