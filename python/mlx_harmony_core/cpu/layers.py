"""Switching a loaded model's layers to the CPU paths (the load path calls this)."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import mlx.core as mx

from .block import block_classes, model_classes
from .experts import use_dense_experts
from .fused import fused_enabled, use_fused_layers
from .quant import kernels_enabled, use_quant_kernels

if TYPE_CHECKING:
    import mlx.nn as nn

__all__ = ["EXPERTS_ENV", "use_cpu_layers"]

logger = logging.getLogger(__name__)

EXPERTS_ENV = "MLX_HARMONY_CORE_EXPERTS"  # "mlx" = MLX's own expert path


def use_cpu_layers(model: nn.Module) -> None:
    """On a CPU device: float experts expert by expert, quantized layers on our kernels,
    RMSNorm / RoPE / attention on our fused primitives."""
    if mx.default_device() == mx.cpu and os.environ.get(EXPERTS_ENV) != "mlx":
        n = use_dense_experts(model)
        if n:
            logger.info("%d expert layers run expert by expert on the CPU", n)
    if kernels_enabled():
        n = use_quant_kernels(model)
        if n:
            logger.info("%d quantized layers run on mlx-harmony-core's CPU kernels", n)
    if fused_enabled():
        n = use_fused_layers(model, {**block_classes(), **model_classes()})
        if n:
            logger.info("%d layers run on mlx-harmony-core's fused CPU primitives", n)
