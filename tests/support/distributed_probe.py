"""Run by every rank of a test group (tests/test_distributed.py): loads MODEL sharded, checks
a forward pass and a few requests on rank 0, writes what it saw to OUT (rank 0)."""

import json
import sys

# isort: off
import mlx_harmony_core as mhc  # before mlx.core: it routes MLX's BLAS to OpenBLAS
import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_harmony_core import distributed
# isort: on


def main() -> int:
    path, out = sys.argv[1], sys.argv[2]
    group = distributed.init()
    engine = mhc.load(path, group=group)
    mx.eval(engine.model.parameters())
    mx.synchronize()
    # Every rank's resident memory and weights, gathered on rank 0 (MB, float32).
    sharded = sum(v.nbytes for _, v in tree_flatten(engine.model.parameters()))
    mine = mx.zeros((2, group.size))
    mine = mine.at[0, group.rank].add(mx.get_active_memory() / 2**20)
    mine = mine.at[1, group.rank].add(sharded / 2**20)
    memory, sharded_mb = mx.distributed.all_sum(mine, stream=mx.cpu).tolist()
    # A forward pass over a whole prompt: every rank runs it (its collectives pair up).
    logits = engine.model(mx.array([list(range(1000, 1200))]))
    mx.eval(logits)
    if not group.leader:
        return distributed.follow(engine)
    msgs = [{"role": "user", "content": "Count from one to fifty, in words."}]
    greedy = mhc.SamplingParams(temperature=0)
    seeded = mhc.SamplingParams(temperature=1.0, seed=7)
    r1 = engine.generate(msgs, params=greedy, max_tokens=200)
    r2 = engine.generate(msgs, params=seeded, max_tokens=40)
    cut = r1.text[20:26] if len(r1.text) > 30 else None  # ends mid-reply: the early end path
    r3 = engine.generate(msgs, params=greedy, max_tokens=200, stop=[cut] if cut else None)
    r4 = engine.generate(msgs, params=greedy, max_tokens=5)
    with open(out, "w") as f:
        json.dump(
            {
                "memory_mb": memory,
                "sharded_mb": sharded_mb,
                "logits": logits[0, :, :64].tolist(),
                "greedy": r1.text,
                "greedy_tokens": r1.usage.completion_tokens,
                "seeded": r2.text,
                "stopped": [r3.text, r3.finish_reason, cut],
                "short": r4.text,
                "info": mhc.backend_info()["distributed"],
            },
            f,
        )
    group.send(None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
