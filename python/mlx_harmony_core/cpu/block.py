"""A llama-style decoder block's decode step in two fused CPU primitives.

mlx-lm's ``TransformerBlock`` runs ~27 MLX ops per token and layer (norms, seven quantized
GEMVs, reshapes and transposes, RoPE, the cache update, attention, SwiGLU, residual adds); on
a 2-core CPU each op's dispatch and hand-off costs about what its arithmetic does. For a few
query rows (decode, draft verification) :class:`FusedLlamaBlock` runs ``_core``'s
``block_attn_in`` (RMSNorm -> q/k/v -> RoPE), the model's own cache update and
:func:`.fused.attention`, then ``block_attn_out_mlp`` (o-proj -> residual -> RMSNorm ->
gate/up -> SwiGLU -> down -> residual): 7 ops a layer. Its results are within float32
rounding of the op-by-op path, which it takes for anything else: a GPU stream, long prompts,
inside :func:`.fused.fused` ``(False)`` or :func:`.quant.kernels` ``(False)``, layers that
are not on our quantized kernels.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import _core
from . import fused, quant

__all__ = ["MAX_ROWS", "block_classes"]

MAX_ROWS = 16  # query rows up to which the fused step runs (csrc/fused/block.h)

Linear = tuple[mx.array, mx.array, mx.array | None, mx.array | None, int, int, str]


def _linear(layer: Any) -> Linear | None:
    """A quantized linear on our kernels as the primitives take it; ``None`` otherwise."""
    if not isinstance(layer, quant.FastQuantizedLinear) or "global_scale" in layer:
        return None
    return (
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        layer.get("bias"),
        layer.group_size,
        layer.bits,
        getattr(layer, "mode", "affine"),
    )


def _norm(layer: Any) -> tuple[mx.array, float] | None:
    if not isinstance(layer, nn.RMSNorm) or "weight" not in layer:
        return None
    return layer["weight"], layer.eps


def block_classes() -> dict[type, type]:
    """mlx-lm's llama ``TransformerBlock`` -> :class:`FusedLlamaBlock` (empty without it)."""
    try:
        from mlx_lm.models import llama
    except ImportError:  # pragma: no cover - mlx-lm is a dependency
        return {}

    class FusedLlamaBlock(llama.TransformerBlock):  # type: ignore[misc, valid-type]
        """mlx-lm's llama ``TransformerBlock``, its decode step as two fused primitives."""

        def _fused_args(self) -> tuple[Any, ...] | None:
            attn, mlp = self.self_attn, self.mlp
            if type(attn) is not llama.Attention or type(mlp) is not llama.MLP:
                return None
            rope = getattr(attn.rope, "fused_args", None)
            parts = (
                _norm(self.input_layernorm),
                _norm(self.post_attention_layernorm),
                rope() if rope is not None else None,
                *(_linear(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")),
                *(_linear(getattr(mlp, n)) for n in ("gate_proj", "up_proj", "down_proj")),
            )
            return None if any(p is None for p in parts) else parts

        def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
            args = None
            if (
                fused._on()
                and x.ndim == 3
                and 0 < x.shape[1] <= MAX_ROWS
                and mx.default_device() == mx.cpu
            ):
                args = self._fused_args()
            if args is None:
                return super().__call__(x, mask, cache)
            (w1, eps1), (w2, eps2), rope, q, k, v, o, gate, up, down = args
            attn = self.self_attn
            dims, traditional, base, scale, freqs = rope
            queries, keys, values = _core.block_attn_in(
                x,
                w1,
                eps1,
                q,
                k,
                v,
                n_heads=attn.n_heads,
                n_kv_heads=attn.n_kv_heads,
                rope_dims=dims,
                rope_traditional=traditional,
                rope_base=base,
                rope_scale=scale,
                rope_freqs=freqs,
                offset=cache.offset if cache is not None else 0,
            )
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
            out = fused.attention(queries, keys, values, cache, attn.scale, mask)
            return _core.block_attn_out_mlp(out, x, o, w2, eps2, gate, up, down)

    return {llama.TransformerBlock: FusedLlamaBlock}
