"""Random-weight GPT-OSS GGUF files laid out the way llama.cpp's converter writes them
(MXFP4 experts, Q8_0 for the other matrices, F32 vectors), written tensor by tensor: the
loader's memory tests and the GGUF load benchmark (gpt-oss-20b's shapes: ~12 GB) use them.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


def make_test_gguf(
    path: str | os.PathLike[str],
    *,
    preset: str = "demo",
    seed: int = 0,
    tokenizer: bool = False,
    **shape: int,
) -> Path:
    """Write a random-weight GPT-OSS ``.gguf`` of a :data:`~.loading.PRESETS` shape
    (keyword arguments override it, as for ``make_test_model``; ``vocab_size`` too).

    Experts are MXFP4 (random codes, E8M0 scales near the uniform init's size), the other
    matrices Q8_0, vectors F32. No tensor is ever held with another: the file may be far
    larger than memory. ``tokenizer=True`` adds o200k_harmony as llama.cpp's
    ``tokenizer.ggml.*`` keys (llama.cpp needs it; needs the full vocabulary).
    """
    import gguf
    from gguf import GGMLQuantizationType as Q
    from mlx.utils import tree_flatten
    from mlx_lm.models import gpt_oss

    from .builder import PRESETS, gpt_oss_config

    config = gpt_oss_config(**{**PRESETS[preset], **shape})
    model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(config))  # lazy: shapes only
    shapes = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    del model
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    table = gguf.get_tensor_name_map(archs["gpt-oss"], config["num_hidden_layers"])

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), "gpt-oss")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_expert_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_rope_freq_base(float(config["rope_theta"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_expert_count(config["num_local_experts"])
    w.add_expert_used_count(config["num_experts_per_tok"])
    w.add_sliding_window(config["sliding_window"])
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(config["rope_scaling"]["factor"])
    w.add_rope_scaling_orig_ctx_len(config["rope_scaling"]["original_max_position_embeddings"])
    if tokenizer:
        _add_o200k(w, config["vocab_size"])

    plan = []  # (gguf name, numpy shape, type)
    for name, shp in shapes.items():
        base, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = name, "weight"  # a bare parameter (sinks) is stored as NAME.weight
        g = f"{table.get_name(base)}.{suffix}"
        if len(shp) == 3 and suffix == "weight":
            kind = Q.MXFP4
        elif len(shp) == 2 and suffix == "weight" and ".ffn_gate_inp." not in g:
            kind = Q.Q8_0  # llama.cpp's converter keeps the router in F32
        else:
            kind = Q.F32
        plan.append((g, shp, kind))
    for g, shp, kind in plan:
        nbytes = _nbytes(shp, kind)
        if kind == Q.F32:
            w.add_tensor_info(g, shp, np.dtype(np.float32), nbytes)
        else:
            block, size = gguf.GGML_QUANT_SIZES[kind]
            w.add_tensor_info(
                g, (*shp[:-1], shp[-1] // block * size), np.dtype(np.uint8), nbytes, kind
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for g, shp, kind in plan:
        w.write_tensor_data(_random_tensor(rng, g, shp, kind))
    w.close()
    logger.info("wrote %s (%.2f GB)", out, out.stat().st_size / 1e9)
    return out


def _nbytes(shape: tuple[int, ...], kind: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[kind]
    return math.prod(shape) // block * size


def _random_tensor(rng: np.random.Generator, name: str, shape: tuple[int, ...], kind: Any) -> Any:
    """One tensor's bytes (a float32 array for F32): sizes like mlx-lm's init."""
    from gguf import GGMLQuantizationType as Q

    if kind == Q.F32:
        if name.endswith("norm.weight"):
            return np.ones(shape, np.float32)
        if "attn_sinks" in name:
            return rng.standard_normal(shape, dtype=np.float32)
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
    rows, blocks = math.prod(shape[:-1]), shape[-1] // 32
    scale = math.sqrt(1 / shape[-1]) * (4.0 if name.startswith("output.") else 1.0)
    if kind == Q.MXFP4:  # e (E8M0, ggml halves it) + 16 bytes of e2m1 codes
        exponent = 127 + round(math.log2(scale / math.sqrt(3) / 2.93))
        out = np.empty((rows, blocks, 17), np.uint8)
        out[..., 0] = rng.integers(exponent - 1, exponent + 2, (rows, blocks), dtype=np.uint8)
        out[..., 1:] = rng.integers(0, 256, (rows, blocks, 16), dtype=np.uint8)
    else:  # Q8_0: d (float16) + 32 int8 codes
        out = np.empty((rows, blocks, 34), np.uint8)
        d = np.full((rows, blocks), scale / 128, np.float16)  # codes' std is ~74
        out[..., :2] = d.view(np.uint8).reshape(rows, blocks, 2)
        out[..., 2:] = rng.integers(0, 256, (rows, blocks, 32), dtype=np.uint8)
    return out.reshape(*shape[:-1], -1)


def _add_o200k(w: Any, vocab_size: int) -> None:
    """o200k_harmony as llama.cpp's byte-level BPE keys (tokens, types, merges)."""
    import json

    from ..harmony import VOCAB_SIZE, hf_tokenizer

    if vocab_size != VOCAB_SIZE:
        raise ValueError(f"tokenizer=True needs vocab_size {VOCAB_SIZE}, got {vocab_size}")
    data = json.loads(hf_tokenizer().to_str())
    tokens = [""] * VOCAB_SIZE
    for t, i in data["model"]["vocab"].items():
        tokens[i] = t
    special = set()
    for t in data["added_tokens"]:
        tokens[t["id"]] = t["content"]
        special.add(t["id"])
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-4o")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(VOCAB_SIZE)])
    w.add_token_merges(merges)
    w.add_bos_token_id(199998)
    w.add_eos_token_id(200002)
    w.add_pad_token_id(199999)
