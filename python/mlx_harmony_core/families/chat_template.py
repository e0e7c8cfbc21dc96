"""The families that talk through their tokenizer's chat template and load from GGUF files:
llama (SmolLM2, Mistral-style files and Mixtral too), qwen2, qwen3, their MoE versions,
gemma, gemma2, gemma3, phi3, starcoder2, olmo2. Each differs from the common GGUF mapping
only in its own metadata keys and what llama.cpp's converter changed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .registry import Family, MetadataGetter, register

if TYPE_CHECKING:
    import mlx.core as mx

__all__ = [
    "GEMMA",
    "GEMMA2",
    "GEMMA3",
    "GRANITE",
    "LLAMA",
    "OLMO2",
    "PHI3",
    "QWEN2",
    "QWEN2_MOE",
    "QWEN3",
    "QWEN3_MOE",
    "STARCODER2",
]


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


def llama_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """A ``llama`` file with experts is Mixtral (llama.cpp writes both as ``llama``)."""
    experts = get("expert_count")
    if experts:
        common["model_type"] = "mixtral"
        common["num_local_experts"] = int(experts)
        common["num_experts_per_tok"] = int(get("expert_used_count", 2))
    return common


def _moe(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """The expert keys Qwen's MoE models share."""
    common["num_experts"] = int(get("expert_count"))
    common["num_experts_per_tok"] = int(get("expert_used_count"))
    common["moe_intermediate_size"] = int(get("expert_feed_forward_length"))
    return common


def qwen2_moe_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE: routed experts plus one gated shared expert."""
    common = _moe(get, common)
    common["shared_expert_intermediate_size"] = int(get("expert_shared_feed_forward_length"))
    return common


def qwen3_moe_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-MoE: every layer sparse, top-k weights renormalized (as llama.cpp runs it)."""
    common = _moe(get, common)
    common.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True)
    common.setdefault("head_dim", common["hidden_size"] // common["num_attention_heads"])
    return common


def _query_scale(common: dict[str, Any], big_layers: int) -> float:
    """Gemma's query scale: 1/sqrt(head_dim), except the 27B models' 1/sqrt(hidden/heads)
    (llama.cpp tells the 27B models by their layer count, the file has no key for it)."""
    if common["num_hidden_layers"] == big_layers:
        return common["hidden_size"] / common["num_attention_heads"]
    return float(common["head_dim"])


def gemma2_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2: logit soft-capping (attention and final) from the file."""
    common["attn_logit_softcapping"] = float(get("attn_logit_softcapping", 50.0))
    common["final_logit_softcapping"] = float(get("final_logit_softcapping", 30.0))
    common["query_pre_attn_scalar"] = _query_scale(common, 46)
    return common


def gemma3_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3 (text): five sliding-window layers per global one with a local RoPE base of
    10000, as llama.cpp hard-codes them; the file's RoPE base is the global layers'."""
    common["sliding_window"] = int(get("attention.sliding_window", 512))
    common["sliding_window_pattern"] = 6
    common["rope_local_base_freq"] = 10000.0
    common["query_pre_attn_scalar"] = _query_scale(common, 62)
    return common


def granite_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """Granite: llama's layout with four multipliers (llama.cpp's ``*_scale`` keys)."""
    common.update(
        attention_multiplier=float(get("attention.scale", 1.0)),
        embedding_multiplier=float(get("embedding_scale", 1.0)),
        residual_multiplier=float(get("residual_scale", 1.0)),
        logits_scaling=float(get("logit_scale", 1.0)),
        attention_bias=False,
        mlp_bias=False,
    )
    return common


def starcoder2_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """StarCoder2 uses LayerNorm: its epsilon is ``layer_norm_epsilon``."""
    common["norm_epsilon"] = float(get("attention.layer_norm_epsilon", 1e-5))
    return common


LLAMA = register(
    Family(
        "llama",
        ("llama", "mistral", "mixtral"),
        gguf_architectures=("llama",),
        gguf_config=llama_config,
        fix_tensor=llama_tensor,
    )
)
QWEN2 = register(Family("qwen2", ("qwen2",), gguf_architectures=("qwen2",)))
QWEN3 = register(Family("qwen3", ("qwen3",), gguf_architectures=("qwen3",)))
GEMMA = register(
    Family("gemma", ("gemma",), gguf_architectures=("gemma",), fix_tensor=gemma_tensor)
)
PHI3 = register(Family("phi3", ("phi3",), gguf_architectures=("phi3",), gguf_config=phi3_config))
QWEN2_MOE = register(
    Family(
        "qwen2_moe",
        ("qwen2_moe",),
        gguf_architectures=("qwen2moe",),
        gguf_required=("expert_count", "expert_used_count", "expert_feed_forward_length"),
        gguf_config=qwen2_moe_config,
    )
)
QWEN3_MOE = register(
    Family(
        "qwen3_moe",
        ("qwen3_moe",),
        gguf_architectures=("qwen3moe",),
        gguf_required=("expert_count", "expert_used_count", "expert_feed_forward_length"),
        gguf_config=qwen3_moe_config,
    )
)
GEMMA2 = register(
    Family(
        "gemma2",
        ("gemma2",),
        gguf_architectures=("gemma2",),
        gguf_required=("attention.key_length",),
        gguf_config=gemma2_config,
        fix_tensor=gemma_tensor,
    )
)
GEMMA3 = register(
    Family(
        "gemma3",
        ("gemma3_text",),
        gguf_architectures=("gemma3",),
        gguf_required=("attention.key_length",),
        gguf_config=gemma3_config,
        fix_tensor=gemma_tensor,
    )
)
STARCODER2 = register(
    Family(
        "starcoder2",
        ("starcoder2",),
        gguf_architectures=("starcoder2",),
        gguf_config=starcoder2_config,
    )
)
GRANITE = register(
    Family(
        "granite",
        ("granite",),
        gguf_architectures=("granite",),
        gguf_config=granite_config,
        fix_tensor=llama_tensor,
    )
)
OLMO2 = register(Family("olmo2", ("olmo2",), gguf_architectures=("olmo2",)))
