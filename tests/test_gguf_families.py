"""Every family the registry maps from GGUF, beyond the first five (test_gguf.py): a random
mlx-lm model written the way llama.cpp's converter writes it (its names, metadata keys and
tensor changes) loads with the same logits as mlx-lm on the same weights, float and Q8_0."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.families import family_for, gguf_architectures
from mlx_harmony_core.models import gguf as ours

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from support.gguf_files import random_model, write_gguf  # noqa: E402

_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
# arch -> (the mlx-lm config beyond the common one, the metadata llama.cpp writes for it)
FAMILIES = {
    "mixtral": (
        dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
        dict(add_expert_count=4, add_expert_used_count=2),
    ),
    "qwen2moe": (
        dict(model_type="qwen2_moe", shared_expert_intermediate_size=48, **_EXPERTS),
        dict(
            add_expert_count=4,
            add_expert_used_count=2,
            add_expert_feed_forward_length=32,
            add_expert_shared_feed_forward_length=48,
        ),
    ),
    "qwen3moe": (
        dict(
            model_type="qwen3_moe",
            head_dim=16,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
            **_EXPERTS,
        ),
        dict(add_expert_count=4, add_expert_used_count=2, add_expert_feed_forward_length=32),
    ),
    "gemma2": (
        dict(
            model_type="gemma2",
            head_dim=16,
            query_pre_attn_scalar=16.0,
            attn_logit_softcapping=20.0,
            final_logit_softcapping=15.0,
        ),
        dict(add_attn_logit_softcapping=20.0, add_final_logit_softcapping=15.0),
    ),
    "gemma3": (
        dict(
            model_type="gemma3_text",
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=4,
            sliding_window_pattern=6,
            rope_local_base_freq=10000.0,
            rope_theta=1000000.0,
        ),
        dict(add_sliding_window=4),
    ),
    "starcoder2": (
        dict(model_type="starcoder2", norm_epsilon=1e-5, rope_theta=100000.0),
        dict(add_layer_norm_eps=1e-5),
    ),
    "olmo2": (dict(model_type="olmo2"), {}),
    "granite": (
        dict(
            model_type="granite",
            attention_multiplier=0.2,
            embedding_multiplier=3.0,
            residual_multiplier=0.5,
            logits_scaling=4.0,
            attention_bias=False,
            mlp_bias=False,
        ),
        dict(
            add_attention_scale=0.2,
            add_embedding_scale=3.0,
            add_residual_scale=0.5,
            add_logit_scale=4.0,
        ),
    ),
}
_ARCH = {"mixtral": "llama"}  # llama.cpp writes Mixtral as a llama file with experts


@pytest.fixture(scope="module")
def hf_tokenizer():
    from support.bpe import trained_tokenizer

    return trained_tokenizer("hello world, the capital of France is Paris. 1234", 300)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("qtype", [None, Q.Q8_0])
def test_families_load_like_mlx_lm(tmp_path, hf_tokenizer, name, qtype):
    extra, meta = FAMILIES[name]
    arch = _ARCH.get(name, name)
    config = {
        "num_hidden_layers": 7 if name == "gemma3" else 2,  # gemma3: a global layer too
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": len(hf_tokenizer),
        "tie_word_embeddings": name in ("gemma2", "gemma3"),
        "max_position_embeddings": 512,
        **extra,
    }
    model, weights = random_model(config)
    path = tmp_path / f"{name}.gguf"
    write_gguf(path, arch, config, weights, qtype=qtype, tokenizer=hf_tokenizer, meta=meta)
    engine = mhc.load(path)
    prompt = mx.array([[5, 17, 3, 99, 42, 7, 8, 9, 10, 11]])
    want = (model if qtype is None else ours.load_gguf(path, dequantize=True)[0])(prompt)
    got = engine.model(prompt)
    want = np.array(want)
    # Q8_0: our quantized kernels against float math on the same values; the rounding
    # grows with the logits' scale (Gemma multiplies its embeddings by sqrt(hidden)).
    atol = 2e-3 if qtype is None else 1e-2 * np.abs(want).max()
    np.testing.assert_allclose(np.array(got), want, rtol=1e-3, atol=atol)
    assert engine.chat_format.encode("hello world") == hf_tokenizer.encode("hello world")


def test_registry_names_the_new_families():
    archs = gguf_architectures()
    for arch, model_type in [
        ("qwen2moe", "qwen2_moe"),
        ("qwen3moe", "qwen3_moe"),
        ("gemma2", "gemma2"),
        ("gemma3", "gemma3_text"),
        ("starcoder2", "starcoder2"),
        ("olmo2", "olmo2"),
        ("granite", "granite"),
    ]:
        assert archs[arch] == model_type
    assert family_for(model_type="mixtral").name == "llama"
