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
# ours: the file mapped, Q8_0/MXFP4 computed on its blocks (the CPU default); "repacked":
# the C++ one-pass reader into MLX's layout (MLX_HARMONY_CORE_GGUF_MAP=0, what a GPU load
# does); "numpy": the same streamed load through the numpy converter (the reference).
# MHC_BENCH_DECODE=N: each run then prefills 64 tokens (every expert's pages touched) and
# times N single-token decode steps after the first (forward pass with a KV cache only;
# llama.cpp: N evals of one token).
DECODE = int(os.environ.get("MHC_BENCH_DECODE", "0"))
ENGINES = (
    "ours (GGUF)",
    "ours repacked (GGUF)",
    "ours numpy (GGUF)",
    "ours (mlx-lm dir)",
    "llama.cpp",
    "llama.cpp no-mmap",
)

# One process per run: import, then load and one token's forward pass, timed; VmHWM is the
# process's peak resident memory (the file's mapped pages count for llama.cpp's mmap).
_RUN = r"""
import json, resource, sys, time
engine, path, decode = sys.argv[1], sys.argv[2], int(sys.argv[3])

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
    c2 = cpu()
    if decode:  # a prefill first: every expert's pages in memory before the timed steps
        llm.eval([1000 + 37 * i for i in range(64)])
    for i in range(decode):
        if i == 1:
            t3 = time.perf_counter()
        llm.eval([200006 + i % 7])
    t4 = time.perf_counter()
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
    from mlx_lm.models.cache import make_prompt_cache
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[200005]]), cache=cache))
    t2 = time.perf_counter()
    c2 = cpu()
    if decode:  # a prefill first: every expert's pages in memory before the timed steps
        mx.eval(model(mx.array([[1000 + 37 * i for i in range(64)]]), cache=cache))
    for i in range(decode):
        if i == 1:
            t3 = time.perf_counter()
        mx.eval(model(mx.array([[200006 + i % 7]]), cache=cache))
    t4 = time.perf_counter()
tps = (decode - 1) / (t4 - t3) if decode > 1 else 0.0
print(json.dumps({"open": t1 - t0, "ready": t2 - t0, "cpu": c2 - c0, "peak": status("VmHWM"),
                  "rss": status("VmRSS"), "base": base, "decode_tps": tps}))
"""


def _cached(path: Path) -> float:
    """The share of ``path`` in the page cache now (util-linux ``fincore``; -1 without it).
    Nothing is dropped from the cache: the machine is shared."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        return int(out[0]) / path.stat().st_size if out else -1.0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return -1.0


def _run(engine: str, path: Path, decode: int = 0) -> dict[str, float]:
    env = dict(os.environ)
    if engine.startswith("ours repacked"):
        env["MLX_HARMONY_CORE_GGUF_MAP"] = "0"
    cached = _cached(path) if path.is_file() else -1.0
    proc = subprocess.run(
        [sys.executable, "-c", _RUN, engine, str(path), str(decode)],
        capture_output=True,
        text=True,
        timeout=1800,
        env=env,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "cached": cached}


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
            runs[name].append(_run(name, engines[name], DECODE))
    size = path.stat().st_size
    for name, rs in runs.items():
        LOAD_ROWS.append((name, rs, size))
    for name, rs in runs.items():  # notes: page cache before each run, decode speed
        cache = " ".join(f"{r['cached']:.0%}" for r in rs)
        tps = " ".join(f"{r['decode_tps']:.2f}" for r in rs)
        LOAD_ROWS.append((f"  {name}: file in page cache before each run {cache}", [], size))
        if DECODE > 1:
            LOAD_ROWS.append((f"  {name}: decode tok/s (steps 2-{DECODE}) {tps}", [], size))
    assert all(r["ready"] > 0 for rs in runs.values() for r in rs)
