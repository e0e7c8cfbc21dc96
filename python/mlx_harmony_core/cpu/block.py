"""A llama-style decoder block's decode step in two fused CPU primitives.

mlx-lm's ``TransformerBlock`` runs ~27 MLX ops per token and layer (norms, seven quantized
GEMVs, reshapes and transposes, RoPE, the cache update, attention, SwiGLU, residual adds); on
a 2-core CPU each op's dispatch and hand-off costs about what its arithmetic does. For a few
query rows (decode, draft verification) :class:`FusedLlamaBlock` runs ``_core``'s
``block_attn_in`` (RMSNorm -> q/k/v -> RoPE), the cache update and the fused attention, then
``block_attn_out_mlp`` (o-proj -> residual -> RMSNorm -> gate/up -> SwiGLU -> down ->
residual): 7 ops a layer. With one of our single-sequence caches (or none) the whole step is
one call into ``_core.FusedBlock.step``, whose weights were converted once; the block keeps
that object while every array and submodule it came from is still the live one. Its results
are within float32 rounding of the op-by-op path, which it takes for anything else: a GPU
stream, long prompts, inside :func:`.fused.fused` ``(False)`` or :func:`.quant.kernels`
``(False)``, layers that are not on our quantized kernels.

When every layer of a llama model is such a block and every cache is our ``KVCache`` (or a
full-precision, full-attention ``BatchKVCache``: the scheduler's),
:class:`FusedLlamaModel` runs all the layers' step as ONE primitive
(``_core.fused_stack_step``): no per-layer Python, no per-op MLX scheduling, each layer's
keys and values written into its cache's buffer in place.
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import _core
from . import fused, quant

__all__ = ["MAX_ROWS", "block_classes", "model_classes"]

# Our caches: each returns float keys and values (the quantized ones dequantized), which
# our attention primitive takes as they are (mlx-lm's quantized cache goes to fused.attention).
_OUR_CACHES = frozenset(
    (_core.KVCache, _core.RotatingKVCache, _core.QuantizedKVCache, _core.BatchKVCache)
)
# Those that FusedBlock.step updates itself (one sequence's: _core.Cache's).
_STEP_CACHES = frozenset((_core.KVCache, _core.RotatingKVCache, _core.QuantizedKVCache))

MAX_ROWS = 16  # query rows up to which the fused step runs (csrc/fused/block.h)
# Those fused_stack_step writes itself (the C++ side declines quantized or windowed batches).
_STACK_CACHES = frozenset((_core.KVCache, _core.BatchKVCache))
# The real class (tests may swap the module attribute for a counting stand-in).
_FUSED_BLOCK = _core.FusedBlock

Linear = tuple[mx.array, mx.array, mx.array | None, mx.array | None, int, int, str]
# What an argument tuple was read from: (module, key, value) with ``module.get(key) is value``
# (a module's arrays and submodules live in its dict) and (module, None, class).
# A list's item: (list, index, value) with ``list[index] is value``.
Checks = tuple[tuple[Any, str | int | None, Any], ...]

_LINEAR_KEYS = ("weight", "scales", "biases", "bias", "global_scale")


def _linear(layer: Any, checks: list[tuple[Any, str | None, Any]]) -> Linear | None:
    """A quantized linear on our kernels as the primitives take it; ``None`` otherwise.
    Appends what it read to ``checks``."""
    checks.append((layer, None, type(layer)))
    if not isinstance(layer, quant.FastQuantizedLinear) or "global_scale" in layer:
        return None
    checks.extend((layer, k, layer.get(k)) for k in _LINEAR_KEYS)
    return (
        layer["weight"],
        layer["scales"],
        layer.get("biases"),
        layer.get("bias"),
        layer.group_size,
        layer.bits,
        getattr(layer, "mode", "affine"),
    )


def _norm(layer: Any, checks: list[tuple[Any, str | None, Any]]) -> tuple[mx.array, float] | None:
    checks.append((layer, None, type(layer)))
    if not isinstance(layer, nn.RMSNorm) or "weight" not in layer:
        return None
    checks.append((layer, "weight", layer["weight"]))
    return layer["weight"], layer.eps


def _valid(checks: Checks) -> bool:
    """Whether every array and submodule ``checks`` recorded is still the live one (one C
    loop: ``_core.same_objects``)."""
    return _core.same_objects(checks)


def block_classes() -> dict[type, type]:
    """mlx-lm's llama ``TransformerBlock`` -> :class:`FusedLlamaBlock` (empty without it)."""
    return {k: v for k, v in _classes().items() if v.__name__ == "FusedLlamaBlock"}


def model_classes() -> dict[type, type]:
    """mlx-lm's ``LlamaModel`` -> :class:`FusedLlamaModel` (empty without mlx-lm)."""
    return {k: v for k, v in _classes().items() if v.__name__ == "FusedLlamaModel"}


@functools.cache
def _classes() -> dict[type, type]:
    """The fused llama classes, made once (``isinstance`` checks need one class object)."""
    try:
        from mlx_lm.models import llama
        from mlx_lm.models.base import create_attention_mask
    except ImportError:  # pragma: no cover - mlx-lm is a dependency
        return {}

    class FusedLlamaBlock(llama.TransformerBlock):  # type: ignore[misc, valid-type]
        """mlx-lm's llama ``TransformerBlock``, its decode step as two fused primitives."""

        def _fused_args(self) -> tuple[Any, ...] | None:
            # Reading ~30 arrays through nn.Module lookups per layer and token cost ~5% of
            # a decode step: the tuple is kept and reused while every array and submodule
            # it came from is still the live one (model.update, load_weights and LoRA
            # swaps replace them, which rebuilds it).
            memo = self.__dict__.get("_fused_memo")
            if memo is not None and _valid(memo[0]):
                return memo[1]
            parts = self._read_fused_args()
            object.__setattr__(self, "_fused_memo", parts)  # not a parameter: no dict entry
            return parts[1]

        def _read_fused_args(self) -> tuple[Checks, tuple[Any, ...] | None]:
            checks: list[tuple[Any, str | None, Any]] = [(self, None, type(self))]
            checks.extend(
                (self, n, self.get(n))
                for n in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
            )
            attn, mlp = self.self_attn, self.mlp
            checks += [(attn, None, type(attn)), (mlp, None, type(mlp))]
            if type(attn) is not llama.Attention or type(mlp) is not llama.MLP:
                return tuple(checks), None
            rope_layer = attn.rope
            checks += [(attn, "rope", rope_layer), (rope_layer, None, type(rope_layer))]
            checks.extend((rope_layer, k, v) for k, v in rope_layer.items())
            rope = getattr(rope_layer, "fused_args", None)
            names = ("q_proj", "k_proj", "v_proj", "o_proj")
            checks.extend((attn, n, attn.get(n)) for n in names)
            checks.extend((mlp, n, mlp.get(n)) for n in ("gate_proj", "up_proj", "down_proj"))
            parts = (
                _norm(self.input_layernorm, checks),
                _norm(self.post_attention_layernorm, checks),
                rope() if rope is not None else None,
                *(_linear(getattr(attn, n), checks) for n in names),
                *(_linear(getattr(mlp, n), checks) for n in ("gate_proj", "up_proj", "down_proj")),
            )
            if any(p is None for p in parts):
                return tuple(checks), None
            (w1, eps1), (w2, eps2), (dims, trad, base, scale, freqs), q, k, v, o, g, u, d = parts
            # block_attn_in's arguments before the offset, the RoPE freqs after it,
            # block_attn_out_mlp's after (attn, x), the attention's scale.
            attn_in = (w1, eps1, q, k, v, attn.n_heads, attn.n_kv_heads, dims, trad, base, scale)
            out_mlp = (o, w2, eps2, g, u, d)
            whole = _core.FusedBlock(*attn_in, freqs, *out_mlp, attn.scale)
            return tuple(checks), (whole, attn_in, freqs, out_mlp, attn.scale)

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
            whole, attn_in, freqs, out_mlp, scale = args
            if cache is None or type(cache) in _STEP_CACHES:  # the whole step in one call
                return whole.step(x, cache, mask)
            queries, keys, values = _core.block_attn_in(
                x, *attn_in, cache.offset if cache is not None else 0, freqs
            )
            if cache is not None:
                keys, values = cache.update_and_fetch(keys, values)
            if type(cache) in _OUR_CACHES:
                out = _core.scaled_dot_product_attention(
                    queries, keys, values, scale=scale, mask=mask
                )
            else:
                out = fused.attention(queries, keys, values, cache, scale, mask)
            return _core.block_attn_out_mlp(out, x, *out_mlp)

    class FusedLlamaModel(llama.LlamaModel):  # type: ignore[misc, valid-type]
        """mlx-lm's ``LlamaModel``, its decode step over fused blocks as one primitive."""

        def _stack(self, h: mx.array, cache: Any) -> list[Any] | None:
            """The layers' ``FusedBlock`` objects where the one-primitive step takes
            ``h`` and ``cache``; ``None`` otherwise (the layers run one by one)."""
            if (
                cache is None
                or not fused._on()
                or h.ndim != 3
                or not 0 < h.shape[1] <= MAX_ROWS
                or mx.default_device() != mx.cpu
                or getattr(self, "swa_idx", None) is not None
                or len(cache) != len(self.layers)
                or type(cache[0]) not in _STACK_CACHES
                or any(type(c) is not type(cache[0]) for c in cache)
            ):
                return None
            # One check of every layer's memo per token (not one per layer in Python:
            # ~1 ms a token on SmolLM2's 30 layers).
            memo = self.__dict__.get("_stack_memo")
            if (
                memo is None
                or memo[2] is not _FUSED_BLOCK
                or not _valid(memo[0])
                # a layer appended in place: the checks cover the indices that were read
                or (memo[1] is not None and len(memo[1]) != len(self.layers))
            ):
                memo = self._read_stack()
                object.__setattr__(self, "_stack_memo", memo)  # not a parameter
            return memo[1]

        def _read_stack(self) -> tuple[Checks, list[Any] | None, type]:
            """(what was read, the layers' ``FusedBlock`` objects or ``None``, the
            FusedBlock class they were checked against)."""
            layers = self.layers
            checks: list[tuple[Any, str | int | None, Any]] = [
                (self, None, type(self)),
                (self, "layers", layers),
            ]
            checks.extend((layers, i, layer) for i, layer in enumerate(layers))
            blocks: list[Any] | None = []
            for layer in layers:
                if type(layer) is not FusedLlamaBlock:
                    # re-read once its class changes (swapped to ours in place)
                    checks.append((layer, None, type(layer)))
                    return tuple(checks), None, _FUSED_BLOCK
                args = layer._fused_args()
                checks.extend(layer.__dict__["_fused_memo"][0])
                if args is None or type(args[0]) is not _FUSED_BLOCK:
                    blocks = None
                elif blocks is not None:
                    blocks.append(args[0])
            return tuple(checks), blocks, _FUSED_BLOCK

        def __call__(
            self, inputs: mx.array, cache: Any = None, input_embeddings: mx.array | None = None
        ) -> mx.array:
            h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
            blocks = self._stack(h, cache)
            if blocks is not None:
                mask = create_attention_mask(h, cache[getattr(self, "fa_idx", 0)])
                out = _core.fused_stack_step(blocks, h, cache, mask)
                if out is not None:
                    return self.norm(out)
            return super().__call__(inputs, cache, input_embeddings=h)

    return {llama.TransformerBlock: FusedLlamaBlock, llama.LlamaModel: FusedLlamaModel}
