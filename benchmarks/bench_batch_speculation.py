"""Speculation in a batch, side by side: 8 concurrent requests decoded plainly in one batch
against the same 8 speculating (every row verifying its own drafts in one pass), in
alternating rounds, aggregate tokens per second over the wall time of the whole batch.

    MHC_BENCH_BATCH_SPEC=1 python -m pytest benchmarks/bench_batch_speculation.py -s

(``MHC_BENCH_ROUNDS``: rounds, ``MHC_BENCH_GEN``: tokens per copy request. On a loaded
machine run with ``OPENBLAS_NUM_THREADS=1``: OpenBLAS's two threads wait on each other
when the cores are oversubscribed, ~10x slower per step, and drown every ratio.)

Cases: copy-heavy requests with prompt lookup on the real SmolLM2-135M (float32 weights
and its Q4_1 GGUF as loaded), and drafts that never match (an unrelated random draft model
on the demo model). Greedy everywhere; every speculative row's tokens are checked against
the plain batch's. Without the variable a tiny run checks that the code path works.
"""

import os
import statistics
import time

import pytest

import mlx_harmony_core as mhc
from conftest import SPEC_ROWS

FULL = bool(os.environ.get("MHC_BENCH_BATCH_SPEC"))
ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "2")) if FULL else 1
GEN = int(os.environ.get("MHC_BENCH_GEN", "120")) if FULL else 8
ROWS = 8 if FULL else 2
GREEDY = mhc.SamplingParams(temperature=0.0)
PASSAGES = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built it.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon "
    "dioxide to make glucose and oxygen. It takes place mainly in the leaves.",
    "The Great Wall of China is a series of fortifications built across the historical "
    "northern borders of ancient Chinese states to protect against nomadic groups.",
    "Python is a high-level programming language. Its design philosophy emphasizes code "
    "readability with the use of significant indentation.",
]


def _copy(i: int) -> list[dict[str, str]]:
    text = PASSAGES[i % len(PASSAGES)]
    ask = "Repeat the following text exactly:" if i < 4 else "Copy this text word for word:"
    return [{"role": "user", "content": f"{ask}\n\n{text}"}]


def _batch(engine, prompts, n, eos=False, **spec) -> tuple[float, list[list[int]]]:
    """Aggregate tok/s of ``prompts`` decoded together, and every row's tokens (``eos``:
    a reply ends at the model's end of turn, else it runs ``n`` tokens)."""
    engine.reset_cache()
    engine.batching(max_batch=len(prompts))
    t0 = time.perf_counter()
    handles = [engine.submit(p, GREEDY, max_tokens=n, ignore_eos=not eos, **spec) for p in prompts]
    done = [h.result(timeout=3600) for h in handles]
    seconds = time.perf_counter() - t0
    return sum(len(c.tokens) for c in done) / seconds, [c.tokens for c in done]


def _side_by_side(case: str, engine, prompts, n, name: str, eos=False, **spec) -> float:
    runs: dict[str, list[float]] = {}
    _, plain = _batch(engine, prompts, n, eos)
    for _ in range(ROUNDS):
        tps, tokens = _batch(engine, prompts, n, eos)
        assert tokens == plain
        runs.setdefault("plain batch", []).append(tps)
        tps, tokens = _batch(engine, prompts, n, eos, **spec)
        assert tokens == plain
        runs.setdefault(name, []).append(tps)
    base = statistics.median(runs["plain batch"])
    load = os.getloadavg()[0]  # the machine is shared: ratios mean more than rates
    for label, values in runs.items():
        med = statistics.median(values)
        SPEC_ROWS.append((case, f"{label} (load {load:.1f})", f"{med:7.1f}", f"{med / base:5.2f}x"))
    return statistics.median(runs[name]) / base


@pytest.mark.parametrize("ends", ["ignore_eos", "eos"])
@pytest.mark.parametrize("weights", ["float32", "q4_1"])
def test_copy_heavy_batch_with_prompt_lookup(smollm2_path, weights, ends):
    """``ignore_eos``: every reply runs GEN tokens; past its copy (~35 tokens) SmolLM2
    invents a new conversation, so ~2/3 of the tokens are not copies and the batch waits
    for its slowest row. ``eos``: the replies end where the model ends them (the copies)."""
    if not FULL and (weights == "q4_1" or ends == "eos"):
        pytest.skip("the tiny run covers float32, ignore_eos only")
    engine = mhc.load(smollm2_path, dequantize=weights == "float32")
    prompts = [engine.chat_format.render(_copy(i)) for i in range(ROWS)]
    _side_by_side(
        f"SmolLM2 {weights}, {ROWS} copy requests ({GEN} tokens, {ends})",
        engine,
        prompts,
        GEN,
        "prompt lookup",
        eos=ends == "eos",
        speculative="ngram",
    )


def test_drafts_that_never_match(tmp_path_factory):
    other = mhc.make_test_model(tmp_path_factory.mktemp("m") / "other", preset="demo", seed=7)
    engine, draft = mhc.load("demo"), mhc.load(other)
    prompts = [engine.render(f"Tell me something new about {i}.") for i in range(ROWS)]
    _side_by_side(
        f"demo, {ROWS} rows, drafts rejected ({2 * GEN} tokens each)",
        engine,
        prompts,
        2 * GEN,
        "unrelated draft model",
        speculative="draft",
        draft_model=draft,
    )
