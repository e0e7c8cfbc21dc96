"""The families that talk through their tokenizer's chat template and load from GGUF files:
llama (SmolLM2 too), qwen2, qwen3, gemma, phi3. Each differs from the common GGUF mapping
only in what llama.cpp's converter changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .registry import Family, MetadataGetter, register

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = ["GEMMA", "LLAMA", "PHI3", "QWEN2", "QWEN3"]


def _unpermute(a: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's q/k row interleave (its converter's ``permute``) on ``a``'s rows."""
    rows = a.shape[0]
    rest = a.shape[1:]
    return a.reshape(heads, rows // heads // 2, 2, *rest).swapaxes(1, 2).reshape(a.shape)


def llama_tensor(
    stem: str, arrays: dict[str, mx.array], config: Mapping[str, Any], is_float: bool
) -> dict[str, mx.array]:
    """llama.cpp's converter interleaves llama models' q/k rows for its RoPE: undone."""
    if stem.endswith((".attn_q", ".attn_k")):
        key = "num_attention_heads" if stem.endswith(".attn_q") else "num_key_value_heads"
        return {k: _unpermute(v, config[key]) for k, v in arrays.items()}
    return arrays


def gemma_tensor(
    stem: str, arrays: dict[str, mx.array], config: Mapping[str, Any], is_float: bool
) -> dict[str, mx.array]:
    """Gemma's norms are stored as 1 + weight: undone."""
    import mlx.core as mx

    if stem.endswith("norm") and is_float:
        return {"": arrays[""].astype(mx.float32) - 1}
    return arrays


def phi3_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """Phi-3 rotates part of each head: its share from ``rope.dimension_count``."""
    rope_dims = get("rope.dimension_count")
    if rope_dims is not None:
        heads = common["num_attention_heads"]
        common["partial_rotary_factor"] = int(rope_dims) / (common["hidden_size"] // heads)
    return common


LLAMA = register(
    Family("llama", ("llama",), gguf_architectures=("llama",), fix_tensor=llama_tensor)
)
QWEN2 = register(Family("qwen2", ("qwen2",), gguf_architectures=("qwen2",)))
QWEN3 = register(Family("qwen3", ("qwen3",), gguf_architectures=("qwen3",)))
GEMMA = register(
    Family("gemma", ("gemma",), gguf_architectures=("gemma",), fix_tensor=gemma_tensor)
)
PHI3 = register(Family("phi3", ("phi3",), gguf_architectures=("phi3",), gguf_config=phi3_config))
