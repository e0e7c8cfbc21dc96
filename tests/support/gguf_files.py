"""GGUF files written the way llama.cpp's converter writes them (its tensor names, its q/k
row permutation for llama, Gemma's norm offset), from mlx-lm weights, for the loader's tests."""

import json

import gguf
import mlx.core as mx
import numpy as np
from gguf import quants


def _table(arch, layers):
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(archs[arch], layers)


def _permute(w, heads):  # llama.cpp's convert_hf_to_gguf.LlamaModel.permute
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# mlx-lm stacks experts as switch_mlp.*; llama.cpp's tables name them experts.* (Mixtral: w1/w3/w2).
_EXPERT_ALIASES = (
    ("switch_mlp.gate_proj", "experts.w1"),
    ("switch_mlp.up_proj", "experts.w3"),
    ("switch_mlp.down_proj", "experts.w2"),
    ("switch_mlp", "experts"),
)


def _gguf_name(table, base):
    name = table.get_name(base)
    for ours, theirs in _EXPERT_ALIASES:
        if name is None and ours in base:
            name = table.get_name(base.replace(ours, theirs))
    assert name is not None, base
    return name


def write_gguf(path, arch, config, weights, *, qtype=None, tokenizer=None, meta=None):
    """``weights``: mlx-lm names -> float32 numpy arrays. 2-D weights wider than 32 are
    stored as ``qtype`` when given (else F32)."""
    table = _table(arch, config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(config["num_hidden_layers"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-5))
    w.add_rope_freq_base(config.get("rope_theta", 10000.0))
    w.add_context_length(config.get("max_position_embeddings", 2048))
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    for key, value in (meta or {}).items():
        getattr(w, key)(value)
    if tokenizer is not None:
        _add_tokenizer(w, tokenizer)
    for name, a in weights.items():
        base, _, suffix = name.rpartition(".")
        if suffix not in ("weight", "bias"):
            base, suffix = name, "weight"
        g = f"{_gguf_name(table, base)}.{suffix}"
        a = np.asarray(a, dtype=np.float32)
        if arch in ("llama", "granite") and base.endswith(("q_proj", "k_proj")):
            heads = config["num_attention_heads" if "q_proj" in base else "num_key_value_heads"]
            a = _permute(a, heads)
        if arch in ("gemma", "gemma2", "gemma3") and base.endswith("norm"):
            a = a + 1
        kind = qtype(g, a) if callable(qtype) else qtype
        if kind is not None and a.ndim >= 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(g, quants.quantize(a, kind), raw_dtype=kind)
        else:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_tokenizer(w, hf):
    """A Hugging Face BPE tokenizer's vocabulary as llama.cpp's tokenizer.ggml.* keys."""
    data = json.loads(hf.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    for t in data["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [None] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
        tokens[i] = t
    special = {t["id"] for t in data["added_tokens"] if t["special"]}
    merges = [" ".join(m) if isinstance(m, list) else m for m in data["model"]["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # a GPT-2-style BPE, as llama.cpp names it
    w.add_token_list(tokens)
    w.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    w.add_token_merges(merges)
    w.add_eos_token_id(hf.convert_tokens_to_ids(hf.eos_token))
    w.add_chat_template(hf.chat_template)


def random_model(config, seed=0):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    params = {
        k: mx.random.normal(v.shape) * (0.02 if v.ndim > 1 else 1.0) + (1.0 if v.ndim == 1 else 0)
        for k, v in tree_flatten(model.parameters())
    }
    model.load_weights(list(params.items()))
    return model, {k: np.array(v) for k, v in params.items()}
