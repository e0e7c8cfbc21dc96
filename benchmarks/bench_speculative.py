"""Speculative decoding, side by side: plain decoding, prompt lookup, the target as its own
draft, and mlx-lm's ``stream_generate(draft_model=...)``, on the real SmolLM2-135M (float32
weights from its GGUF) and on a task where drafts are rejected (an unrelated draft model).

    MHC_BENCH_SPEC=1 python -m pytest benchmarks/bench_speculative.py -s   # 3 rounds

Greedy everywhere; every speculative run's tokens are checked against plain decoding's.
"""

import os
import statistics

import mlx.core as mx
import pytest

import mlx_harmony_core as mhc
from conftest import SPEC_ROWS

FULL = bool(os.environ.get("MHC_BENCH_SPEC"))
ROUNDS, GEN = (int(os.environ.get("MHC_BENCH_ROUNDS", "3")), 160) if FULL else (1, 12)
GREEDY = mhc.SamplingParams(temperature=0.0)
PASSAGE = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the centerpiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)
COPY = [{"role": "user", "content": "Repeat the following text exactly:\n\n" + PASSAGE}]


@pytest.fixture(scope="module")
def smol(smollm2_path):
    return mhc.load(smollm2_path, dequantize=True)


def _mlx_lm(engine, prompt, n, draft=None, k=4):
    from mlx_lm.generate import stream_generate

    last = None
    tokens = []
    for r in stream_generate(
        engine.model,
        engine.tokenizer,
        mx.array(prompt),
        max_tokens=n,
        draft_model=draft,
        num_draft_tokens=k,
    ):
        last = r
        tokens.append(r.token)
    return last.generation_tps, tokens


def _ours(engine, prompt, n, **spec):
    engine.reset_cache()
    c = engine.generate(prompt, GREEDY, max_tokens=n, **spec)
    return c.timings.decode_tokens_per_s, c.tokens, c.usage


def _table(case, runs):
    base = statistics.median(runs["ours plain"])
    for name, values in runs.items():
        med = statistics.median(values)
        SPEC_ROWS.append((case, name, f"{med:7.1f}", f"{med / base:5.2f}x"))


def test_copy_heavy_real_model(smol):
    prompt = smol.chat_format.render(COPY)
    runs: dict[str, list[float]] = {}
    _, plain, _ = _ours(smol, prompt, GEN)
    n = len(plain)
    for _ in range(ROUNDS):
        tps, tokens, _ = _ours(smol, prompt, n)
        runs.setdefault("ours plain", []).append(tps)
        tps, tokens, usage = _ours(smol, prompt, n, speculative="ngram")
        assert tokens == plain
        runs.setdefault("ours prompt lookup", []).append(tps)
        tps, tokens, _ = _ours(smol, prompt, n, speculative="draft", draft_model=smol)
        assert tokens == plain
        runs.setdefault("ours draft = target", []).append(tps)
        tps, tokens = _mlx_lm(smol, prompt, n)
        runs.setdefault("mlx-lm plain", []).append(tps)
        tps, tokens = _mlx_lm(smol, prompt, n, draft=smol.model)
        runs.setdefault("mlx-lm draft = target", []).append(tps)
    _table(f"SmolLM2 copy task ({n} tokens)", runs)


def test_rejected_drafts(demo_engine_and_other):
    engine, other = demo_engine_and_other
    prompt = engine.render("Tell me something new.")
    runs: dict[str, list[float]] = {}
    _, plain, _ = _ours(engine, prompt, 4 * GEN)
    for _ in range(ROUNDS):
        tps, _, _ = _ours(engine, prompt, 4 * GEN)
        runs.setdefault("ours plain", []).append(tps)
        tps, tokens, _ = _ours(engine, prompt, 4 * GEN, speculative="ngram")
        assert tokens == plain
        runs.setdefault("ours prompt lookup", []).append(tps)
        tps, tokens, _ = _ours(engine, prompt, 4 * GEN, speculative="draft", draft_model=other)
        assert tokens == plain
        runs.setdefault("ours unrelated draft", []).append(tps)
    _table(f"demo, drafts rejected ({4 * GEN} tokens)", runs)


@pytest.fixture(scope="module")
def demo_engine_and_other(tmp_path_factory):
    other = mhc.make_test_model(tmp_path_factory.mktemp("m") / "other", preset="demo", seed=7)
    return mhc.load("demo"), mhc.load(other)
