"""KV cache costs, ours vs mlx-lm's caches, and second-turn time to first token with reuse.

    python -m pytest benchmarks/bench_kv_cache.py

GPT-OSS attention shapes (8 KV heads, head_dim 64), float32, batch 1. Per-step cases keep the
context fixed (trim after each append); "grow" appends one token at a time from empty, where
mlx-lm's 256-token concatenation copies the whole cache again and again.
"""

import mlx.core as mx
import pytest
from mlx_lm.models import cache as mlx_cache

import mlx_harmony_core as mhc
from mlx_harmony_core.kv_cache import KVCache, RotatingKVCache

HEADS, DIM = 8, 64


def step_input():
    x = mx.random.normal((1, HEADS, 1, DIM))
    mx.eval(x)
    return x


def filled(cache, context):
    x = mx.random.normal((1, HEADS, context, DIM))
    mx.eval(cache.update_and_fetch(x, x))
    return cache


@pytest.mark.parametrize("context", [128, 4096, 32768], ids=lambda c: f"ctx{c}")
@pytest.mark.parametrize("engine", ["ours", "mlx_lm"])
def test_full_cache_step(benchmark, engine, context):
    benchmark.group = f"full KV update_and_fetch, context {context}"
    benchmark.extra_info["engine"] = engine
    cache = filled(KVCache() if engine == "ours" else mlx_cache.KVCache(), context)
    x = step_input()

    def step():
        mx.eval(cache.update_and_fetch(x, x))
        cache.trim(1)

    benchmark(step)


@pytest.mark.parametrize("context", [128, 4096, 32768], ids=lambda c: f"ctx{c}")
@pytest.mark.parametrize("engine", ["ours", "mlx_lm"])
def test_sliding_cache_step(benchmark, engine, context):
    benchmark.group = f"sliding (128) update_and_fetch, after {context} tokens"
    benchmark.extra_info["engine"] = engine
    cache = (
        RotatingKVCache(128, 0, 4096)
        if engine == "ours"
        else mlx_cache.RotatingKVCache(max_size=128)
    )
    x = step_input()
    for _ in range(0, context, 512):  # reach the context in chunks, as a prefill would
        filled(cache, 512)
    benchmark(lambda: mx.eval(cache.update_and_fetch(x, x)))


@pytest.mark.parametrize("engine", ["ours", "mlx_lm"])
def test_grow_from_empty(benchmark, engine):
    n = 8192 if not benchmark.disabled else 300
    benchmark.group = f"full KV: append {n} tokens one by one"
    benchmark.extra_info["engine"] = engine
    x = step_input()

    def grow():
        c = KVCache() if engine == "ours" else mlx_cache.KVCache()
        for _ in range(n):
            mx.eval(c.update_and_fetch(x, x))

    benchmark.pedantic(grow, rounds=3, iterations=1)


@pytest.fixture(scope="module")
def conversation_engine(request, tmp_path_factory):
    disabled = request.config.getoption("benchmark_disable", False)
    path = (
        "demo"
        if disabled
        else mhc.make_test_model(tmp_path_factory.mktemp("m") / "small", preset="small")
    )
    return mhc.load(path), (60 if disabled else 1500)


@pytest.mark.parametrize("engine", ["ours", "no_reuse"])
def test_second_turn_ttft(benchmark, conversation_engine, engine):
    base, words = conversation_engine
    e = mhc.Engine(
        base.model, encoding=base.encoding, config=base.config, reuse_cache=engine == "ours"
    )
    benchmark.group = f"second-turn time to first token ({words}-word first turn)"
    benchmark.extra_info["engine"] = engine
    p = mhc.SamplingParams(temperature=0.0)
    turn1 = [{"role": "user", "content": " ".join(["history"] * words)}]

    def setup():
        c1 = e.generate(turn1, p, max_tokens=32)
        turn2 = turn1 + [
            {"role": "assistant", "content": c1.text or "ok"},
            {"role": "user", "content": "Summarize."},
        ]
        return (turn2,), {}

    def second(turn2):
        c = e.generate(turn2, p, max_tokens=1)
        benchmark.extra_info["cached_prompt_tokens"] = c.usage.cached_prompt_tokens
        benchmark.extra_info["prompt_tokens"] = c.usage.prompt_tokens

    benchmark.pedantic(second, setup=setup, rounds=3, iterations=1)
