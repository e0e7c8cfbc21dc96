"""Fused CPU primitives behind mlx-lm's layers: RMSNorm, RoPE, attention and SwiGLU.

On MLX's CPU backend ``mx.fast.rms_norm``, ``mx.fast.rope`` and
``mx.fast.scaled_dot_product_attention`` are compositions of small ops (a RoPE is ~20, a
decode attention runs two GEMVs through the BLAS whose idle threads then spin); a decode step
of a 30-layer model ran ~2000 of them. Our extension has each as one primitive (``_core``'s
``rms_norm``, ``rope``, ``scaled_dot_product_attention``, ``swiglu``: float32 arithmetic,
results within float32 rounding of MLX's; attention and SwiGLU threaded over heads, query
blocks and rows, with a vectorized exp, so a prompt's softmax no longer runs MLX's scalar exp
on one core). Loading on a CPU device switches a model's ``nn.RMSNorm`` and RoPE layers to
them and its module's attention and SwiGLU functions to :func:`attention` and
:func:`swiglu`; they fall back to MLX's ops on a GPU stream, inside :func:`~.quant.kernels`
``(False)`` (mlx-lm as its users run it), and for what they do not take (a quantized KV
cache).
``MLX_HARMONY_CORE_FUSED=mlx`` turns the switch off.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import _core
from . import quant
from .switch import Switch

__all__ = ["ENV", "attention", "fused", "fused_enabled", "swiglu", "use_fused_layers"]

ENV = "MLX_HARMONY_CORE_FUSED"  # "mlx" = MLX's own ops

# What the fused block primitives take of a RoPE layer: (dims, traditional, base, scale,
# freqs).
RopeArgs = tuple[int, bool, float | None, float, mx.array | None]


_switch = Switch(ENV)


def fused_enabled() -> bool:
    """Whether loading switches layers to the fused primitives: on a CPU device, unless
    ``MLX_HARMONY_CORE_FUSED=mlx``."""
    return _switch.enabled()


def fused(enabled: bool) -> contextlib.AbstractContextManager[None]:
    """Run switched layers on the fused primitives (True) or MLX's ops (False) in the block."""
    return _switch.scope(enabled)


def _on() -> bool:
    return _switch.active and quant.active()


class FusedRMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` as one CPU primitive."""

    def __call__(self, x: mx.array) -> mx.array:
        if not _on():
            return super().__call__(x)
        return _core.rms_norm(x, self["weight"], self.eps)


class FusedRoPE(nn.RoPE):
    """``nn.RoPE`` as one CPU primitive."""

    def fused_args(self) -> RopeArgs | None:
        """(dims, traditional, base, scale, freqs) for the fused block primitives."""
        return (self.dims, self.traditional, self.base, self.scale, None)

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        if not _on():
            return super().__call__(x, offset)
        return _core.rope(
            x,
            self.dims,
            traditional=self.traditional,
            base=self.base,
            scale=self.scale,
            offset=offset,
        )


def _rope_classes() -> dict[type, type]:
    """mlx-lm's RoPE variants that precompute frequencies -> their fused subclasses."""
    try:
        from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE
    except ImportError:  # pragma: no cover - mlx-lm is a dependency
        return {}

    class FusedLlama3RoPE(Llama3RoPE):  # type: ignore[misc, valid-type]
        """mlx-lm's ``Llama3RoPE`` as one CPU primitive."""

        def fused_args(self) -> RopeArgs | None:
            """(dims, traditional, base, scale, freqs) for the fused block primitives."""
            return (self.dims, self.traditional, None, 1.0, self._freqs)

        def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
            if not _on():
                return super().__call__(x, offset)
            return _core.rope(
                x,
                self.dims,
                traditional=self.traditional,
                base=None,
                scale=1.0,
                offset=offset,
                freqs=self._freqs,
            )

    class FusedYarnRoPE(YarnRoPE):  # type: ignore[misc, valid-type]
        """mlx-lm's ``YarnRoPE`` (GPT-OSS) as one CPU primitive."""

        def fused_args(self) -> RopeArgs | None:
            """(dims, traditional, base, scale, freqs) for the fused block primitives;
            ``None`` where the inputs are scaled first (mscale)."""
            if self.mscale != 1.0:
                return None
            return (self.dims, self.traditional, None, 1.0, self._freqs)

        def __call__(
            self,
            x: mx.array,
            offset: int | mx.array = 0,
            scale: float = 1.0,
            inverse: bool = False,
        ) -> mx.array:
            if not _on() or inverse:
                return super().__call__(x, offset, scale, inverse)
            if self.mscale != 1.0:
                x = x.at[..., : self.dims].multiply(self.mscale)
            return _core.rope(
                x,
                self.dims,
                traditional=self.traditional,
                base=None,
                scale=scale,
                offset=offset,
                freqs=self._freqs,
            )

    return {Llama3RoPE: FusedLlama3RoPE, YarnRoPE: FusedYarnRoPE}


_ROPES: list[dict[type, type]] = []


def attention(
    queries: mx.array,
    keys: Any,
    values: Any,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention`` (same arguments): our fused primitive for
    plain caches, mlx-lm's function for quantized ones and when switched off."""
    from mlx_lm.models.base import scaled_dot_product_attention

    if not _on() or hasattr(cache, "bits") or not isinstance(keys, mx.array):
        return scaled_dot_product_attention(
            queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks
        )
    return _core.scaled_dot_product_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks
    )


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's ``swiglu`` (``silu(gate) * x``): one threaded primitive with a vectorized
    exp (MLX's CPU sigmoid calls a scalar exp per element: ~9% of a SmolLM2 prefill)."""
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    if not _on():
        return mlx_swiglu(gate, x)
    return _core.swiglu(gate, x)


def use_fused_layers(model: nn.Module, blocks: Mapping[type, type] | None = None) -> int:
    """Switch ``model``'s RMSNorm and RoPE layers to the fused primitives, decoder blocks
    to their fused classes in ``blocks`` (:func:`.block.block_classes`: llama-style blocks'
    two-primitive decode step) and its modules' attention function to :func:`attention`;
    returns how many layers were switched."""
    if not _ROPES:
        _ROPES.append({nn.RMSNorm: FusedRMSNorm, nn.RoPE: FusedRoPE, **_rope_classes()})
    swaps = {**_ROPES[0], **(blocks or {})}
    switched = 0
    modules: set[str] = set()
    for _, module in model.named_modules():
        target = swaps.get(type(module))
        if target is not None:
            module.__class__ = target
            switched += 1
        modules.add(type(module).__module__)
    # mlx-lm's model files call the attention and SwiGLU functions they imported from .base
    # and .activations.
    from mlx_lm.models.activations import swiglu as mlx_swiglu

    for name in modules:
        mod = sys.modules.get(name)
        if mod is None or not name.startswith("mlx_lm.models."):
            continue
        for attr, ours, theirs, home in (
            ("scaled_dot_product_attention", attention, None, "mlx_lm.models.base"),
            ("swiglu", swiglu, mlx_swiglu, "mlx_lm.models.activations"),
        ):
            if name == home:
                # The defining module keeps MLX's function: ours falls back to it
                # (GPT-OSS's SwigluOAI lives beside swiglu in activations).
                continue
            current = getattr(mod, attr, None)
            if current is not None and current is not ours and theirs in (None, current):
                setattr(mod, attr, ours)
                switched += 1
    return switched
