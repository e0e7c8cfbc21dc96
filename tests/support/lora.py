"""Random LoRA adapters for the demo model, written as mlx-lm writes them (shared by the
adapter tests of the loader and of the several-models server)."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_harmony_core.models.builder import demo_model_path

CONFIG = {
    "fine_tune_type": "lora",
    "num_layers": 2,
    "lora_parameters": {
        "rank": 4,
        "scale": 4.0,
        "dropout": 0.0,
        "keys": ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"],
    },
}


def write_adapters(out: Path, seed: int) -> Path:
    """Write random LoRA weights (``adapters.safetensors`` + ``adapter_config.json``) for the
    demo model into ``out`` and return it."""
    from mlx_lm import load as lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = lm_load(str(demo_model_path()))
    model.freeze()
    linear_to_lora_layers(model, CONFIG["num_layers"], CONFIG["lora_parameters"])
    mx.random.seed(seed)
    params = {
        k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())
    }
    assert params and all("lora_" in k for k in params)
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    (out / "adapter_config.json").write_text(json.dumps(CONFIG))
    return out
