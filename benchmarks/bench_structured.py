"""Structured outputs: what a grammar costs per token, per decode step, and to compile.

    python -m pytest benchmarks/bench_structured.py -s                  # demo model
    MHC_BENCH_MID=1 python -m pytest benchmarks/bench_structured.py -s  # + mid (0.84B)

Mask cost: a constrained reply is generated once, then replayed token by token through a
fresh matcher (mask + consume, 201088-token vocabulary). Step overhead: decode tokens/s of
a long constrained answer against the same number of free tokens, alternating rounds.
"""

import os
import statistics
import time

import pytest

import mlx_harmony_core as mhc
from conftest import STRUCTURED_ROWS
from mlx_harmony_core.structured import Grammars, grammars_for, make_guide

ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "5"))
DIGITS = 48
LONG = {  # ~2 tokens per item: a long answer whose every token is masked
    "type": "array",
    "items": {"type": "integer", "minimum": 0, "maximum": 9},
    "minItems": DIGITS,
    "maxItems": DIGITS,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "email", "tags", "address"],
}
CASES = {
    "json long array": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": LONG}}
    },
    "json person": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    },
    "json object": {"response_format": {"type": "json_object"}},
    "regex": {"regex": r"([a-z]{2,8} ){5,20}[0-9]{3}"},
    "lark": {"grammar": 'start: item ("," item)*\nitem: /[a-z]{1,6}/ "=" /[0-9]{1,4}/'},
}


@pytest.fixture(scope="module")
def demo():
    return mhc.load("demo")


@pytest.fixture(scope="module", params=["demo", "mid"])
def model(request, tmp_path_factory, demo):
    if request.param == "mid":
        if not os.environ.get("MHC_BENCH_MID"):
            pytest.skip("set MHC_BENCH_MID=1 for the 0.84B model (minutes, ~7 GB of RAM)")
        path = mhc.make_test_model(tmp_path_factory.mktemp("m") / "mid", preset="mid")
        return "mid", mhc.load(path)
    return "demo", demo


@pytest.mark.parametrize("case", list(CASES))
def test_mask_cost_per_token(demo, case):
    opts = CASES[case]
    params = mhc.SamplingParams(temperature=1.0, seed=1)
    c = demo.generate("go", params, max_tokens=160, max_reasoning_tokens=0, **opts)
    req = demo.request("go", params, max_tokens=160, max_reasoning_tokens=0, **opts)
    guide = req.guide
    costs = []
    for token in c.tokens:
        t0 = time.perf_counter()
        guide.mask()
        costs.append(time.perf_counter() - t0)
        guide.push(token)
    costs.sort()
    med, p90 = statistics.median(costs), costs[int(0.9 * (len(costs) - 1))]
    STRUCTURED_ROWS.append(
        (
            f"mask {case}",
            f"{med * 1e6:8.0f} us median, {p90 * 1e6:6.0f} us p90 ({len(costs)} tokens)",
        )
    )


def test_compile_time(demo):
    t0 = time.perf_counter()
    fresh = Grammars(demo.chat_format, demo.vocab_size)
    _ = fresh.tokenizer
    tokenizer_s = time.perf_counter() - t0
    assert grammars_for(demo.chat_format, demo.vocab_size).tokenizer  # warm the engine's own
    firsts, repeats = [], []
    for i in range(5):
        schema = {**PERSON, "title": f"unique {i} {time.time()}"}  # never compiled before
        opts = {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": schema},
            }
        }
        for out in (firsts, repeats):
            t0 = time.perf_counter()
            guide = make_guide(demo.chat_format, demo.vocab_size, max_reasoning_tokens=0, **opts)
            guide.mask()  # llguidance builds its lexer on the first mask
            out.append(time.perf_counter() - t0)
    STRUCTURED_ROWS.append(("tokenizer (once per process)", f"{tokenizer_s * 1e3:8.0f} ms"))
    STRUCTURED_ROWS.append(
        (
            "schema, first request",
            f"{statistics.median(firsts) * 1e3:8.1f} ms (check + compile + first mask)",
        )
    )
    STRUCTURED_ROWS.append(
        ("schema, repeat (cached)", f"{statistics.median(repeats) * 1e3:8.1f} ms")
    )


def test_step_overhead(model):
    name, engine = model
    schema = CASES["json long array"]
    params = mhc.SamplingParams(temperature=1.0, seed=2)
    probe = engine.generate(
        "digits", params, max_tokens=4 * DIGITS, max_reasoning_tokens=0, **schema
    )
    n = probe.usage.completion_tokens
    free, held = [], []
    for _ in range(ROUNDS):
        c = engine.generate("digits", params, max_tokens=n, ignore_eos=True)
        free.append(c.timings.decode_s / max(1, c.usage.completion_tokens - 1))
        c = engine.generate(
            "digits", params, max_tokens=4 * DIGITS, max_reasoning_tokens=0, **schema
        )
        held.append(c.timings.decode_s / max(1, c.usage.completion_tokens - 1))
    f, h = statistics.median(free), statistics.median(held)
    STRUCTURED_ROWS.append(
        (
            f"step {name} ({n} tokens)",
            f"free {f * 1e3:7.2f} ms, schema {h * 1e3:7.2f} ms: overhead {100 * (h / f - 1):+5.1f}%"
            f"  (rounds: free {' '.join(f'{x * 1e3:.2f}' for x in free)}; "
            f"schema {' '.join(f'{x * 1e3:.2f}' for x in held)})",
        )
    )
