"""GGUF files load directly: every tensor type against the ``gguf`` package's own numpy
reference, each architecture against mlx-lm on the same weights (files written with
llama.cpp's names and conventions), GPT-OSS with MXFP4 experts, and the real SmolLM2-135M."""

import json

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.cpu import quant
from mlx_harmony_core.models import gguf as ours

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import quants  # noqa: E402

from support.gguf_files import random_model as _random_model  # noqa: E402
from support.gguf_files import write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def hf_tokenizer():
    from support.bpe import trained_tokenizer

    return trained_tokenizer("hello world, the capital of France is Paris. 1234", 300)


def _ids(out):
    """apply_chat_template's ids (a list, or a BatchEncoding in newer transformers)."""
    return list(out["input_ids"] if hasattr(out, "keys") else out)


# -- tensor types --------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.MXFP4])
@pytest.mark.parametrize("shape", [(7, 64), (3, 5, 96), (1, 32)])
def test_every_type_matches_the_reference(tmp_path, kind, shape, rng):
    a = (rng.standard_normal(shape) * 2).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    if kind in (Q.F32,):
        w.add_tensor("x", a)
    elif kind == Q.F16:
        w.add_tensor("x", a.astype(np.float16))
    else:
        w.add_tensor("x", quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = ours.read_gguf(tmp_path / "t.gguf")
    info = header.tensors["x"]
    assert info.shape == shape
    import mmap

    with open(header.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        arrays = ours.tensor_arrays(header, buf, info)
        if len(arrays) == 1:
            got = np.array(arrays[""].astype(mx.float32))
        else:
            bits, group, mode = ours._QUANTIZED[info.type]
            got = np.array(
                mx.dequantize(
                    arrays[""], arrays["scales"], arrays.get("biases"), group, bits, mode=mode
                ).astype(mx.float32)
            )
    raw = np.frombuffer(header.path.read_bytes(), np.uint8)[info.offset : info.offset + info.nbytes]
    ref = quants.dequantize(raw.reshape(*shape[:-1], -1), kind) if kind not in (Q.F32, Q.F16) else a
    if kind == Q.F16:
        ref = a.astype(np.float16).astype(np.float32)
    if kind == Q.BF16:
        ref = quants.dequantize(raw.reshape(*shape[:-1], -1), kind)
    # MLX's affine form (scale * q + bias, in float16 like mx.load's) rounds the bias -8d /
    # -128d to float16: within an ulp of the block's largest value.
    atol = 1e-6 if kind in (Q.F32, Q.F16, Q.BF16, Q.MXFP4) else np.abs(a).max() * 2**-10
    np.testing.assert_allclose(
        got, np.asarray(ref, np.float32).reshape(shape), rtol=1e-3, atol=atol
    )


def test_unknown_types_and_bad_files_are_clear_errors(tmp_path, rng):
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    # (K-quants load since issue 34; the i-quants still do not)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 66), np.uint8), raw_dtype=Q.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = ours.read_gguf(tmp_path / "k.gguf")
    import mmap

    with (
        open(header.path, "rb") as f,
        mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf,
        pytest.raises(mhc.ModelLoadError, match="IQ2_XXS"),
    ):
        ours.tensor_arrays(header, buf, header.tensors["blk.0.attn_q.weight"])
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x05")
    with pytest.raises(mhc.ModelLoadError, match="truncated"):
        mhc.load(tmp_path / "bad.gguf")
    (tmp_path / "not.gguf").write_bytes(b"hello")
    with pytest.raises(mhc.ModelLoadError, match="not a GGUF"):
        mhc.load(tmp_path / "not.gguf")
    with pytest.raises(mhc.ModelLoadError, match="does not exist"):
        mhc.load(tmp_path / "missing.gguf")


def test_a_model_too_big_for_memory_is_refused(tmp_path, rng):
    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((64, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(mhc.ModelLoadError, match=r"needs 0\.0 GiB.*only 0\.0 GiB"):
        ours.check_memory(ours.read_gguf(path), available=1000)


# -- architectures ------------------------------------------------------------------------------
ARCHS = {
    "llama": dict(model_type="llama"),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "gemma": dict(model_type="gemma", head_dim=16),
    "phi3": dict(model_type="phi3"),
}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("qtype", [None, Q.Q8_0])
def test_architectures_load_like_mlx_lm(tmp_path, hf_tokenizer, arch, qtype):
    config = {
        **ARCHS[arch],
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": len(hf_tokenizer),
        "tie_word_embeddings": arch == "gemma",
        "max_position_embeddings": 512,
    }
    model, weights = _random_model(config)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, config, weights, qtype=qtype, tokenizer=hf_tokenizer)
    engine = mhc.load(path)
    prompt = mx.array([[5, 17, 3, 99, 42, 7]])
    if qtype is None:
        want = model(prompt)
    else:  # the reference: mlx-lm on the same Q8_0 values, dequantized
        deq = ours.load_gguf(path, dequantize=True)[0]
        want = deq(prompt)
    got = engine.model(prompt)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-3, atol=2e-3)
    # The tokenizer built from the file encodes and renders as the original does.
    fmt = engine.chat_format
    for text in ["hello world", "the capital of France is Paris.", "1234 é 🙂\n\tx"]:
        assert fmt.encode(text) == hf_tokenizer.encode(text)
    chat = [{"role": "user", "content": "hello"}]
    assert fmt.render(chat) == _ids(
        hf_tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    )
    assert fmt.stop_ids() == [hf_tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_gpt_oss_with_mxfp4_experts_matches_safetensors(tmp_path, demo_engine):
    """A GPT-OSS GGUF as llama.cpp writes it (MXFP4 experts) generates the same tokens as
    the same weights from safetensors."""
    from mlx.utils import tree_flatten

    from mlx_harmony_core.models.builder import gpt_oss_config, make_test_model

    src = make_test_model(tmp_path / "src", preset="demo", seed=3)
    config = json.loads((src / "config.json").read_text())
    weights = {k: np.array(v) for k, v in tree_flatten(mhc.load(src).model.parameters())}
    # The experts as MXFP4 hold these values: the safetensors copy gets them dequantized.
    experts = {k for k in weights if ".experts." in k and k.endswith(".weight")}
    for k in experts:
        weights[k] = quants.dequantize(quants.quantize(weights[k], Q.MXFP4), Q.MXFP4)
    mx.save_safetensors(
        str(src / "model.safetensors"), {k: mx.array(v) for k, v in weights.items()}
    )
    meta = {
        "add_expert_count": config["num_local_experts"],
        "add_expert_used_count": config["num_experts_per_tok"],
        "add_sliding_window": config["sliding_window"],
    }
    assert gpt_oss_config()["layer_types"][0] == "sliding_attention"
    path = tmp_path / "gpt-oss.gguf"
    write_gguf(
        path,
        "gpt-oss",
        {**config, "max_position_embeddings": 131072},
        weights,
        qtype=lambda name, a: Q.MXFP4 if "_exps" in name and name.endswith(".weight") else None,
        meta=meta,
    )
    header = ours.read_gguf(path)
    assert {header.tensors[k].type_name for k in header.tensors if "_exps.weight" in k} == {"MXFP4"}
    a, b = mhc.load(src), mhc.load(path)
    assert b.chat_format.name == "harmony"
    assert b.config["quantization"]["mode"] == "mxfp4"
    params = mhc.SamplingParams(temperature=0.0)
    ta = a.generate("hello", params, max_tokens=60, ignore_eos=True).tokens
    tb = b.generate("hello", params, max_tokens=60, ignore_eos=True).tokens
    assert ta == tb


# -- the real SmolLM2-135M-Instruct ------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    """As the file holds it: Q4_1 (and a Q8_0 embedding), quantized in memory."""
    return mhc.load(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_f32(smollm2_path):
    """The same weights dequantized to float32 (MLX's CPU quantized kernels are slow)."""
    return mhc.load(smollm2_path, dequantize=True)


QUESTIONS = [
    ("What is the capital of France?", "Paris"),
    ("What is 2+2?", "4"),
    ("What color is the sky on a clear day?", "blue"),
]
GREEDY = mhc.SamplingParams(temperature=0.0)


def test_smollm2_answers_and_stops_at_end_of_turn(smollm2, smollm2_f32):
    c = smollm2.generate([{"role": "user", "content": QUESTIONS[0][0]}], GREEDY, max_tokens=24)
    assert "Paris" in c.text and c.finish_reason == "stop"
    end = smollm2_f32.chat_format.stop_ids()
    tok = smollm2_f32.tokenizer
    for question, answer in QUESTIONS:
        chat = [{"role": "user", "content": question}]
        c = smollm2_f32.generate(chat, GREEDY, max_tokens=128)
        assert answer in c.text, (question, c.text)
        assert c.finish_reason == "stop" and c.tokens[-1] in end
        assert tok.convert_ids_to_tokens(c.tokens[-1]) == "<|im_end|>"
        assert c.text == tok.decode(c.tokens[:-1])  # no byte-level artefacts
        streamed = "".join(e.delta for e in smollm2_f32.stream(chat, GREEDY, max_tokens=128))
        assert streamed == c.text


def test_smollm2_tokens_equal_mlx_lm(smollm2_f32, smollm2_path, tmp_path, monkeypatch):
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import generate_step

    directory = ours.save_mlx(smollm2_path, tmp_path / "smol", dequantize=True)
    model, tokenizer = mlx_lm_load(str(directory))
    chat = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three fruits."},
        {"role": "assistant", "content": "Apple, pear, plum."},
        {"role": "user", "content": "And three colors?"},
    ]
    ids = _ids(tokenizer.apply_chat_template(chat, add_generation_prompt=True))
    assert smollm2_f32.chat_format.render(chat) == ids  # the template renders as HF's
    theirs = []
    for token, _ in generate_step(
        mx.array(ids), model, max_tokens=32, sampler=lambda x: mx.argmax(x, -1)
    ):
        theirs.append(int(token))
    mine = smollm2_f32.generate(ids, GREEDY, max_tokens=32, ignore_eos=True)
    assert mine.tokens == theirs
    # The quantized file converts to a quantized mlx-lm directory holding the same model.
    quantized = ours.save_mlx(smollm2_path, tmp_path / "smol-q4")
    model_q, _ = mlx_lm_load(str(quantized))
    prompt = mx.array([ids])
    # convert writes the repacked layout (a mapped load computes on GGUF's own blocks)
    monkeypatch.setenv(ours.MAP_ENV, "0")
    repacked = mhc.load(smollm2_path)
    with quant.kernels(False):  # mlx-lm runs MLX's quantized kernels: bit-identical there
        np.testing.assert_array_equal(np.array(model_q(prompt)), np.array(repacked.model(prompt)))
    again = mhc.load(quantized)
    np.testing.assert_array_equal(np.array(again.model(prompt)), np.array(repacked.model(prompt)))


def test_smollm2_quantized_stays_quantized(smollm2, smollm2_f32):
    q = smollm2.config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 32, "affine")
    assert q["model.embed_tokens"] == {"bits": 8, "group_size": 32, "mode": "affine"}
    layer = smollm2.model.model.layers[0].self_attn.q_proj
    assert layer.bits == 4 and layer.group_size == 32
    prompt = mx.array([smollm2.chat_format.render("Hi there")])
    a, b = np.array(smollm2.model(prompt)), np.array(smollm2_f32.model(prompt))
    # The quantized kernels use float16 scales: within 1% of the logits' range.
    np.testing.assert_allclose(a, b, rtol=0, atol=0.01 * np.abs(b).max())
    assert (a[0, -1].argmax(), a[0, 3].argmax()) == (b[0, -1].argmax(), b[0, 3].argmax())


def test_sentencepiece_vocabularies(tmp_path):
    """A SentencePiece-style BPE vocabulary (llama, gemma, phi3 files) with only pieces and
    scores, as GGUF stores it: our rebuilt tokenizer encodes and decodes as the original."""
    from tokenizers import SentencePieceBPETokenizer

    texts = ["the capital of France is Paris", "hello world, hello there", "numbers 12 345"]
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(texts * 30, vocab_size=180, special_tokens=["<unk>", "<s>", "</s>"])
    vocab = sp.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    path = tmp_path / "spm.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])  # BPE: earlier merges first
    w.add_token_types([2 if i == 0 else 3 if i < 3 else 1 for i in range(len(tokens))])
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(True)
    w.add_add_bos_token(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = ours.gguf_tokenizer(ours.read_gguf(path))
    for text in [*texts, "Paris hello", "the world of numbers"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("hello")[0] == 1  # add_bos_token: <s> first


def test_smollm2_tokenizes_and_scores_like_llama_cpp(smollm2_f32, smollm2_path):
    """llama.cpp on the same file (when llama-cpp-python is installed): the same token ids
    for text and chat prompts, and next-token logits that agree. (Not greedy tokens: llama.cpp
    rounds activations to 8 bits for its Q4_1 products, which flips near-ties; measured on
    the France prompt: the same top 5, a 0.1 margin between the first two, r = 0.998.)"""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(smollm2_path), n_ctx=1024, verbose=False)
    fmt = smollm2_f32.chat_format
    for text in [
        "The capital of France is Paris.",
        "Numbers: 12345 and 3.14159, dates 2026-12-01!",
        "  spaces,\ttabs\nnew lines\n\n  and 'quotes' don't",
        "Unicode: é ñ ü 日本語 🙂 — ok",
        "<|im_start|>user\nhi<|im_end|>",
    ]:
        assert fmt.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text
    vocab = llm.n_vocab()
    for question, _ in QUESTIONS:
        prompt = fmt.render([{"role": "user", "content": question}])
        llm.reset()
        llm.eval(prompt)
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        theirs = np.ctypeslib.as_array(ptr, shape=(vocab,)).copy()
        mine = np.array(smollm2_f32.model(mx.array([prompt]))[0, -1])
        assert np.corrcoef(mine, theirs)[0, 1] > 0.99
        assert set(np.argsort(-mine)[:3]) <= set(np.argsort(-theirs)[:5])


def test_smollm2_behind_the_server(smollm2_f32):
    """The server on the real model: an answer, a stop string, a second turn that reuses the
    first's cache, logprobs, and a JSON schema the reply must follow."""
    import httpx

    from mlx_harmony_core.prefix_cache import PrefixCache
    from mlx_harmony_core.server import ServerOptions
    from mlx_harmony_core.testing import ServerThread

    smollm2_f32.prefix_cache = PrefixCache(None, 8)  # a server keeps several turns
    with ServerThread(smollm2_f32, ServerOptions(model_name="smol", max_batch=2)) as url:

        def chat(**body):
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"model": "smol", "temperature": 0, "max_tokens": 48, **body},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            return r.json()

        turn = [{"role": "user", "content": "What is the capital of France?"}]
        first = chat(messages=turn, logprobs=True, top_logprobs=2)
        text = first["choices"][0]["message"]["content"]
        assert "Paris" in text
        assert first["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        cut = chat(messages=turn, stop=["Paris"])["choices"][0]
        assert cut["finish_reason"] == "stop" and "Paris" not in cut["message"]["content"]
        turn += [{"role": "assistant", "content": text}, {"role": "user", "content": "And Italy?"}]
        second = chat(messages=turn)
        assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 20
        assert "Rome" in second["choices"][0]["message"]["content"]
        schema = {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "country": {"enum": ["France", "Italy"]},
            },
            "required": ["city", "country"],
            "additionalProperties": False,
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
        reply = chat(messages=turn[:1], response_format=fmt)["choices"][0]
        answer = json.loads(reply["message"]["content"])
        assert answer["country"] == "France" and "Paris" in answer["city"]
