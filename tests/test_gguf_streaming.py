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
        model, config, header = ours.load_gguf(path)
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
if mode == "new":
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
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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


def test_convert_streams_into_shards(big_gguf, tmp_path):
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
    b = mhc.load(path).model
    prompt = mx.array([[5, 17, 3, 99, 42, 7]])
    assert mx.array_equal(a(prompt), b(prompt)).item()
