"""Several models in one server (server/pool.py): what loading on first use costs, and what
unloading gives back.

- ``pool_load_<model>``: a model loaded through the pool (on its worker thread, measured,
  a scheduler made) against ``mhc.load`` alone (baseline ``mhc_load``), same run,
  alternating; the ratio is the pool's overhead (1.0: none).
- ``test_unload_frees_memory``: the process's RSS before a load, after it, after the TTL
  unloaded it (and after a reload), and what an adapter entry sharing the base adds
  against loading the base with the adapters separately. Printed; checked loosely (the
  unload gives back most of what the load took).

The real SmolLM2 GGUF joins the demo model where it is available.
"""

import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.models.builder import demo_model_path
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.server.model_specs import ModelSpec
from mlx_harmony_core.server.pool import ModelPool

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
    from mlx.utils import tree_flatten
    from mlx_lm import load as lm_load
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, _ = lm_load(str(demo_model_path()))
    model.freeze()
    linear_to_lora_layers(model, LORA["num_layers"], LORA["lora_parameters"])
    params = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())}  # fmt: skip
    mx.save_safetensors(str(tmp_path / "adapters.safetensors"), params)
    (tmp_path / "adapter_config.json").write_text(json.dumps(LORA))
    del model, params
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
