"""Stop matching per generated token, ours vs mlx-lm and vs re-scanning the text in Python.

    python -m pytest benchmarks/bench_stop.py

Each benchmark call processes a 2000-token stream (the o200k tokens of an English text) and
reports the time per token with 1, 10 and 100 stop strings (none of which occurs, the common
case: every token is scanned to the end).
"""

import random

import pytest
from mlx_lm.generate import StopSequences

import mlx_harmony_core as mhc
from mlx_harmony_core.harmony import harmony_detokenizer

WORDS = [
    "the",
    "model",
    "answers",
    "questions",
    "about",
    "physics",
    "history",
    "music",
    "and",
    "code",
    "with",
    "care",
]
N_TOKENS = 2000


@pytest.fixture(scope="module")
def stream():
    enc = mhc.load_encoding()
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(3000))
    tokens = enc.encode(text)[:N_TOKENS]
    d = harmony_detokenizer()
    pieces = [d.push(t) for t in tokens]
    return tokens, pieces


def _stops(n):
    rng = random.Random(n)
    return [
        "".join(rng.choice("qxzjkvw ") for _ in range(rng.randint(3, 12))) + "!" for _ in range(n)
    ]


@pytest.mark.parametrize("n", [1, 10, 100])
@pytest.mark.parametrize("engine", ["ours", "python_rescan"])
def test_stop_strings(benchmark, stream, n, engine):
    _, pieces = stream
    stops = _stops(n)
    benchmark.group = f"stop strings x{n} (per {N_TOKENS} tokens)"
    benchmark.extra_info["engine"] = engine

    def ours():
        m = mhc.StopStrings(stops)
        for p in pieces:
            _, hit = m.push(p)
            if hit:
                break

    def rescan():
        text = ""
        for p in pieces:
            text += p
            if any(s in text for s in stops):
                break

    benchmark(ours if engine == "ours" else rescan)


@pytest.mark.parametrize("n", [1, 10, 100])
@pytest.mark.parametrize("engine", ["ours", "mlx_lm"])
def test_token_stops(benchmark, stream, n, engine):
    tokens, _ = stream
    rng = random.Random(n)
    seqs = [[rng.randrange(199000, 199990) for _ in range(rng.randint(1, 4))] for _ in range(n)]
    benchmark.group = f"stop token sequences x{n} (per {N_TOKENS} tokens)"
    benchmark.extra_info["engine"] = engine

    def ours():
        m = mhc.TokenStops(seqs)
        for t in tokens:
            if m.push(t) is not None:
                break

    def theirs():
        m = StopSequences(seqs).matcher()
        for t in tokens:
            if m.advance(t):
                break

    benchmark(ours if engine == "ours" else theirs)
