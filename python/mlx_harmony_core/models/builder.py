"""Random-weight GPT-OSS test models: presets, quantized like mlx-lm's converter, written
as a model directory with the Harmony tokenizer files; the demo model, built on first use."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .._paths import atomic_write_text, home, public_mode
from ..families.gpt_oss import config as gpt_oss_config
from ..families.gpt_oss import write_hf_tokenizer
from ..progress import ProgressBar

if TYPE_CHECKING:
    import mlx.nn as nn

__all__ = [
    "DEMO_NAME",
    "PRESETS",
    "QUANTIZATIONS",
    "TEST_MODEL_VERSION",
    "demo_model_path",
    "gpt_oss_config",
    "make_test_model",
]

logger = logging.getLogger(__name__)

DEMO_NAME = "demo"
# Bumped whenever a preset or the weight recipe changes, so cached demo models are rebuilt.
TEST_MODEL_VERSION = 2

# Random-weight GPT-OSS shapes: "demo" is overhead-bound (tiny), "small" ~0.24B and
# "mid" ~0.84B parameters are bandwidth-bound, like a real checkpoint on this machine.
PRESETS: dict[str, dict[str, int]] = {
    "demo": dict(
        layers=2,
        hidden_size=64,
        intermediate_size=64,
        heads=4,
        kv_heads=2,
        head_dim=16,
        experts=4,
        experts_per_token=2,
    ),
    "small": dict(
        layers=4,
        hidden_size=512,
        intermediate_size=512,
        heads=8,
        kv_heads=2,
        head_dim=64,
        experts=8,
        experts_per_token=2,
    ),
    "mid": dict(
        layers=8,
        hidden_size=1024,
        intermediate_size=1024,
        heads=16,
        kv_heads=4,
        head_dim=64,
        experts=16,
        experts_per_token=4,
    ),
    # The released gpt-oss-20b's shapes (21B parameters): build it quantized
    # (--quantize mxfp4-q8: ~13 GB), on demand; written layer by layer.
    "gpt-oss-20b": dict(
        layers=24,
        hidden_size=2880,
        intermediate_size=2880,
        heads=64,
        kv_heads=8,
        head_dim=64,
        experts=32,
        experts_per_token=4,
    ),
}

# make-test-model --quantize: affine 4- or 8-bit everywhere (the router 8-bit, as mlx-lm
# converts GPT-OSS); MXFP4 experts with the rest in float, as the released checkpoints; or
# MXFP4 experts with the rest affine 8-bit, as mlx-community's GPT-OSS conversions.
QUANTIZATIONS = ("4", "8", "mxfp4", "mxfp4-q8")


def _quantize(
    model: nn.Module, config: dict[str, Any], quantize: str, group_size: int | None
) -> None:
    """Quantize ``model`` in place the way mlx-lm's converter does; records it in ``config``."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import SwitchLinear

    if quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    mxfp4 = {"group_size": 32, "bits": 4, "mode": "mxfp4"}
    if quantize == "mxfp4":
        if group_size not in (None, 32):
            raise ValueError("MXFP4 uses groups of 32; leave group_size unset")
        params: dict[str, Any] = dict(mxfp4)
    elif quantize == "mxfp4-q8":
        params = {"group_size": group_size or 64, "bits": 8, "mode": "affine"}
    else:
        params = {"group_size": group_size or 64, "bits": int(quantize), "mode": "affine"}
    if params["group_size"] not in (32, 64, 128):
        raise ValueError(f"group_size must be 32, 64 or 128, got {params['group_size']}")
    quantization: dict[str, Any] = dict(params)
    layer_rule = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: nn.Module) -> bool | dict[str, Any]:
        if not hasattr(module, "to_quantized"):
            return False
        if quantize == "mxfp4":
            return isinstance(module, SwitchLinear)
        if quantize == "mxfp4-q8" and isinstance(module, SwitchLinear):
            quantization[path] = dict(mxfp4)
            return dict(mxfp4)
        if module.weight.shape[-1] % params["group_size"]:
            raise ValueError(
                f"{path}: input width {module.weight.shape[-1]} is not a multiple of "
                f"group_size {params['group_size']}; choose another --group-size"
            )
        rule = layer_rule(path, module) if layer_rule else True
        if isinstance(rule, dict):
            quantization[path] = {**params, **rule}
        return rule

    floats = {
        p: (m.weight.shape, isinstance(m, nn.Embedding))
        for p, m in model.named_modules()
        if hasattr(m, "to_quantized")
    }
    nn.quantize(
        model, params["group_size"], params["bits"], mode=params["mode"], class_predicate=predicate
    )
    # Big layers (gpt-oss-20b's shapes) get their random weights drawn and quantized a slice
    # at a time, evaluated at once: the float model never exists (it would take 84 GB).
    for path, module in model.named_modules():
        shape, embedding = floats.get(path, ((0,), False))
        if hasattr(module, "scales") and 4 * math.prod(shape) > 2**28:
            qs = _random_quantized(shape, embedding, path.endswith("lm_head"), module)
            module.weight, module.scales = qs[0], qs[1]
            if len(qs) > 2:
                module.biases = qs[2]
    config["quantization"] = quantization
    config["quantization_config"] = quantization  # the key Hugging Face tools read


def _random_quantized(
    shape: tuple[int, ...], embedding: bool, head: bool, module: Any
) -> list[mx.array]:
    """Random weights of ``shape`` as mlx-lm initializes them (normal for an embedding,
    uniform elsewhere; the output head 4x sharper, as the test models), quantized like
    ``module``, ~64 MB of floats at a time."""
    rows = shape[0]
    step = max(1, (2**26 * rows) // (4 * math.prod(shape)))
    scale = math.sqrt(1 / shape[-1])
    if module.mode == "mxfp4":
        # Random FP4 codes (their values have std ~2.93) and E8M0 scales near the std of the
        # uniform init: MLX's CPU MXFP4 quantizer would take ~30 min for gpt-oss-20b's experts.
        import numpy as np

        rng = np.random.default_rng(int(mx.random.randint(0, 2**31 - 1, ()).item()))
        exponent = 127 + round(math.log2(scale / math.sqrt(3) / 2.93))
        words = rng.integers(0, 2**32, (*shape[:-1], shape[-1] // 8), dtype=np.uint32)
        scales = rng.integers(exponent - 1, exponent + 2, (*shape[:-1], shape[-1] // 32))
        return [mx.array(words), mx.array(scales.astype(np.uint8))]
    parts = []
    for i in range(0, rows, step):
        part_shape = (min(step, rows - i), *shape[1:])
        if embedding:
            w = mx.random.normal(part_shape, scale=scale)
        else:
            w = mx.random.uniform(-scale, scale, part_shape) * (4.0 if head else 1.0)
        q = mx.quantize(w, group_size=module.group_size, bits=module.bits, mode=module.mode)
        mx.eval(q)
        parts.append(q)
    return [mx.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]


def _random_gpt_oss_weights(
    config: dict[str, Any],
    seed: int,
    quantize: str | None = None,
    group_size: int | None = None,
) -> dict[str, mx.array]:
    from mlx.utils import tree_flatten
    from mlx_lm.models import gpt_oss

    mx.random.seed(seed)
    model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(config))
    # Random sinks and a sharper head than the default init make the logits look more like a
    # trained model's (a peaked distribution), which is what the samplers are tuned for.
    for layer in model.layers:
        layer.self_attn.sinks = mx.random.normal(layer.self_attn.sinks.shape)
    model.lm_head.weight = model.lm_head.weight * 4.0
    if quantize is not None:
        _quantize(model, config, quantize, group_size)
    return dict(tree_flatten(model.parameters()))  # lazy: evaluated shard by shard


# Above this many parameters a test model is written one layer per file, each evaluated
# alone (the float weights of the whole model need not fit in memory at once).
_SHARD_PARAMS = 2_000_000_000


def _save_weights(directory: Path, weights: dict[str, mx.array], config: dict[str, Any]) -> None:
    params = sum(v.size for v in weights.values())
    if params <= _SHARD_PARAMS:
        mx.eval(weights)
        mx.save_safetensors(str(directory / "model.safetensors"), weights, {"format": "mlx"})
        return
    import re

    groups: dict[int, dict[str, mx.array]] = {}
    for name, value in weights.items():
        m = re.search(r"\.layers\.(\d+)\.", name)
        groups.setdefault(int(m.group(1)) if m else -1, {})[name] = value
    order = sorted(groups)
    index: dict[str, str] = {}
    bar = ProgressBar(sum(v.nbytes for v in weights.values()), f"writing {directory.name}")
    for i, key in enumerate(order):
        file = f"model-{i + 1:05d}-of-{len(order):05d}.safetensors"
        part = groups.pop(key)
        # One module at a time: quantizing a float expert stack takes several times its size.
        modules: dict[str, list[mx.array]] = {}
        for name, value in part.items():
            modules.setdefault(name.rsplit(".", 1)[0], []).append(value)
        for arrays in modules.values():
            mx.eval(arrays)
            mx.clear_cache()
            bar.update(sum(a.nbytes for a in arrays))
        mx.save_safetensors(str(directory / file), part, {"format": "mlx"})
        index.update(dict.fromkeys(part, file))
        logger.info("wrote %s (%d arrays)", file, len(part))
        del part
        mx.clear_cache()
    bar.close()
    atomic_write_text(
        directory / "model.safetensors.index.json",
        json.dumps({"metadata": {}, "weight_map": index}, indent=1) + "\n",
    )


def make_test_model(
    path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    quantize: str | None = None,
    group_size: int | None = None,
    **shape: int,
) -> Path:
    """Write a random-weight GPT-OSS model directory (``config.json``, safetensors, and the
    Hugging Face tokenizer files with the Harmony chat template).

    ``preset`` is one of :data:`PRESETS` ("demo", "small", "mid"); keyword arguments override
    its shape (``layers``, ``hidden_size``, ``experts``, ...). The same seed gives the same
    weights. ``quantize`` (one of :data:`QUANTIZATIONS`: "4", "8" affine with ``group_size``
    (default 64), or "mxfp4" experts) writes them quantized, as mlx-lm's converter would.
    The directory appears atomically: a crash never leaves half a model behind.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = dict(PRESETS[preset]) if preset else {}
    base.update({k: v for k, v in shape.items() if v is not None})
    config = gpt_oss_config(**base)
    config["mlx_harmony_core"] = {"test_model": TEST_MODEL_VERSION, "seed": seed, "preset": preset}
    if quantize is not None:  # checked before any work
        quantize = str(quantize)
        if quantize not in QUANTIZATIONS:
            raise ValueError(
                f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}"
            )

    target = Path(path)
    occupied = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if occupied and not overwrite:
        raise FileExistsError(
            f"{target} exists and is not empty; replace it with --force "
            "(make_test_model(..., overwrite=True) in Python) or choose another directory"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        public_mode(tmp, directory=True)
        weights = _random_gpt_oss_weights(config, seed, quantize, group_size)
        _save_weights(tmp, weights, config)
        del weights
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        write_hf_tokenizer(tmp)  # for Hugging Face tools (mlx_lm.server), as real checkpoints
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def demo_model_path() -> Path:
    """The built-in demo model's directory, built on first use (seeded, so identical everywhere)."""
    path = home() / "models" / f"demo-v{TEST_MODEL_VERSION}"
    if not (path / "config.json").exists():
        logger.info("building the demo model in %s (once)", path)
        with contextlib.suppress(FileExistsError):  # another process built it meanwhile
            make_test_model(path, preset="demo", seed=0)
    return path
