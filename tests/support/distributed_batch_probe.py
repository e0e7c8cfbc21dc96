"""Run by every rank of a test group (tests/test_distributed.py): rank 0 serves 8 requests at
once (greedy and seeded, stop strings, penalties, prompt lookup, a shared long prefix the
prefix cache holds), then a cancelled one and one more; writes what it got to OUT.

``requests(cut)`` is also what the test runs in one process, one request at a time.
``--out-of-step N``: the follower skips a step after its N-th message (rank 0 must fail
the next request with a GroupError, and every later one at once).
"""

import json
import sys
import time
from typing import Any

# isort: off
import mlx_harmony_core as mhc  # before mlx.core: it routes MLX's BLAS to OpenBLAS
import mlx.core as mx

from mlx_harmony_core import distributed, distributed_batch
# isort: on

# A long shared prefix (past the demo model's 128-token sliding window).
PREFIX = "You answer questions about this text. " + " ".join(
    f"Line {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(12)
)


def msgs(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": PREFIX}, {"role": "user", "content": question}]


def requests(cut: str | None) -> list[dict[str, Any]]:
    """The 8 concurrent requests: keyword arguments of ``engine.submit``."""
    greedy = mhc.SamplingParams(temperature=0)
    return [
        {"messages": msgs("Count to ten."), "params": greedy, "max_tokens": 60},
        {
            "messages": msgs("Tell a story."),
            "params": mhc.SamplingParams(temperature=1.0, seed=3),
            "max_tokens": 40,
        },
        {
            "messages": msgs("Count to ten."),
            "params": greedy,
            "max_tokens": 60,
            "stop": [cut] if cut else None,
        },
        {
            "messages": msgs("Repeat line 3 and line 4 exactly."),
            "params": greedy,
            "max_tokens": 50,
            "speculative": "ngram",
        },
        {
            "messages": msgs("Say hi."),
            "params": mhc.SamplingParams(temperature=0.8, top_p=0.9, seed=5),
            "max_tokens": 30,
        },
        {
            "messages": msgs("List colors."),
            "params": mhc.SamplingParams(temperature=0, repetition_penalty=1.3),
            "max_tokens": 30,
        },
        {"messages": msgs("One word."), "params": greedy, "max_tokens": 5},
        {
            "messages": [{"role": "user", "content": "No shared prefix here."}],
            "params": mhc.SamplingParams(temperature=0.7, seed=11),
            "max_tokens": 45,
        },
    ]


def submit(engine: Any, spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    return engine.submit(spec.pop("messages"), spec.pop("params"), **spec)


def main() -> int:
    path, out = sys.argv[1], sys.argv[2]
    skip = int(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--out-of-step" else None
    group = distributed.init(timeout_s=20)
    engine = mhc.load(path, group=group, prefix_cache_entries=16)
    mx.eval(engine.model.parameters())
    if not group.leader:
        if skip is not None:  # a follower that drifts: it counts one step too many
            apply = distributed.Follower.apply

            def drift(self: Any, message: dict[str, Any]) -> None:
                apply(self, message)
                if self.step == skip:
                    self.step += 1

            distributed.Follower.apply = drift  # type: ignore[method-assign]
        return distributed.follow(engine)
    if skip is not None:
        return out_of_step(engine, group, out)
    # Decode steps whose rows all draw greedily (they exchange each row's best logits).
    greedy = [0]
    step = distributed_batch.greedy_step

    def counted(*args: Any) -> Any:
        greedy[0] += 1
        return step(*args)

    distributed_batch.greedy_step = counted  # type: ignore[assignment]
    # Alone first: the prefix is then in every rank's prefix cache.
    first = submit(engine, requests(None)[0]).result()
    cut = first.text[12:18] if len(first.text) > 24 else None
    t0 = time.perf_counter()
    handles = [submit(engine, spec) for spec in requests(cut)]
    batch = [h.result() for h in handles]
    seconds = time.perf_counter() - t0
    batched = engine.batching().stats()
    # A cancelled reply mid-way, then the group is still in step.
    n = [0]

    def stop_after() -> bool:
        n[0] += 1
        return n[0] > 8

    cancelled = submit(engine, {**requests(None)[0], "should_stop": stop_after}).result()
    after = submit(engine, requests(None)[7]).result()
    with open(out, "w") as f:
        json.dump(
            {
                "first": first.text,
                "cut": cut,
                "texts": [c.text for c in batch],
                "finish": [c.finish_reason for c in batch],
                "cached": [c.usage.cached_prompt_tokens for c in batch],
                "drafted": [c.usage.drafted_tokens for c in batch],
                "accepted": [c.usage.accepted_tokens for c in batch],
                "tokens": sum(c.usage.completion_tokens for c in batch),
                "seconds": seconds,
                "stats": batched,
                "cancelled": [cancelled.text, cancelled.finish_reason],
                "after": after.text,
                "greedy_steps": greedy[0],
            },
            f,
        )
    group.send(None)
    return 0


def out_of_step(engine: Any, group: Any, out: str) -> int:
    """The follower drifts after its message ``skip``: a request fails, later ones at once."""
    got: dict[str, Any] = {}
    spec = requests(None)[0]
    try:
        got["ok"] = submit(engine, {**spec, "max_tokens": 2}).result().text
        submit(engine, spec).result()
        got["second"] = "finished"
    except Exception as exc:
        got["second"] = f"{type(exc).__name__}: {exc}"
    t0 = time.perf_counter()
    try:
        submit(engine, spec).result()
        got["third"] = "finished"
    except Exception as exc:
        got["third"] = f"{type(exc).__name__}: {exc}"
    got["third_s"] = time.perf_counter() - t0
    with open(out, "w") as f:
        json.dump(got, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
