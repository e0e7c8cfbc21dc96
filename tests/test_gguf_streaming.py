"""GGUF files load tensor by tensor (issue 37): a file of a few hundred MB loads within the
loaded model plus one tensor and a small constant of resident memory, to the same model the
whole-file load gave; ``convert`` streams the same way, writing shards as it goes.

Peak memory is measured in a subprocess: its resident high-water mark (``VmHWM``, reset
with ``/proc/self/clear_refs`` once the imports are done, so only the load counts). An
address-space limit (``RLIMIT_AS``) cannot be the budget: MLX's allocator reserves far more
address space than it touches, and Linux does not enforce ``RLIMIT_RSS``.
"""

import json
import logging
import mmap
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.models import gguf as ours
from mlx_harmony_core.models.gguf_builder import make_test_gguf

pytest.importorskip("gguf")

# ~300 MB: MXFP4 experts (17.8 MB a tensor), Q8_0 attention and a 32768-token embedding
# and head (35.6 MB each, the largest tensors), F32 vectors.
SHAPE = dict(preset="mid", layers=4, experts=32, vocab_size=32768)
# The "small constant": the file chunk being converted (at most ours.CHUNK_BYTES, here one
# 36 MB tensor) and its temporaries, allocator rounding, Python objects.
SLACK = 64 * 2**20


@pytest.fixture(scope="module")
def big_gguf(tmp_path_factory):
    root = tmp_path_factory.mktemp("big-gguf")
    return make_test_gguf(root / "big.gguf", **SHAPE), make_test_gguf(
        root / "demo.gguf", preset="demo", vocab_size=1024
    )


# -- the whole-file load as it was before issue 37: the reference ------------------------------
def _old_nibbles(qs):
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return packed.reshape(q.shape[0], -1).view(np.uint32)


def _old_tensor_arrays(buf, info):
    raw = np.frombuffer(buf, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    if info.type in ours._FLOAT:
        out = mx.array(raw.view(ours._FLOAT[info.type]).reshape(info.shape))
        return {"": out.view(mx.bfloat16) if info.type == 30 else out}
    lead, cols = info.shape[:-1], info.shape[-1]
    rows = int(np.prod(lead)) if lead else 1

    def blocks(layout):
        dtype = np.dtype([(n, t, (k,)) if k > 1 else (n, t) for n, t, k in layout])
        return raw.view(dtype).reshape(rows, cols // 32)

    if info.type == 2:
        b = blocks([("d", "<f2", 1), ("qs", "u1", 16)])
        w, d = _old_nibbles(b["qs"]), b["d"]
        arrays = {"scales": d, "biases": (d.astype(np.float32) * -8).astype(np.float16)}
    elif info.type == 3:
        b = blocks([("d", "<f2", 1), ("m", "<f2", 1), ("qs", "u1", 16)])
        w = _old_nibbles(b["qs"])
        arrays = {"scales": b["d"], "biases": b["m"]}
    elif info.type == 8:
        b = blocks([("d", "<f2", 1), ("qs", "i1", 32)])
        q = (b["qs"].astype(np.int16) + 128).astype(np.uint8)
        w = q.reshape(q.shape[0], -1).view(np.uint32)
        d = b["d"]
        arrays = {"scales": d, "biases": (d.astype(np.float32) * -128).astype(np.float16)}
    else:
        b = blocks([("e", "u1", 1), ("qs", "u1", 16)])
        w = _old_nibbles(b["qs"])
        arrays = {"scales": b["e"]}
    out = {"": mx.array(w.reshape(*lead, -1))}
    for k, v in arrays.items():
        out[k] = mx.array(np.ascontiguousarray(v).reshape(*lead, -1))
    return out


def load_whole_file(path):
    """A GPT-OSS GGUF loaded the way ``load_gguf`` did before: the whole file mapped, every
    tensor converted, then evaluated together."""
    header = ours.read_gguf(path)
    config = ours.gguf_config(header)
    model = ours._build_model(config)
    weights, quantized = {}, {}
    names = ours._names(model, header.architecture, config["num_hidden_layers"])
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for p, candidates in names.items():
            info = next((header.tensors[n] for n in candidates if n in header.tensors), None)
            if info is None:
                continue
            arrays = _old_tensor_arrays(buf, info)
            weights[p] = arrays.pop("")
            module = p.rsplit(".", 1)[0]
            for k, v in arrays.items():
                weights[f"{module}.{k}"] = v
            if info.type in ours._QUANTIZED:
                quantized[module] = ours._QUANTIZED[info.type]
        mx.eval(weights)
    ours._quantize(model, quantized)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


# -- tests -------------------------------------------------------------------------------------
def _params(model):
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.parameters()))


def test_streamed_load_equals_the_whole_file_load(big_gguf, caplog):
    path, _ = big_gguf
    assert path.stat().st_size > 250e6
    with caplog.at_level(logging.INFO, logger="mlx_harmony_core.progress"):
        model, config, header = ours.load_gguf(path, mapped=False)
    # Not a terminal: progress as log lines (mlx_harmony_core.progress).
    assert any("loading big.gguf: 100%" in r.getMessage() for r in caplog.records)
    q = config["quantization"]
    assert (q["bits"], q["mode"]) == (8, "affine")  # Q8_0: most layers
    assert q["model.layers.0.mlp.experts.gate_proj"]["mode"] == "mxfp4"
    reference = load_whole_file(path)
    got, want = _params(model), _params(reference)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert mx.array_equal(got[k], want[k]).item(), k
    prompt = mx.array([[5, 17, 3, 99, 42, 7, 1000, 20000]])
    a, b = model(prompt), reference(prompt)
    assert mx.array_equal(a, b).item()
    assert not mx.isnan(a).any().item()


_MEASURE = r"""
import json, resource, sys
import mlx_harmony_core as mhc
import mlx.core as mx
from mlx.utils import tree_flatten
mode, path, demo, out = sys.argv[1:5]
mx.set_default_device(mx.cpu)
mhc.load(demo)  # the imports and first allocations, before the high-water mark is reset
if mode == "convert":  # and o200k's Hugging Face tokenizer, a constant ~130 MB while built
    import tempfile
    from mlx_harmony_core.families.gpt_oss import write_hf_tokenizer
    write_hf_tokenizer(tempfile.mkdtemp())

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size
    reset = True
except OSError:
    reset = False
base = status("VmRSS")
model = None
if mode == "mapped":  # not populated: the file's pages (page cache) would count in VmHWM
    from mlx_harmony_core.models import gguf
    gguf.MAP_POPULATE = False
if mode in ("new", "mapped"):
    model = mhc.load(path).model
elif mode == "old":
    sys.path.insert(0, sys.argv[5])
    from test_gguf_streaming import load_whole_file
    model = load_whole_file(path)
else:
    from mlx_harmony_core.models.gguf import save_mlx
    save_mlx(path, out, shard_bytes=int(sys.argv[5]))
peak = status("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
final = sum(v.nbytes for _, v in tree_flatten(model.parameters())) if model is not None else 0
print(json.dumps({"base": base, "peak": peak, "final": final, "reset": reset}))
"""


def _measure(mode, path, demo, out="", extra=""):
    # "new": the streamed (repacked) load; "mapped": the CPU default, the file mapped
    env = {**os.environ, "PYTHONUNBUFFERED": "1", ours.MAP_ENV: "1" if mode == "mapped" else "0"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, mode, str(path), str(demo), str(out), str(extra)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_load_peaks_within_model_plus_one_tensor(big_gguf):
    """Peak resident memory while loading <= the loaded model + its largest tensor + the file
    chunk being converted + a small constant; the whole-file load went far over it."""
    path, demo = big_gguf
    header = ours.read_gguf(path)
    largest = max(ours.loaded_bytes(t) for t in header.tensors.values())
    new = _measure("new", path, demo)
    grew = new["peak"] - new["base"]
    budget = new["final"] + largest + SLACK
    assert new["final"] > 250e6
    assert grew <= budget, (grew / 2**20, budget / 2**20)
    # The check before loading asks for at least what the load took.
    assert ours.load_bytes(header) + SLACK >= grew
    old = _measure("old", path, demo, extra=Path(__file__).parent)
    assert old["peak"] - old["base"] > budget  # the budget is one the old load broke
    logging.getLogger(__name__).info(
        f"peak growth: streamed {grew / 2**20:.0f} MiB (budget {budget / 2**20:.0f}), whole "
        f"file {(old['peak'] - old['base']) / 2**20:.0f} MiB; model {new['final'] / 2**20:.0f} MiB"
    )


def test_convert_streams_into_shards(big_gguf, tmp_path, monkeypatch):
    path, demo = big_gguf
    shard = 64 * 2**20
    out = tmp_path / "mlx"
    got = _measure("convert", path, demo, out=out, extra=shard)
    header = ours.read_gguf(path)
    largest = max(ours.loaded_bytes(t) for t in header.tensors.values())
    # One shard (at most shard + one tensor) in memory, not the model.
    assert got["peak"] - got["base"] <= shard + 2 * largest + 2 * ours.CHUNK_BYTES + SLACK
    files = sorted(out.glob("model-*.safetensors"))
    assert len(files) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    a = mhc.load(out).model
    monkeypatch.setenv(ours.MAP_ENV, "0")  # the same repacked arrays as the shards
    b = mhc.load(path).model
    prompt = mx.array([[5, 17, 3, 99, 42, 7]])
    assert mx.array_equal(a(prompt), b(prompt)).item()


# -- the file mapped (the CPU default): views of it, computed on GGUF's own blocks ------------
def test_mapped_load_fits_a_budget_below_the_file(big_gguf):
    """A GGUF larger than the budget its load is given loads within it: only the tensors that
    are converted (none here: Q8_0, MXFP4 and F32) take memory of their own."""
    path, demo = big_gguf
    header = ours.read_gguf(path)
    converted = sum(
        ours.loaded_bytes(t) for t in header.tensors.values() if t.type not in (0, 1, 8, 30, 39)
    )
    budget = converted + SLACK
    assert path.stat().st_size > 4 * budget
    got = _measure("mapped", path, demo)
    assert got["final"] > 250e6  # the parameters: views of the file
    assert got["peak"] - got["base"] <= budget, ((got["peak"] - got["base"]) / 2**20, budget)


def _cpu_model(path, **kw):
    from mlx_harmony_core.cpu.layers import use_cpu_layers

    model = ours.load_gguf(path, **kw)[0]
    use_cpu_layers(model)  # as mhc.load does: the repacked path runs on our kernels
    return model


def _rel(a, b):
    a, b = np.array(a, np.float64), np.array(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def test_mapped_gpt_oss_logits_equal_the_repacked_load(big_gguf):
    from mlx_harmony_core.cpu.gguf_blocks import GgufEmbedding, GgufLinear, GgufSwitchLinear

    path, _ = big_gguf
    mapped = _cpu_model(path, mapped=True)
    layer = mapped.model.layers[0]
    assert isinstance(layer.mlp.experts.up_proj, GgufSwitchLinear)
    assert isinstance(layer.self_attn.q_proj, GgufLinear)
    assert isinstance(mapped.model.embed_tokens, GgufEmbedding)
    repacked = _cpu_model(path, mapped=False)
    for prompt in ([[5, 17, 3, 99, 42, 7, 1000, 20000] * 3], [[20000]]):  # prefill, decode
        a, b = mapped(mx.array(prompt)), repacked(mx.array(prompt))
        assert a.shape == b.shape
        assert _rel(a, b) < 1e-5  # float32 rounding: both compute the same exact values


def test_mapped_llama_logits_equal_the_exact_values(tmp_path, monkeypatch):
    """A llama-shaped Q8_0 GGUF (q/k rows permuted by llama.cpp's converter, tied head):
    mapped, its logits equal the float32-dequantized model's within float32 rounding; the
    repacked load's within its own (8-bit affine kernels) tolerance. With the fused CPU
    decoder block on, its dense linears stay repacked (that primitive takes our layout)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from gguf import GGMLQuantizationType as Q

    from mlx_harmony_core.cpu import fused
    from mlx_harmony_core.cpu.gguf_blocks import GgufEmbedding, GgufLinear
    from support.gguf_files import random_model, write_gguf

    config = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": 300,
        "tie_word_embeddings": True,
        "max_position_embeddings": 512,
    }
    _, weights = random_model(config)
    path = tmp_path / "llama.gguf"
    write_gguf(path, "llama", config, weights, qtype=Q.Q8_0)
    fused_layers = _cpu_model(path, mapped=True)
    assert not isinstance(fused_layers.model.layers[0].self_attn.q_proj, GgufLinear)
    # The converted weights in one arena of huge pages (q/k unpermuted in place) or each
    # from MLX's allocator: the same model.
    monkeypatch.setattr(ours, "LOAD_ARENA", False)
    plain = _cpu_model(path, mapped=True)
    monkeypatch.setattr(ours, "LOAD_ARENA", True)
    for prompt in ([[5, 17, 3, 99, 42, 7] * 4], [[42]]):
        assert mx.array_equal(fused_layers(mx.array(prompt)), plain(mx.array(prompt)))
    assert isinstance(fused_layers.model.embed_tokens, GgufEmbedding)
    monkeypatch.setenv(fused.ENV, "mlx")  # every Q8_0 weight on the block kernels
    mapped = _cpu_model(path, mapped=True)
    assert isinstance(mapped.model.layers[0].self_attn.q_proj, GgufLinear)
    assert isinstance(mapped.model.embed_tokens, GgufEmbedding)
    exact = ours.load_gguf(path, dequantize=True)[0]
    repacked = _cpu_model(path, mapped=False)
    for prompt in ([[5, 17, 3, 99, 42, 7] * 4], [[42]]):
        a = mapped(mx.array(prompt))
        assert _rel(a, exact(mx.array(prompt))) < 1e-5
        assert _rel(a, repacked(mx.array(prompt))) < 2e-3


def test_opting_out_of_the_mapping_repacks(big_gguf, monkeypatch):
    path, _ = big_gguf
    monkeypatch.setenv(ours.MAP_ENV, "0")
    assert not ours.map_enabled()
    model = ours.load_gguf(path)[0]
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"


# -- the C++ loader (one pass from the file into the final arrays) vs numpy's ----------------
# Scales that stress the bias arithmetic: zeros, subnormals, the largest halves (-8 d and
# -128 d overflow to -inf), infinities, and ordinary values.
_SPECIAL_HALVES = np.array(
    [0x0000, 0x8000, 0x0001, 0x03FF, 0x8200, 0x7BFF, 0xFBFF, 0x7C00, 0xFC00, 0x3C00, 0x5800],
    dtype=np.uint16,
)


def _raw_tensor(kind, shape, rng):
    """Random bytes laid out as GGML ``kind`` blocks for a tensor of ``shape``; half-float
    scales drawn partly from :data:`_SPECIAL_HALVES`."""
    count = int(np.prod(shape))
    _, block, size = ours.GGML_TYPES[kind]
    raw = rng.integers(0, 256, count // block * size, dtype=np.uint8)
    if kind in ours._LAYOUTS:
        layout = ours._LAYOUTS[kind]
        dtype = np.dtype([(n, t, (k,)) if k > 1 else (n, t) for n, t, k in layout])
        blocks = raw.view(dtype)
        for name, t, _ in layout:
            if t == "<f2":  # finite random halves, with the special ones mixed in
                vals = rng.standard_normal(blocks.size).astype(np.float16).view(np.uint16)
                pick = rng.random(blocks.size) < 0.3
                vals[pick] = rng.choice(_SPECIAL_HALVES, pick.sum())
                blocks[name] = vals.view(np.float16)
    return raw.tobytes()


def _write_raw(tmp_path, tensors, pad=7):
    """A file holding each raw tensor at an odd offset; returns its path and infos."""
    path = tmp_path / "raw.bin"
    infos, pos = [], pad
    with open(path, "wb") as f:
        f.write(b"\0" * pad)
        for i, (kind, shape, data) in enumerate(tensors):
            infos.append(ours.TensorInfo(f"t{i}", shape, kind, pos, len(data)))
            f.write(data + b"\0" * pad)
            pos += len(data) + pad
    return path, infos


def _bytes(a):
    return np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).reshape(-1).view(np.uint8)


# The reference's -8 d and -128 d overflow float16 for the largest scales: as intended.
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize(
    ("threads", "huge", "arena"),
    [(1, True, False), (2, True, False), (3, False, False), (2, True, True)],
)
def test_cpp_loader_equals_numpy_reference(tmp_path, monkeypatch, threads, huge, arena):
    """The C++ loader's arrays equal numpy's bit for bit; made in a weight arena (both
    paths) too, and those stay valid once the arena object is gone."""
    from mlx_harmony_core import _core

    monkeypatch.setattr(ours, "LOAD_THREADS", threads)
    monkeypatch.setattr(ours, "LOAD_HUGE_PAGES", huge)
    rng = np.random.default_rng(threads)
    shapes = [(3, 64), (5, 7, 96), (1, 32), (2, 2, 2, 32), (257, 320)]
    tensors = [
        (kind, shape, _raw_tensor(kind, shape, rng))
        for kind in (2, 3, 8, 39, 0, 1, 30)
        for shape in shapes
    ]
    tensors.append((0, (), np.float32(3.5).tobytes()))  # a scalar
    tensors.append((1, (0, 4), b""))  # empty
    path, infos = _write_raw(tmp_path, tensors)
    header = ours.GGUFFile(path, 3, {})
    data = path.read_bytes()
    # Room for about half of them: the rest come from MLX's allocator.
    pool = _core.WeightArena(sum(ours.loaded_bytes(i) for i in infos) // 2) if arena else None
    pairs = []
    with ours.FileSource(path) as src:
        for info in infos:
            assert _core.gguf_type_supported(info.type)
            pairs.append(
                (
                    info,
                    ours.read_tensor(header, src, info, pool),
                    ours.tensor_arrays(header, data, info, arena=pool),
                )
            )
    if arena:
        assert 0 < pool.used <= pool.capacity
        del pool
    for info, got, want in pairs:
        assert got.keys() == want.keys(), info
        for k in want:
            a, b = got[k], want[k]
            assert (a.dtype, a.shape) == (b.dtype, b.shape), (info, k)
            assert np.array_equal(_bytes(a), _bytes(b)), (info.type_name, info.shape, k)


def test_weight_arena_hands_out_zeroed_arrays_then_falls_back():
    from mlx_harmony_core import _core

    arena = _core.WeightArena(3 << 20)
    assert arena.capacity == 4 << 20  # whole 2 MiB pages
    a = arena.zeros([1000, 250], mx.uint32)
    b = arena.zeros([7], mx.float16)
    assert arena.used >= 1_000_000 + 14
    assert not np.asarray(a).any() and not np.asarray(b).any()
    np.asarray(memoryview(a))[3, 4] = 9  # writable in place, as the loader fills them
    big = arena.zeros([2 << 20], mx.float32)  # no room left: MLX's allocator
    assert big.shape == (2 << 20,) and not np.asarray(big).any()
    del arena
    assert int(a[3, 4]) == 9 and int(mx.sum(a)) == 9
    assert (a + 1).dtype == mx.uint32
    empty = _core.WeightArena(0)
    assert empty.capacity == 0 and empty.zeros([2, 3], mx.float32).shape == (2, 3)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random bytes: some scales are nan
def test_kquants_load_into_an_arena_as_without(tmp_path):
    from mlx_harmony_core import _core

    rng = np.random.default_rng(5)
    tensors = [
        (kind, (3, 512), _raw_tensor(kind, (3, 512), rng)) for kind in (6, 7, 10, 11, 12, 13, 14)
    ]
    path, infos = _write_raw(tmp_path, tensors)
    header = ours.GGUFFile(path, 3, {})
    data = path.read_bytes()
    arena = _core.WeightArena(1 << 20)
    for info in infos:
        got = ours.tensor_arrays(header, data, info, arena=arena)
        want = ours.tensor_arrays(header, data, info)
        for k in want:
            assert np.array_equal(_bytes(got[k]), _bytes(want[k])), (info.type_name, k)
    assert arena.used > 0


def test_cpp_loader_refuses_what_it_cannot_read(tmp_path):
    from mlx_harmony_core import _core

    rng = np.random.default_rng(0)
    data = _raw_tensor(39, (4, 64), rng)
    path, (info,) = _write_raw(tmp_path, [(39, (4, 64), data)], pad=0)
    header = ours.GGUFFile(path, 3, {})
    with ours.FileSource(path) as src:
        # The file ends inside the tensor: a ModelLoadError naming it, not a crash.
        short = ours.TensorInfo("cut", (8, 64), 39, info.offset, 2 * info.nbytes)
        with pytest.raises(mhc.ModelLoadError, match="cut.*ends at byte"):
            ours.read_tensor(header, src, short)
        odd = ours.TensorInfo("odd", (4, 48), 39, info.offset, info.nbytes)
        with pytest.raises(mhc.ModelLoadError, match="odd.*blocks of 32"):
            ours.read_tensor(header, src, odd)
        with pytest.raises(ValueError, match="GGML type 12"):
            _core.load_gguf_tensor(src.fd, 0, 12, [4, 256], 1)
        with pytest.raises(ValueError, match="threads"):
            _core.load_gguf_tensor(src.fd, 0, 39, [4, 64], 0)
    assert not _core.gguf_type_supported(12)  # Q4_K: numpy's path (or its refusal)
