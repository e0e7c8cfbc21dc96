"""Loading mlx-lm model directories, and writing random-weight GPT-OSS models for tests."""

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

from ._paths import atomic_write_text, home, public_mode
from .errors import ModelLoadError

if TYPE_CHECKING:
    import mlx.nn as nn

    from .chat_format import ChatFormat
    from .distributed import Group
    from .engine import Engine

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


def gpt_oss_config(
    *,
    layers: int = 2,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    experts: int = 4,
    experts_per_token: int = 2,
    vocab_size: int | None = None,
    sliding_window: int = 128,
) -> dict[str, Any]:
    """A GPT-OSS ``config.json`` with the released models' layer pattern, RoPE and window
    (``vocab_size`` defaults to o200k_harmony's)."""
    if vocab_size is None:
        from .harmony import VOCAB_SIZE

        vocab_size = VOCAB_SIZE
    checks = {
        "layers": layers,
        "hidden_size": hidden_size,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "experts": experts,
        "experts_per_token": experts_per_token,
        "vocab_size": vocab_size,
        "sliding_window": sliding_window,
    }
    for name, value in checks.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if layers < 2:
        raise ValueError("GPT-OSS needs at least 2 layers (one sliding, one full attention)")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if experts_per_token > experts:
        raise ValueError(f"experts_per_token ({experts_per_token}) exceeds experts ({experts})")
    return {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "num_hidden_layers": layers,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size or hidden_size,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "num_local_experts": experts,
        "num_experts_per_tok": experts_per_token,
        "experts_per_token": experts_per_token,
        "vocab_size": vocab_size,
        "sliding_window": sliding_window,
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ],
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 4096,
            "truncate": False,
        },
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
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
        mx.save_safetensors(str(directory / file), part, {"format": "mlx"})
        index.update(dict.fromkeys(part, file))
        logger.info("wrote %s (%d arrays)", file, len(part))
        del part
        mx.clear_cache()
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
        from .harmony import write_hf_tokenizer

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
) -> tuple[nn.Module, dict[str, Any], Path]:
    """Load an mlx-lm model through mlx-lm's own classes (a directory, or a ``.gguf`` file:
    ``dequantize`` applies to it). Returns (model, config, directory or file).

    With a distributed ``group`` of more than one rank, this rank loads only its shard:
    tensor parallel through the model's ``shard()``, else pipeline parallel through its
    ``model.pipeline()`` (the weights are read lazily, so the rest is never resident).

    ``dtype="auto"`` keeps the checkpoint's dtype except where MLX's CPU backend cannot run it:
    GPT-OSS's expert gather-matmul rejects bfloat16 on the CPU, so those weights become float32.
    """
    from mlx_lm.utils import load_model as mlx_lm_load_model

    sharded = group is not None and group.size > 1
    if is_gguf(path):
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
        model, config = mlx_lm_load_model(directory, lazy=sharded)
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
    _cpu_layers(model)
    return model, config, directory


def _shard(model: nn.Module, config: dict[str, Any], group: Group) -> None:
    """Keep this rank's shard of ``model`` (then read only that from disk)."""
    if hasattr(model, "shard"):
        model.shard(group.group)
        from .distributed import shard_vocab

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
    _cpu_layers(model)
    return model, config, header


def _cpu_layers(model: nn.Module) -> None:
    """On a CPU device: float experts expert by expert, quantized layers on our kernels."""
    if mx.default_device() == mx.cpu and os.environ.get("MLX_HARMONY_CORE_EXPERTS") != "mlx":
        from .moe import use_dense_experts

        n = use_dense_experts(model)
        if n:
            logger.info("%d expert layers run expert by expert on the CPU", n)
    from .quant import kernels_enabled, use_quant_kernels

    if kernels_enabled():
        n = use_quant_kernels(model)
        if n:
            logger.info("%d quantized layers run on mlx-harmony-core's CPU kernels", n)


def _cast(model: nn.Module, config: dict[str, Any], dtype: str) -> None:
    from mlx.utils import tree_flatten

    if dtype == "auto":
        if mx.default_device() != mx.cpu or config.get("model_type") != "gpt_oss":
            return
        target = mx.float32
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
    **engine_options: Any,
) -> Engine:
    """Load a model directory, a ``.gguf`` file (or "demo") and return an :class:`Engine`.

    A GGUF file loads directly (see :mod:`.gguf`): its quantized tensors stay quantized
    unless ``dequantize=True`` (float32: faster on the CPU today, more memory).

    GPT-OSS models (``model_type == "gpt_oss"``) use the Harmony encoding; other models use
    their own tokenizer and chat template, loaded with mlx-lm.
    """
    from .engine import Engine

    if is_gguf(path_or_name):
        from .gguf import chat_format

        group = engine_options.get("group")
        if group is not None and group.size > 1:
            raise ModelLoadError(
                "a GGUF file does not load sharded; convert it first "
                "(mlx-harmony-core convert FILE.gguf DIR) and load DIR"
            )
        model, config, header = _load_gguf(path_or_name, dtype, dequantize)
        return Engine(model, chat_format=chat_format(header), config=config, **engine_options)
    model, config, directory = load_model(
        path_or_name, dtype=dtype, group=engine_options.get("group")
    )
    return Engine(
        model, chat_format=chat_format_for(config, directory), config=config, **engine_options
    )


def is_gguf(path_or_name: str | os.PathLike[str]) -> bool:
    """True for a GGUF file's path (by its name: it need not exist yet)."""
    return str(path_or_name).lower().endswith(".gguf")


def chat_format_for(config: dict[str, Any], directory: Path) -> ChatFormat:
    """The one place a model family picks its chat format: Harmony for GPT-OSS, the
    tokenizer's chat template (loaded with mlx-lm) for every other model."""
    if config.get("model_type") == "gpt_oss":
        from .harmony import HarmonyFormat

        return HarmonyFormat()
    from mlx_lm.utils import load_tokenizer

    from .chat_format import ChatTemplateFormat

    try:
        tokenizer = load_tokenizer(directory)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {directory}: {exc}") from exc
    return ChatTemplateFormat(tokenizer)
