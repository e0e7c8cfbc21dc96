"""Quantized models on the CPU: our kernels behind MLX's quantized layers.

MLX's CPU ``quantized_matmul`` / ``gather_qmm`` are plain loops (~0.3-2 GB/s of weights). Our
extension has MLX primitives for affine 4/8-bit (groups of 32/64/128) and MXFP4 weights: a
fused dequantize-and-dot GEMV with AVX-512 / AVX2 (picked at run time, portable fallback),
threaded over output rows, for few rows; dequantized tiles through OpenBLAS for many (prefill).
Loading through :func:`mlx_harmony_core.load` on a CPU device switches a model's quantized
layers (``QuantizedLinear``, tied ``QuantizedEmbedding`` heads, mlx-lm's
``QuantizedSwitchLinear`` experts) to them; their weights are untouched and anything the kernels
do not take (other widths, modes, a GPU stream) goes to MLX's op. ``MLX_HARMONY_CORE_QUANT_KERNELS=mlx``
turns them off.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import _core
from .switch import Switch

__all__ = [
    "ENV",
    "MLX_GROUPS",
    "SmallGroupQuantizedEmbedding",
    "SmallGroupQuantizedLinear",
    "active",
    "info",
    "kernels",
    "kernels_enabled",
    "switched_layers",
    "use_quant_kernels",
    "use_small_groups",
]

logger = logging.getLogger(__name__)

ENV = "MLX_HARMONY_CORE_QUANT_KERNELS"  # "mlx" = MLX's own CPU kernels

# Switched-in layers consult it at call time, so a benchmark can run MLX's path on the same
# model object (see kernels()).
_switch = Switch(ENV)


def kernels_enabled() -> bool:
    """Whether loading switches quantized layers to our kernels: on a CPU device, unless
    ``MLX_HARMONY_CORE_QUANT_KERNELS=mlx``."""
    return _switch.enabled()


def active() -> bool:
    """Whether switched layers run on our kernels now (False inside ``kernels(False)``)."""
    return _switch.active


def kernels(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Run switched layers on our kernels (True) or MLX's (False) inside the block."""
    return _switch.scope(enabled)


# Groups MLX's quantized matmul takes; GGUF's Q2_K/Q3_K/Q6_K come in groups of 16.
MLX_GROUPS = (32, 64, 128)


def _dequantized(layer: Any, weight: str = "weight") -> mx.array:
    return mx.dequantize(
        layer[weight],
        layer["scales"],
        layer.get("biases"),
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


def _qmm(x: mx.array, layer: Any, weight: str = "weight") -> mx.array:
    if not _switch.active and layer.group_size not in MLX_GROUPS:  # what MLX runs: dequantize
        return (x @ _dequantized(layer, weight).T).astype(x.dtype)
    op = _core.quantized_matmul if _switch.active else mx.quantized_matmul
    return op(
        x,
        layer[weight],
        scales=layer["scales"],
        biases=layer.get("biases"),
        transpose=True,
        group_size=layer.group_size,
        bits=layer.bits,
        mode=layer.mode,
    )


class FastQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` through our CPU kernels."""

    def __call__(self, x: mx.array) -> mx.array:
        out = _qmm(x, self)
        return out + self["bias"] if "bias" in self else out


class FastQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` whose tied output head runs on our CPU kernels."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _qmm(x, self)


class SmallGroupQuantizedLinear(nn.QuantizedLinear):
    """``nn.QuantizedLinear`` with groups MLX's quantized matmul does not take (16): MLX
    dequantizes and multiplies (our kernels, where switched in, run them directly)."""

    def __call__(self, x: mx.array) -> mx.array:
        out = (x @ _dequantized(self).T).astype(x.dtype)
        return out + self["bias"] if "bias" in self else out


class SmallGroupQuantizedEmbedding(nn.QuantizedEmbedding):
    """``nn.QuantizedEmbedding`` with groups of 16 (lookups dequantize; MLX takes those)."""

    def as_linear(self, x: mx.array) -> mx.array:
        return (x @ _dequantized(self).T).astype(x.dtype)


def use_small_groups(model: Any, specs: dict[str, tuple[int, int, str]]) -> None:
    """Regroup ``model``'s quantized layers at ``specs`` (path -> (bits, group, mode)) to
    groups MLX cannot quantize to (16): the layers were made with groups of 32; their scales
    and biases are reshaped for the weights to load, and they run as
    :class:`SmallGroupQuantizedLinear` / :class:`SmallGroupQuantizedEmbedding`."""
    classes = {
        nn.QuantizedLinear: SmallGroupQuantizedLinear,
        nn.QuantizedEmbedding: SmallGroupQuantizedEmbedding,
    }
    for path, module in model.named_modules():
        spec = specs.get(path)
        if spec is None:
            continue
        target = classes.get(type(module))
        if target is None:
            raise ValueError(
                f"{path}: {type(module).__name__} cannot hold groups of {spec[1]} (GGUF "
                "Q2_K/Q3_K/Q6_K); load the model with dequantize=True"
            )
        rows, cols = module["weight"].shape[0], module["weight"].shape[1] * 32 // spec[0]
        module.group_size = spec[1]
        module.scales = mx.zeros((rows, cols // spec[1]), mx.float32)
        module.biases = mx.zeros((rows, cols // spec[1]), mx.float32)
        module.__class__ = target


def _fast_switch_class() -> type | None:
    try:
        from mlx_lm.models.switch_layers import QuantizedSwitchLinear
    except ImportError:  # pragma: no cover - mlx-lm is a dependency
        return None

    class FastQuantizedSwitchLinear(QuantizedSwitchLinear):  # type: ignore[misc, valid-type]
        """mlx-lm's ``QuantizedSwitchLinear`` (experts) through our CPU kernels."""

        def __call__(
            self, x: mx.array, indices: mx.array, sorted_indices: bool = False
        ) -> mx.array:
            if not _switch.active or self.get("global_scale") is not None:
                return super().__call__(x, indices, sorted_indices=sorted_indices)
            out = _core.gather_qmm(
                x,
                self["weight"],
                self["scales"],
                self.get("biases"),
                rhs_indices=indices,
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
                mode=self.mode,
                sorted_indices=sorted_indices,
            )
            if "bias" in self:
                out = out + mx.expand_dims(self["bias"][indices], -2)
            return out

    return FastQuantizedSwitchLinear


_SWITCH: list[type | None] = []


def use_quant_kernels(model: Any) -> int:
    """Switch ``model``'s quantized layers to our CPU kernels (weights untouched); returns
    how many were switched. Layers whose quantization the kernels do not take stay as they are."""
    if not _SWITCH:
        _SWITCH.append(_fast_switch_class())
    switch = _SWITCH[0]
    swaps: dict[type, type] = {
        nn.QuantizedLinear: FastQuantizedLinear,
        nn.QuantizedEmbedding: FastQuantizedEmbedding,
        SmallGroupQuantizedLinear: FastQuantizedLinear,
        SmallGroupQuantizedEmbedding: FastQuantizedEmbedding,
    }
    if switch is not None:
        swaps[switch.__mro__[1]] = switch
    switched = 0
    for _, module in model.named_modules() if hasattr(model, "named_modules") else []:
        target = swaps.get(type(module))
        mode = getattr(module, "mode", "affine")
        if target is not None and _core.quant_supported(mode, module.bits, module.group_size):
            module.__class__ = target
            switched += 1
    return switched


def switched_layers(model: Any) -> int:
    """How many of ``model``'s layers run on our kernels."""
    ours = (FastQuantizedLinear, FastQuantizedEmbedding, *(c for c in _SWITCH if c))
    modules = model.named_modules() if hasattr(model, "named_modules") else []
    return sum(isinstance(m, ours) for _, m in modules)


def info() -> dict[str, object]:
    """Which quantized matmul kernels run on this device, for :func:`backend_info`."""
    if os.environ.get(ENV, "").lower() == "mlx":
        return {"quant_kernels": f"mlx ({ENV}=mlx)"}
    if mx.default_device() != mx.cpu:
        return {"quant_kernels": "mlx (GPU)"}
    return {
        "quant_kernels": "mlx-harmony-core",
        "quant_isa": _core.quant_isa(),
        "quant_threads": _core.quant_threads(),
    }
