"""Loading a GGUF: ours (tensor by tensor) vs llama.cpp on the same file, and vs our own
mlx-lm directory of the same weights; time to a model ready for its first token (load + one
token's forward pass: llama.cpp maps lazily, so its open alone is not comparable) and peak
resident memory, each run in its own process, alternating.

    MHC_BENCH_GGUF_20B=1 python -m pytest benchmarks/bench_gguf_load.py -s

On demand only (never in CI): gpt-oss-20b's shapes as llama.cpp's converter writes them
(12.1 GB: MXFP4 experts, Q8_0 elsewhere, random weights, o200k_harmony vocabulary) are
written once to ``$MHC_BENCH_GGUF`` (default ``$MLX_HARMONY_CORE_HOME/models/
gpt-oss-20b-mxfp4-q8.gguf``) and converted once into an mlx-lm directory beside it.
``MHC_BENCH_ROUNDS`` rounds (default 2). ``MHC_BENCH_ENGINES``: a comma-separated subset
of :data:`ENGINES` (default all; the mlx-lm directory is written only when it is asked
for). llama.cpp comes from ``llama-cpp-python`` (optional); without it its rows are left
out. Each run also reports its CPU time (user + system): on a shared machine the wall time
depends on the load, the CPU time much less. Without ``MHC_BENCH_GGUF_20B`` a small file
loads once, ours only, as a test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mlx_harmony_core as mhc
from conftest import LOAD_ROWS
from mlx_harmony_core._paths import home
from mlx_harmony_core.models.gguf_builder import make_test_gguf

FULL = bool(os.environ.get("MHC_BENCH_GGUF_20B"))
ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "2"))
# ours: the C++ one-pass reader; "numpy": the same streamed load through the numpy
# converter (the reference, and the loader before the C++ reader).
ENGINES = (
    "ours (GGUF)",
    "ours numpy (GGUF)",
    "ours (mlx-lm dir)",
    "llama.cpp",
    "llama.cpp no-mmap",
)

# One process per run: import, then load and one token's forward pass, timed; VmHWM is the
# process's peak resident memory (the file's mapped pages count for llama.cpp's mmap).
_RUN = r"""
import json, resource, sys, time
engine, path = sys.argv[1:3]

def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

if engine.startswith("llama.cpp"):
    import llama_cpp
    import llama_cpp.llama_cpp as low
    defaults = low.llama_model_default_params

    def params():  # no repacking into extra buffer types: this VM reports AMX it lacks
        p = defaults()
        p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    kwargs = dict(n_ctx=256, n_batch=32, verbose=False, use_mmap=engine == "llama.cpp")
    base = status("VmRSS")
    c0, t0 = cpu(), time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, **kwargs)
    t1 = time.perf_counter()
    llm.eval([200005])
    t2 = time.perf_counter()
else:
    import mlx_harmony_core as mhc
    import mlx.core as mx
    from mlx_lm.models import gpt_oss  # noqa: F401  (imports outside the timing)
    mx.set_default_device(mx.cpu)
    if engine.startswith("ours numpy"):
        from mlx_harmony_core.models import gguf
        gguf.read_tensor = lambda header, src, info: gguf.tensor_arrays(header, src, info)
    base = status("VmRSS")
    c0, t0 = cpu(), time.perf_counter()
    model = mhc.load(path).model
    t1 = time.perf_counter()
    mx.eval(model(mx.array([[200005]])))
    t2 = time.perf_counter()
print(json.dumps({"open": t1 - t0, "ready": t2 - t0, "cpu": cpu() - c0, "peak": status("VmHWM"),
                  "rss": status("VmRSS"), "base": base}))
"""


def _run(engine: str, path: Path) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, engine, str(path)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _have_llama_cpp() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(FULL, reason="the small case runs without MHC_BENCH_GGUF_20B")
def test_small_gguf_loads(benchmark, tmp_path):
    path = make_test_gguf(tmp_path / "small.gguf", preset="small", vocab_size=8192)
    benchmark.group = "load a GGUF (small preset)"
    benchmark.extra_info["engine"] = "ours"
    engine = benchmark.pedantic(mhc.load, args=(path,), rounds=1, iterations=1)
    assert engine.config["model_type"] == "gpt_oss"


@pytest.mark.skipif(not FULL, reason="set MHC_BENCH_GGUF_20B=1 (writes a 12 GB file)")
def test_gpt_oss_20b_gguf_load_vs_llama_cpp():
    from mlx_harmony_core.models.gguf import save_mlx

    default = home() / "models" / "gpt-oss-20b-mxfp4-q8.gguf"
    path = Path(os.environ.get("MHC_BENCH_GGUF", default))
    if not path.exists():
        make_test_gguf(path, preset="gpt-oss-20b", tokenizer=True)
    wanted = os.environ.get("MHC_BENCH_ENGINES")
    names = [n.strip() for n in wanted.split(",")] if wanted else list(ENGINES)
    unknown = set(names) - set(ENGINES)
    assert not unknown, f"MHC_BENCH_ENGINES: {sorted(unknown)} are not in {ENGINES}"
    engines = {n: path for n in names if not n.startswith("llama.cpp")}
    if "ours (mlx-lm dir)" in engines:
        directory = path.with_suffix(".mlx")
        if not (directory / "config.json").exists():
            save_mlx(path, directory, overwrite=True)
        engines["ours (mlx-lm dir)"] = directory
    llama = [n for n in names if n.startswith("llama.cpp")]
    if llama and _have_llama_cpp():
        engines.update(dict.fromkeys(llama, path))  # "llama.cpp": mmap, its default
    elif llama:
        LOAD_ROWS.append(("llama.cpp: not installed (pip install llama-cpp-python)", [], 0))
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for r in range(ROUNDS):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            runs[name].append(_run(name, engines[name]))
    size = path.stat().st_size
    for name, rs in runs.items():
        LOAD_ROWS.append((name, rs, size))
    assert all(r["ready"] > 0 for rs in runs.values() for r in rs)
