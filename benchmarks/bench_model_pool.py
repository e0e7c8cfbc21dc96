"""Several models in one server (server/pool.py): what loading on first use costs, and what
unloading gives back.

- ``pool_load_<model>``: a model loaded through the pool (on its worker thread, measured,
  a scheduler made) against ``mhc.load`` alone (baseline ``mhc_load``), same run,
  alternating; the ratio is the pool's overhead (1.0: none).
- ``test_unload_frees_memory``: the process's RSS before a load, after it, after the TTL
  unloaded it (and after a reload), and what an adapter entry sharing the base adds
  against loading the base with the adapters separately. Printed; checked loosely (the
  unload gives back most of what the load took).
- ``test_switching_vs_mlx_lm_server``: two models served at once, requests alternating
  between them: our ``serve -m a=... -m b=...`` against ``mlx_lm server`` (which holds one
  model and loads the other when a request names it), both as processes on the same model
  directories, alternating rounds; the median request latency of each and the ratio.
  ``MHC_BENCH_PRESET=small`` uses the 0.24B model (the demo loads in well under a second).

The real SmolLM2 GGUF joins the demo model where it is available.
"""

import asyncio
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.models.builder import demo_model_path, make_test_model
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.server.model_specs import ModelSpec
from mlx_harmony_core.server.pool import ModelPool
from mlx_harmony_core.testing import ServerProcess, free_port, write_adapters

LORA = {
    "fine_tune_type": "lora",
    "num_layers": 4,
    "lora_parameters": {"rank": 8, "scale": 4.0, "dropout": 0.0,
                        "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
}  # fmt: skip


def rss() -> int:
    """The process's resident memory in bytes (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def mb(n: int) -> str:
    return f"{n / 2**20:7.1f} MB"


def wait_unloaded(pool: ModelPool, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while any(e.client is not None for e in pool.entries.values()):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    for e in pool.entries.values():  # its drop (gc, MLX cache) ran on its thread
        e.worker.wait_idle(30)


def hold(pool: ModelPool, name: str) -> None:
    asyncio.run(pool.acquire(name)).release()


@pytest.fixture(params=["demo", "smollm2"])
def model_path(request):
    if request.param == "demo":
        return str(demo_model_path())
    return str(request.getfixturevalue("smollm2_path"))


@pytest.mark.parametrize("engine", ["ours", "mhc_load"])
def test_pool_load(benchmark, model_path, engine):
    name = Path(model_path).name
    pool = ModelPool([ModelSpec("m", model_path)], ServerOptions(model_ttl_s=0.01))

    def load_once() -> None:
        if engine == "ours":
            hold(pool, "m")
            wait_unloaded(pool)  # (the unload is outside the load's time in the summary)
        else:
            e = mhc.load(model_path)
            del e
            gc.collect()
            mx.clear_cache()

    benchmark.group = f"pool_load_{name[:20]}"
    benchmark.extra_info["engine"] = engine
    benchmark.pedantic(load_once, rounds=3, warmup_rounds=1)
    if engine == "ours":
        print(
            f"\n{name}: last load through the pool {pool.stats()['models']['m']['load_seconds']:.3f} s"
        )


def test_unload_frees_memory(model_path, tmp_path):
    name = Path(model_path).name
    pool = ModelPool([ModelSpec("m", model_path)], ServerOptions(model_ttl_s=0.05))
    gc.collect()
    before = rss()
    hold(pool, "m")
    loaded = rss()
    weights = pool.stats()["models"]["m"]["bytes"]
    wait_unloaded(pool)
    after = rss()
    hold(pool, "m")
    reloaded = rss()
    wait_unloaded(pool)
    again = rss()
    print(
        f"\n{name}: weights {mb(weights)}; RSS before {mb(before)}, loaded {mb(loaded)} "
        f"(+{mb(loaded - before)}), unloaded {mb(after)} (-{mb(loaded - after)}), "
        f"reloaded {mb(reloaded)}, unloaded again {mb(again)}"
    )
    if sys.platform == "linux":  # RSS read from /proc; the C heap trimmed (glibc)
        assert loaded - after > 0.5 * (loaded - before)  # most of it came back


def test_adapter_entry_memory(tmp_path):
    """RSS an adapter entry adds next to its loaded base, against a separate load."""
    write_adapters(tmp_path, seed=0, config=LORA)
    gc.collect()
    specs = [ModelSpec("base", "demo"), ModelSpec("tuned", base="base", adapter_path=str(tmp_path))]
    pool = ModelPool(specs, ServerOptions())
    hold(pool, "base")
    gc.collect()
    start = rss()
    hold(pool, "tuned")
    shared = rss() - start
    separate_start = rss()
    separate = mhc.load(demo_model_path(), adapter_path=tmp_path)
    separate_cost = rss() - separate_start
    print(
        f"\nadapter entry sharing the base: +{mb(shared)} RSS "
        f"({mb(pool.stats()['models']['tuned']['bytes'])} of adapters); "
        f"the same adapters loaded separately: +{mb(separate_cost)}"
    )
    del separate
    # RSS moves by allocator noise too (freed pages reused): only a real copy (MBs) counts.
    assert shared <= max(separate_cost, 8 << 20)


def _ask(url: str, model: str) -> float:
    body = {"model": model, "prompt": "Hello there", "max_tokens": 4, "temperature": 0.0}
    start = time.perf_counter()
    r = httpx.post(url + "/v1/completions", json=body, timeout=600)
    assert r.status_code == 200, r.text
    return time.perf_counter() - start


def test_switching_vs_mlx_lm_server(benchmark, tmp_path_factory):
    preset = os.environ.get("MHC_BENCH_PRESET", "demo")
    root = tmp_path_factory.mktemp("switch")
    dirs = [make_test_model(root / f"m{s}", preset=preset, seed=s) for s in (0, 1)]
    rounds, per_round = (1, 2) if benchmark.disabled else (3, 6)
    ports = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "serve", "--port", str(ports[0])]
    ours_cmd += ["-m", f"a={dirs[0]}", "-m", f"b={dirs[1]}"]
    lm_cmd = [sys.executable, "-m", "mlx_lm", "server", "--model", str(dirs[0])]
    lm_cmd += ["--port", str(ports[1]), "--log-level", "WARNING"]
    names = {"ours": ["a", "b"], "mlx_lm": [str(d) for d in dirs]}
    times: dict[str, list[float]] = {"ours": [], "mlx_lm": []}
    with ServerProcess(ours_cmd, ports[0]) as ours, ServerProcess(lm_cmd, ports[1]) as lm:
        urls = {"ours": ours, "mlx_lm": lm}
        for kind, url in urls.items():  # warm-up: each model once
            for name in names[kind]:
                _ask(url, name)
        for r in range(rounds):
            for kind in ("ours", "mlx_lm") if r % 2 == 0 else ("mlx_lm", "ours"):
                times[kind] += [_ask(urls[kind], names[kind][i % 2]) for i in range(per_round)]
    ours_s, lm_s = statistics.median(times["ours"]), statistics.median(times["mlx_lm"])
    print(
        f"\ntwo {preset} models, requests alternating: ours {ours_s * 1000:.0f} ms, "
        f"mlx_lm server {lm_s * 1000:.0f} ms per request (median); mlx_lm/ours "
        f"{lm_s / ours_s:.1f}x"
    )
    benchmark.extra_info.update(ours_ms=ours_s * 1000, mlx_lm_ms=lm_s * 1000)
    benchmark.group = "model switching"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
