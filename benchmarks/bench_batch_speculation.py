"""Speculation in a batch, side by side: 8 concurrent requests decoded plainly in one batch
against the same 8 speculating (every row verifying its own drafts in one pass), in
alternating rounds, aggregate tokens per second over the wall time of the whole batch.

    MHC_BENCH_BATCH_SPEC=1 python -m pytest benchmarks/bench_batch_speculation.py -s

(``MHC_BENCH_ROUNDS``: rounds, ``MHC_BENCH_GEN``: tokens per free-text request. On a loaded
machine run with ``OPENBLAS_NUM_THREADS=1``: OpenBLAS's two threads wait on each other
when the cores are oversubscribed, ~10x slower per step, and drown every ratio.)

Cases: 8 copy requests with prompt lookup on the real SmolLM2-135M (float32 weights and
its Q4_1 GGUF as loaded): "repeat this text / code exactly", max_tokens the copy's length;
the same model on short copies followed by free text (opt-in, ``MHC_BENCH_FREE_TEXT=1``);
and drafts that never match (an unrelated random draft model on the demo model). Greedy
everywhere; every speculative row's tokens are checked against the plain batch's. Without
the variable a tiny run checks that the code path works.
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
PROSE = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower "
    "from 1887 to 1889. Locally nicknamed La dame de fer, it was constructed as the centrepiece "
    "of the 1889 World's Fair, and to crown the centennial anniversary of the French Revolution.",
    "The Great Wall of China is a series of fortifications that were built across the historical "
    "northern borders of ancient Chinese states and Imperial China as protection against various "
    "nomadic groups from the Eurasian Steppe. Several walls were built from as early as the 7th "
    "century BC, with selective stretches later joined by Qin Shi Huang, the first emperor.",
    "Python is a high-level, general-purpose programming language. Its design philosophy "
    "emphasizes code readability with the use of significant indentation. Python is dynamically "
    "typed and garbage-collected. It supports multiple programming paradigms, including "
    "structured, object-oriented and functional programming.",
    "Mount Everest is the highest mountain on Earth above sea level, located in the Mahalangur "
    "Himal sub-range of the Himalayas. The China-Nepal border runs across its summit point. Its "
    "elevation of 8,848.86 metres was most recently established in 2020 by the Chinese and "
    "Nepali authorities.",
]
CODE = [
    "def fibonacci(n):\n    result = []\n    a, b = 0, 1\n    for _ in range(n):\n"
    "        result.append(a)\n        a, b = b, a + b\n    return result\n\n\n"
    "def main():\n    for i, value in enumerate(fibonacci(10)):\n"
    '        print(f"fib({i}) = {value}")\n',
    "def is_prime(n):\n    if n < 2:\n        return False\n    for d in range(2, int(n ** 0.5) + 1):\n"
    "        if n % d == 0:\n            return False\n    return True\n\n\n"
    "def primes_below(limit):\n    return [n for n in range(limit) if is_prime(n)]\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
    "        self.items.append(item)\n\n    def pop(self):\n        return self.items.pop()\n\n"
    "    def is_empty(self):\n        return len(self.items) == 0\n",
    "def word_count(text):\n    counts = {}\n    for word in text.split():\n"
    '        word = word.lower().strip(".,!?")\n        counts[word] = counts.get(word, 0) + 1\n'
    "    return counts\n",
]
# The requests prompt lookup is for: the answer is a verbatim copy of the input, and
# max_tokens is the copy's length (plus the code fence), as a client that knows it asks
# for a copy sets it; replies end where the model ends them. SmolLM2-135M copies most of
# each text, rewords or drops a few sentences, and adds a line of explanation after some
# of the code.
COPY_SLACK = 12  # tokens past the copy's own (code fences, end of turn)


def _copy_requests(engine) -> list[tuple[list[int], int]]:
    """The 8 copy requests: (prompt tokens, max_tokens)."""
    out = []
    for i in range(ROWS):
        if i % 2 == 0:
            text = PROSE[(i // 2) % len(PROSE)]
            ask = f"Repeat the following text exactly:\n\n{text}"
        else:
            text = CODE[(i // 2) % len(CODE)]
            ask = f"Repeat this code exactly:\n\n```python\n{text}```"
        prompt = engine.chat_format.render([{"role": "user", "content": ask}])
        out.append((prompt, len(engine.encode(text)) + COPY_SLACK))
    return out


# The earlier workload, kept as a harder case: short passages and ignore_eos, so past its
# copy (~35 tokens) each reply invents a new conversation (~2/3 of the tokens are no copy).
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


def _passage(i: int) -> list[dict[str, str]]:
    text = PASSAGES[i % len(PASSAGES)]
    ask = "Repeat the following text exactly:" if i < 4 else "Copy this text word for word:"
    return [{"role": "user", "content": f"{ask}\n\n{text}"}]


def _batch(engine, requests, eos=False, **spec) -> tuple[float, list[list[int]]]:
    """Aggregate tok/s of ``requests`` ((prompt, max_tokens) pairs) decoded together, and
    every row's tokens (``eos``: a reply ends at the model's end of turn, else it runs its
    max_tokens)."""
    engine.reset_cache()
    engine.batching(max_batch=len(requests))
    t0 = time.perf_counter()
    handles = [
        engine.submit(p, GREEDY, max_tokens=n, ignore_eos=not eos, **spec) for p, n in requests
    ]
    done = [h.result(timeout=3600) for h in handles]
    seconds = time.perf_counter() - t0
    return sum(len(c.tokens) for c in done) / seconds, [c.tokens for c in done]


def _side_by_side(case: str, engine, requests, name: str, eos=False, **spec) -> float:
    """Plain and speculative rounds, alternating; the ratio of aggregate tok/s (wall time
    of the whole batch, prefill included), and beside it the ratio of decode tok/s (the
    wall time of the batch's prefill alone, measured each round, taken off)."""
    runs: dict[str, list[float]] = {}
    decode: dict[str, list[float]] = {}
    _, plain = _batch(engine, requests, eos)
    first = [(p, 1) for p, _ in requests]
    for _ in range(ROUNDS):
        tps, _ = _batch(engine, first)  # prefill and one step for every row
        prefill_s = len(requests) / tps
        for label, kw in (("plain batch", {}), (name, spec)):
            tps, tokens = _batch(engine, requests, eos, **kw)
            assert tokens == plain
            runs.setdefault(label, []).append(tps)
            n = sum(len(t) for t in tokens)
            decode.setdefault(label, []).append((n - len(tokens)) / max(1e-9, n / tps - prefill_s))
    base = statistics.median(runs["plain batch"])
    base_decode = statistics.median(decode["plain batch"])
    load = os.getloadavg()[0]  # the machine is shared: ratios mean more than rates
    for label, values in runs.items():
        med, dec = statistics.median(values), statistics.median(decode[label])
        SPEC_ROWS.append(
            (
                case,
                f"{label} (load {load:.1f}; decode only {dec / base_decode:4.2f}x)",
                f"{med:7.1f}",
                f"{med / base:5.2f}x",
            )
        )
    return statistics.median(runs[name]) / base


@pytest.mark.parametrize("weights", ["float32", "q4_1"])
def test_copy_batch_with_prompt_lookup(smollm2_path, weights):
    """8 requests whose answer is a copy of their input (4 passages, 4 code snippets),
    max_tokens the copy's length, ended by the model."""
    if not FULL and weights == "q4_1":
        pytest.skip("the tiny run covers float32")
    engine = mhc.load(smollm2_path, dequantize=weights == "float32")
    requests = _copy_requests(engine)
    if not FULL:
        requests = [(p, 8) for p, _ in requests]
    tokens = sum(n for _, n in requests)
    _side_by_side(
        f"SmolLM2 {weights}, {ROWS} copy requests (<= {tokens} tokens, eos)",
        engine,
        requests,
        "prompt lookup",
        eos=True,
        speculative="ngram",
    )


@pytest.mark.parametrize("weights", ["float32", "q4_1"])
def test_copy_then_free_text_with_prompt_lookup(smollm2_path, weights):
    """Short copies, then ``ignore_eos`` runs every reply to GEN tokens: past its copy
    SmolLM2 invents a new conversation, so most tokens are no copy and the batch waits for
    its slowest row. Opt-in (``MHC_BENCH_FREE_TEXT=1``): not what prompt lookup is for."""
    if not FULL or not os.environ.get("MHC_BENCH_FREE_TEXT"):
        pytest.skip("MHC_BENCH_BATCH_SPEC=1 MHC_BENCH_FREE_TEXT=1 runs it")
    engine = mhc.load(smollm2_path, dequantize=weights == "float32")
    requests = [(engine.chat_format.render(_passage(i)), GEN) for i in range(ROWS)]
    _side_by_side(
        f"SmolLM2 {weights}, {ROWS} short copies + free text ({GEN} tokens, ignore_eos)",
        engine,
        requests,
        "prompt lookup",
        speculative="ngram",
    )


def test_drafts_that_never_match(tmp_path_factory):
    other = mhc.make_test_model(tmp_path_factory.mktemp("m") / "other", preset="demo", seed=7)
    engine, draft = mhc.load("demo"), mhc.load(other)
    requests = [(engine.render(f"Tell me something new about {i}."), 2 * GEN) for i in range(ROWS)]
    _side_by_side(
        f"demo, {ROWS} rows, drafts rejected ({2 * GEN} tokens each)",
        engine,
        requests,
        "unrelated draft model",
        speculative="draft",
        draft_model=draft,
    )
