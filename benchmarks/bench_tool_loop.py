"""A reply with a built-in tool call: continuing from the row's held KV cache vs
re-prefilling the whole context, on the demo model.

    MHC_BENCH_TOOL_LOOP=1 python -m pytest benchmarks/bench_tool_loop.py -s

Side by side in one run, alternating rounds: the same scripted reply (one python call, then
the answer; the tool is an in-process stand-in that answers at once, so only the engine's
part is timed) on an engine that holds the row's cache for the continuation ("held") and on
one with ``reuse_cache=False`` ("re-prefill", what a loop above an engine without the hold
would pay). Prints the medians, the prompt tokens each prefilled and the ratio. Without the
variable (and under ``--benchmark-disable``) the prompt is short: a smoke test.
"""

import os
import statistics
import sys
import time
from pathlib import Path

import mlx_harmony_core as mhc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.tool_script import FakeTools, ScriptProcessor, final, python_call  # noqa: E402

FULL = bool(os.environ.get("MHC_BENCH_TOOL_LOOP"))
ROUNDS = int(os.environ.get("MHC_BENCH_ROUNDS", "5")) if FULL else 1
WORDS = 300 if FULL else 10
GREEDY = mhc.SamplingParams(temperature=0)


def reply(engine, i):
    """One scripted two-leg reply; seconds and the prompt tokens it prefilled."""
    script = ScriptProcessor([python_call("print(1)"), final("one")])
    prompt = [{"role": "user", "content": f"{i} " + "long context words " * WORDS}]
    start = time.perf_counter()
    c = engine.generate(prompt, GREEDY, builtin_tools=["python"], logits_processors=[script])
    took = time.perf_counter() - start
    assert c.text == "one" and len(c.builtin_calls) == 1
    return took, c.usage.prompt_tokens - c.usage.cached_prompt_tokens


def engine(**options):
    eng = mhc.load("demo", **options)
    tools = FakeTools(("python",))
    eng.builtin_tools = {"python": tools}
    eng.builtin_tools_fixed = True
    return eng


def test_tool_continuation_held_cache_vs_reprefill(benchmark):
    held, fresh = engine(), engine(reuse_cache=False)
    reply(held, -1), reply(fresh, -1)  # warm-up
    times: dict[str, list[float]] = {"held": [], "re-prefill": []}
    prefilled = {}
    for r in range(ROUNDS):  # alternating rounds: the machine's load hits both alike
        for name, eng in (("held", held), ("re-prefill", fresh)):
            took, n = reply(eng, r)
            times[name].append(took)
            prefilled[name] = n
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["re-prefill"] / med["held"]
    print(
        f"\nreply with one python call, ~{WORDS * 3} words of context: held cache "
        f"{med['held'] * 1000:.0f} ms ({prefilled['held']} tokens prefilled) | re-prefill "
        f"{med['re-prefill'] * 1000:.0f} ms ({prefilled['re-prefill']} prefilled) | "
        f"ratio {ratio:.2f}x"
    )
    benchmark.group = "tool loop: continuation from the held cache"
    benchmark.extra_info.update(
        held_ms=round(med["held"] * 1000, 1),
        reprefill_ms=round(med["re-prefill"] * 1000, 1),
        ratio=round(ratio, 2),
    )
    benchmark.pedantic(lambda: reply(held, 0), rounds=ROUNDS, iterations=1)
    assert prefilled["held"] < prefilled["re-prefill"]
