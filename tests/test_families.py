"""The model-family registry: one place per family for its chat format, CPU dtype and GGUF
mapping; the load paths (directory and GGUF) ask it and nothing else branches on a family."""

from pathlib import Path

import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.families import (
    Family,
    chat_format_for,
    families,
    family_for,
    gguf_architectures,
    gpt_oss,
    register,
)
from mlx_harmony_core.families import registry as registry_module

PACKAGE = Path(mhc.__file__).parent


def test_built_in_families():
    names = {f.name for f in families()}
    assert {"gpt-oss", "llama", "qwen2", "qwen3", "gemma", "phi3"} <= names
    assert gguf_architectures()["gpt-oss"] == "gpt_oss"
    assert family_for(arch="gpt-oss") is family_for(model_type="gpt_oss") is gpt_oss.FAMILY
    assert gpt_oss.FAMILY.cpu_dtype == "float32"
    assert family_for(arch="llama").fix_tensor is not None
    assert family_for(arch="no-such-arch") is None
    # Any other mlx-lm model type talks through its tokenizer's chat template.
    other = family_for(model_type="mamba")
    assert other.name == "mamba" and other.cpu_dtype is None and other.fix_tensor is None
    with pytest.raises(TypeError):
        family_for()


def test_chat_format_is_picked_by_the_family(demo_engine):
    def no_tokenizer():
        raise AssertionError("Harmony needs no tokenizer")

    assert isinstance(chat_format_for("gpt_oss", no_tokenizer), mhc.HarmonyFormat)
    assert isinstance(demo_engine.chat_format, mhc.HarmonyFormat)


def test_a_family_with_its_own_chat_format_is_one_registration(monkeypatch):
    monkeypatch.setattr(registry_module, "_BY_MODEL_TYPE", dict(registry_module._BY_MODEL_TYPE))
    monkeypatch.setattr(registry_module, "_BY_ARCH", dict(registry_module._BY_ARCH))
    made = []

    def own_format(load_tokenizer):
        made.append(load_tokenizer())
        return mhc.HarmonyFormat()

    register(Family("toy", ("toy",), gguf_architectures=("toy",), chat_format=own_format))
    assert isinstance(chat_format_for("toy", lambda: "tok"), mhc.HarmonyFormat)
    assert made == ["tok"] and gguf_architectures()["toy"] == "toy"


def test_the_gpt_oss_config_is_built_once():
    cfg = gpt_oss.config(layers=4)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"] * 2
    common = {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 1000,
        "rope_theta": 150000.0,
        "intermediate_size": 999,
    }
    meta = {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32}
    mapped = gpt_oss.gguf_config(lambda k, d=None: meta.get(k, d), dict(common))
    built = gpt_oss.config(intermediate_size=32, vocab_size=1000)
    built.pop("torch_dtype")
    assert mapped == {**built, "rope_theta": 150000.0}


def test_no_model_type_branches_outside_families():
    for path in PACKAGE.rglob("*.py"):
        if "families" in path.parts:
            continue
        text = path.read_text()
        for needle in ('== "gpt_oss"', '!= "gpt_oss"', '== "gpt-oss"', 'arch == "'):
            assert needle not in text, (path, needle)
