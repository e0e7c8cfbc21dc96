"""Layers whose weights stay in GGUF's own blocks (Q8_0, MXFP4), computed by the extension's
block kernels: a GGUF file loaded on the CPU is mapped, not converted, and these layers' weights
are views of the mapping (no copy; the load costs no memory beyond the page cache).

The kernels (``_core.gguf_matmul`` / ``gguf_gather_matmul`` / ``gguf_dequantize``) run on CPU
streams only; on a GPU the loader keeps MLX's quantized layout (repacked).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import _core

__all__ = [
    "BLOCK_TYPES",
    "GgufEmbedding",
    "GgufLinear",
    "GgufSwitchLinear",
    "block_layer",
]

# GGML types with block kernels: type -> (name, bytes per block of 32 values).
BLOCK_TYPES: dict[int, tuple[str, int]] = {8: ("Q8_0", 34), 39: ("MXFP4", 17)}


class GgufLinear(nn.Module):
    """``nn.Linear`` over GGUF blocks: ``weight`` is (out, row_bytes) uint8."""

    def __init__(self, weight_shape: tuple[int, ...], gguf_type: int, bias: bool) -> None:
        super().__init__()
        self.gguf_type = gguf_type
        self.weight = mx.zeros(weight_shape, mx.uint8)
        if bias:
            self.bias = mx.zeros(weight_shape[:-1], mx.float32)

    def __call__(self, x: mx.array) -> mx.array:
        out = _core.gguf_matmul(x, self["weight"], self.gguf_type)
        return out + self["bias"] if "bias" in self else out


class GgufEmbedding(nn.Module):
    """``nn.Embedding`` over GGUF blocks (lookups dequantize their rows); a tied output
    head (``as_linear``) runs on the block kernels."""

    def __init__(self, weight_shape: tuple[int, ...], gguf_type: int) -> None:
        super().__init__()
        self.gguf_type = gguf_type
        self.weight = mx.zeros(weight_shape, mx.uint8)

    def __call__(self, ids: mx.array) -> mx.array:
        return _core.gguf_dequantize(self["weight"][ids], self.gguf_type)

    def as_linear(self, x: mx.array) -> mx.array:
        return _core.gguf_matmul(x, self["weight"], self.gguf_type)


class GgufSwitchLinear(nn.Module):
    """mlx-lm's ``SwitchLinear`` (stacked experts) over GGUF blocks: ``weight`` is
    (experts, out, row_bytes) uint8."""

    def __init__(self, weight_shape: tuple[int, ...], gguf_type: int, bias: bool) -> None:
        super().__init__()
        self.gguf_type = gguf_type
        self.weight = mx.zeros(weight_shape, mx.uint8)
        if bias:
            self.bias = mx.zeros(weight_shape[:-1], mx.float32)

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        out = _core.gguf_gather_matmul(x, self["weight"], indices, self.gguf_type)
        if "bias" in self:
            out = out + mx.expand_dims(self["bias"][indices], -2)
        return out


def block_layer(module: Any, gguf_type: int, weight_shape: tuple[int, ...]) -> nn.Module | None:
    """The block-kernel layer replacing ``module`` (an ``nn.Linear``, ``nn.Embedding`` or
    mlx-lm ``SwitchLinear``), or None for any other module (it loads repacked)."""
    try:
        from mlx_lm.models.switch_layers import SwitchLinear
    except ImportError:  # pragma: no cover - mlx-lm is a dependency
        SwitchLinear = ()  # noqa: N806
    bias = "bias" in module
    if type(module) is nn.Linear and len(weight_shape) == 2:
        return GgufLinear(weight_shape, gguf_type, bias)
    if type(module) is nn.Embedding and len(weight_shape) == 2:
        return GgufEmbedding(weight_shape, gguf_type)
    if SwitchLinear and type(module) is SwitchLinear and len(weight_shape) == 3:
        return GgufSwitchLinear(weight_shape, gguf_type, bias)
    return None
