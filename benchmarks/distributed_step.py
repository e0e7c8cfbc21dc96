"""Run by every rank (benchmarks/bench_distributed.py; also alone, as the 1-rank baseline):
decode speed of MODEL, per-rank memory, and the latency of the collectives one step makes.

``distributed_step.py MODEL OUT TOKENS group clients N ROUNDS``: rank 0 serves N concurrent
clients (distinct prompts, greedy, TOKENS tokens each), in alternating rounds one at a time
(``max_batch=1``, what a group did before it batched) and batched (``max_batch=N``); OUT gets
the aggregate tok/s of every round. The same file runs under another checkout's Python (the
benchmark's baseline of the main branch) with its own mlx_harmony_core.
"""

import json
import sys
import threading
import time

# isort: off
import mlx_harmony_core as mhc  # before mlx.core: it routes MLX's BLAS to OpenBLAS
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_harmony_core import distributed
# isort: on


def main() -> int:
    path, out, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    group = distributed.init() if len(sys.argv) > 4 else None
    engine = mhc.load(path, group=group)
    mx.eval(engine.model.parameters())
    mx.synchronize()
    rank, size = (group.rank, group.size) if group else (0, 1)
    weights = sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))
    memory = [mx.get_active_memory() / 2**20, weights / 2**20]
    comm_us = 0.0
    if group is not None:
        mine = mx.zeros((2, size))
        for i, v in enumerate(memory):
            mine = mine.at[i, rank].add(v)
        memory = mx.distributed.all_sum(mine, stream=mx.cpu).tolist()
        # One step's collectives: an all_sum of the hidden state after attention and after
        # the experts in every layer, the embedding lookup's and the token broadcast (all
        # as small as one hidden state) ...
        hidden = mx.zeros((1, 1, engine.config["hidden_size"]))
        mx.eval(mx.distributed.all_sum(hidden))
        t0 = time.perf_counter()
        for _ in range(200):
            mx.eval(mx.distributed.all_sum(hidden))
        per = (time.perf_counter() - t0) / 200
        # ... and the gather of the logits (each rank computes its slice of the vocabulary)
        part = mx.zeros((-(-engine.config["vocab_size"] // size), 1, 1))
        mx.eval(mx.distributed.all_gather(part))
        t0 = time.perf_counter()
        for _ in range(50):
            mx.eval(mx.distributed.all_gather(part))
        gather = (time.perf_counter() - t0) / 50
        comm_us = (per * (2 * engine.config["num_hidden_layers"] + 2) + gather) * 1e6
        if not group.leader:
            return distributed.follow(engine)
    if len(sys.argv) > 5 and sys.argv[5] == "clients":
        result = clients(engine, tokens, int(sys.argv[6]), int(sys.argv[7]))
        with open(out, "w") as f:
            json.dump(result, f)
        if group is not None:
            group.send(None)
        return 0
    msgs = [{"role": "user", "content": "Write a long story."}]
    params = mhc.SamplingParams(temperature=0)
    engine.generate(msgs, params=params, max_tokens=4)  # warm up
    runs = []
    for _ in range(3):
        r = engine.generate(msgs, params=params, max_tokens=tokens, ignore_eos=True)
        runs.append(r.timings.decode_tokens_per_s)
    with open(out, "w") as f:
        json.dump({"ranks": size, "decode_tps": runs, "memory_mb": memory, "comm_us": comm_us}, f)
    if group is not None:
        group.send(None)
    return 0


def clients(engine: object, tokens: int, n: int, rounds: int) -> dict[str, list[float]]:
    """Aggregate decode tok/s of ``n`` concurrent clients, one at a time vs batched."""
    params = mhc.SamplingParams(temperature=0)

    def run(batch: int) -> float:
        engine.batching(max_batch=batch)  # type: ignore[attr-defined]
        done: list[int] = []

        def client(i: int) -> None:
            msgs = [{"role": "user", "content": f"Client {i}: write a long story about {i}."}]
            r = engine.generate(msgs, params=params, max_tokens=tokens, ignore_eos=True)  # type: ignore[attr-defined]
            done.append(r.usage.completion_tokens)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        assert len(done) == n and all(d == tokens for d in done), done
        return sum(done) / seconds

    run(n)  # warm up
    out: dict[str, list[float]] = {"one_at_a_time": [], "batched": []}
    for _ in range(rounds):
        out["one_at_a_time"].append(run(1))
        out["batched"].append(run(n))
    return out


if __name__ == "__main__":
    sys.exit(main())
