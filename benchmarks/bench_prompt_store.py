"""Loading a cached prompt prefix from disk vs prefilling it, on the demo and SmolLM2 models.

    MHC_BENCH_PROMPT_STORE=1 python -m pytest benchmarks/bench_prompt_store.py -s

Side by side in one run, alternating rounds: "prefill" runs the prefix through the model in
``prefill_step_size`` chunks (fresh caches, evaluated); "disk" finds the prefix in a
:class:`~mlx_harmony_core.prompt_store.PromptStore`, reads and checks its file and rebuilds
the caches (evaluated). The file was just written, so it is read from the OS page cache, as a
restarted server reading a recently used prefix would. Also shown: what offering a cache costs
the generation thread (the host copy; the file is written on the store's own thread).
Beside them, mlx-lm's way to the same end (``mlx_lm.cache_prompt`` writes a prompt cache,
``load_prompt_cache`` reads it back): the same prefix through the same model into mlx-lm's
caches, saved with ``save_prompt_cache`` and timed loading (evaluated), in the same rounds.
Without the variable (and under ``--benchmark-disable``) the sizes are small: a smoke test.
"""

import os
import statistics
import time

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import prompt_store as ps

FULL = bool(os.environ.get("MHC_BENCH_PROMPT_STORE"))
ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "3")) if FULL else 1


def _prefill(runner, tokens):
    """All but the last token through the model in ``prefill_step_size`` chunks, evaluated."""
    cache = runner.new_cache()
    end, step = len(tokens) - 1, runner.prefill_step_size
    for i in range(0, end, step):
        runner.forward(mx.array([tokens[i : min(i + step, end)]], dtype=mx.int32), cache)
        mx.eval([c.state for c in cache])
    return cache


def _mlx_lm_file(model, tokens, path):
    """mlx-lm's prompt cache of ``tokens`` for ``model``, written as ``mlx_lm.cache_prompt``
    writes it; returns the path."""
    from mlx_lm.models.cache import make_prompt_cache, save_prompt_cache

    cache = make_prompt_cache(model)
    for i in range(0, len(tokens), 512):
        model(mx.array([tokens[i : i + 512]], dtype=mx.int32), cache=cache)
        mx.eval([c.state for c in cache])
    save_prompt_cache(str(path), cache)
    return path


def _mlx_lm_load(path):
    from mlx_lm.models.cache import load_prompt_cache

    cache = load_prompt_cache(str(path))
    mx.eval([c.state for c in cache])
    return cache


def compare(engine, n_tokens, directory, rounds):
    """Median seconds of prefilling ``n_tokens``, of loading them from disk, and of mlx-lm's
    ``load_prompt_cache`` of the same prefix, the file's size, and the host copy's cost;
    alternating rounds."""
    runner = engine.runner
    vocab = min(engine.vocab_size, 30000)
    tokens = [(7919 * i + 13) % (vocab - 100) + 50 for i in range(n_tokens + 1)]
    store = ps.PromptStore(
        directory,
        ps.model_identity(runner.model, config=engine.config),
        min_tokens=1,
        max_bytes=64 * 1024 * ps.MIB,
    )
    cache = _prefill(runner, tokens)  # warm-up, and the cache to store
    start = time.perf_counter()
    assert store.offer(tokens[:n_tokens], cache)
    offer_s = time.perf_counter() - start
    assert store.flush(600)
    (entry,) = store.entries()
    lm_path = _mlx_lm_file(runner.model, tokens[:n_tokens], directory / "mlx_lm.safetensors")
    prefill, disk, lm = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        _prefill(runner, tokens)
        prefill.append(time.perf_counter() - start)
        start = time.perf_counter()
        found, n = store.find(tokens + [1])
        loaded = store.load(found, n)
        disk.append(time.perf_counter() - start)
        assert loaded is not None and n == n_tokens
        start = time.perf_counter()
        _mlx_lm_load(lm_path)
        lm.append(time.perf_counter() - start)
    # Exactness: the loaded caches hold what the prefill computed.
    for a, b in zip(cache, loaded, strict=True):
        for x, y in zip(a.state, b.state, strict=True):
            assert mx.array_equal(x, y).item()

    def load_once():
        found, n = store.find(tokens + [1])
        return store.load(found, n)

    times = statistics.median(prefill), statistics.median(disk), statistics.median(lm)
    return times, entry.nbytes, offer_s, load_once


def report(benchmark, name, n_tokens, times, nbytes, offer_s):
    prefill_s, disk_s, lm_s = times
    line = (
        f"{name}: {n_tokens} tokens, {nbytes / ps.MIB:.1f} MB on disk | prefill "
        f"{prefill_s * 1000:.0f} ms | disk load {disk_s * 1000:.1f} ms | "
        f"mlx-lm load_prompt_cache {lm_s * 1000:.1f} ms | ratio prefill/disk "
        f"{prefill_s / disk_s:.1f}x, mlx-lm/ours {lm_s / disk_s:.2f}x | "
        f"offer (host copy) {offer_s * 1000:.1f} ms"
    )
    print("\n" + line)
    benchmark.extra_info.update(
        tokens=n_tokens,
        file_mb=round(nbytes / ps.MIB, 2),
        prefill_ms=round(prefill_s * 1000, 1),
        disk_ms=round(disk_s * 1000, 2),
        mlx_lm_ms=round(lm_s * 1000, 2),
        ratio=round(prefill_s / disk_s, 2),
        offer_ms=round(offer_s * 1000, 2),
    )


@pytest.mark.parametrize("n_tokens", [512, 2048] if FULL else [32])
def test_demo_prefix_from_disk_vs_prefill(benchmark, tmp_path, n_tokens):
    engine = mhc.load("demo")
    times, nbytes, offer_s, load = compare(engine, n_tokens, tmp_path, ROUNDS)
    report(benchmark, "demo", n_tokens, times, nbytes, offer_s)
    benchmark.group = f"prompt store: demo, {n_tokens}-token prefix from disk"
    benchmark.pedantic(load, rounds=ROUNDS, iterations=1)


@pytest.mark.parametrize("n_tokens", [512, 1024] if FULL else [32])
def test_smollm2_prefix_from_disk_vs_prefill(benchmark, tmp_path, smollm2_path, n_tokens):
    engine = mhc.load(smollm2_path)
    times, nbytes, offer_s, load = compare(engine, n_tokens, tmp_path, ROUNDS)
    report(benchmark, "SmolLM2-135M Q4_1", n_tokens, times, nbytes, offer_s)
    benchmark.group = f"prompt store: SmolLM2, {n_tokens}-token prefix from disk"
    benchmark.pedantic(load, rounds=ROUNDS, iterations=1)
