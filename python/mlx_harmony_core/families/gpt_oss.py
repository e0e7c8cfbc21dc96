"""GPT-OSS: the Harmony chat format, its config (built here once, for test models and GGUF
files alike), float32 on the CPU, and its Hugging Face tokenizer files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import Family, MetadataGetter, TokenizerLoader, register

if TYPE_CHECKING:
    from ..chat_format import ChatFormat

__all__ = ["FAMILY", "config", "write_hf_tokenizer"]


def config(
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
    rope_factor: float = 32.0,
    original_context: int = 4096,
) -> dict[str, Any]:
    """A GPT-OSS ``config.json`` with the released models' layer pattern, RoPE and window
    (``vocab_size`` defaults to o200k_harmony's)."""
    if vocab_size is None:
        from ..harmony import VOCAB_SIZE

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
        # The released models alternate sliding and full attention, sliding first.
        "layer_types": [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ],
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000,
        "rope_scaling": {
            "rope_type": "yarn",
            "factor": rope_factor,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": original_context,
            "truncate": False,
        },
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "eos_token_id": 200002,
        "pad_token_id": 199999,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


# The keys the file's GPT-OSS metadata decides over the common mapping's.
_OWN_KEYS = (
    "num_local_experts",
    "num_experts_per_tok",
    "experts_per_token",
    "intermediate_size",
    "sliding_window",
    "layer_types",
    "rope_scaling",
)


def gguf_config(get: MetadataGetter, common: dict[str, Any]) -> dict[str, Any]:
    """A GGUF file's GPT-OSS config: :func:`config` from its metadata, the common mapping's
    values (RoPE base, norm epsilon, context, vocabulary) over the defaults."""
    built = config(
        layers=common["num_hidden_layers"],
        hidden_size=common["hidden_size"],
        intermediate_size=int(get("expert_feed_forward_length", get("feed_forward_length"))),
        heads=common["num_attention_heads"],
        kv_heads=common["num_key_value_heads"],
        head_dim=common.get("head_dim", 64),  # mlx-lm's default
        experts=int(get("expert_count")),
        experts_per_token=int(get("expert_used_count")),
        vocab_size=common["vocab_size"],
        sliding_window=int(get("attention.sliding_window", 128)),
        rope_factor=float(get("rope.scaling.factor", 32.0)),
        original_context=int(get("rope.scaling.original_context_length", 4096)),
    )
    built.pop("torch_dtype")  # the file's tensors keep their own types
    return {**built, **common, **{k: built[k] for k in _OWN_KEYS}}


def write_hf_tokenizer(directory: str | os.PathLike[str]) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the Harmony chat template),
    special_tokens_map.json and generation_config.json into a model directory, as real
    GPT-OSS checkpoints ship them, so Hugging Face tools (mlx_lm.server) can load it."""
    from importlib import resources

    from .._paths import atomic_write_text
    from ..harmony import hf_tokenizer, o200k_harmony_bytes

    out = Path(directory)
    table = o200k_harmony_bytes()
    name = {i: table[i].decode() for i in (199998, 199999, 200002, 200012)}
    hf_tokenizer().save(str(out / "tokenizer.json"))
    template = resources.files("mlx_harmony_core").joinpath("data", "harmony_chat_template.jinja")
    special = {"bos_token": name[199998], "eos_token": name[200002], "pad_token": name[199999]}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "chat_template": template.read_text(encoding="utf-8"),
        **special,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(tokenizer_config, indent=2) + "\n")
    atomic_write_text(out / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
    stops = {
        "bos_token_id": 199998,
        "eos_token_id": [200002, 199999, 200012],
        "pad_token_id": 199999,
    }
    atomic_write_text(out / "generation_config.json", json.dumps(stops, indent=2) + "\n")


def harmony_format(load_tokenizer: TokenizerLoader) -> ChatFormat:
    """Harmony (o200k_harmony's own vocabulary: the model's tokenizer is not needed)."""
    from ..harmony import HarmonyFormat

    return HarmonyFormat()


FAMILY = register(
    Family(
        name="gpt-oss",
        model_types=("gpt_oss",),
        gguf_architectures=("gpt-oss",),
        chat_format=harmony_format,
        # MLX's CPU expert gather-matmul rejects bfloat16.
        cpu_dtype="float32",
        gguf_required=("expert_count", "expert_used_count"),
        gguf_config=gguf_config,
        write_tokenizer=write_hf_tokenizer,
    )
)
