"""Tensor-parallel GPT-OSS over MLX's ring backend: 2 ranks on 127.0.0.1 against one process."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_harmony_core as mhc
from mlx_harmony_core.errors import ModelLoadError
from mlx_harmony_core.testing import free_port

HERE = Path(__file__).parent
BATCH_PROBE = HERE / "support" / "distributed_batch_probe.py"
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.skipif(
    not mx.distributed.is_available("ring"), reason="MLX built without the ring backend"
)


def mlx_launch(*command: str) -> list[str]:
    """``command`` on 2 ring ranks on 127.0.0.1 through ``mlx.launch`` itself."""
    return [
        str(BIN / "mlx.launch"),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        "2",
        "--starting-port",
        str(free_port()),
        "--",
        *command,
    ]


def hostfile(tmp_path: Path, n: int = 2) -> Path:
    path = tmp_path / f"hosts-{time.monotonic_ns()}.json"
    path.write_text(json.dumps([[f"127.0.0.1:{free_port()}"] for _ in range(n)]))
    return path


def start(cmd: list[str], hosts: Path, tmp_path: Path, n: int = 2) -> list[subprocess.Popen]:
    """Every rank of ``cmd`` with the environment mlx.launch gives them (ring backend)."""
    procs = []
    for rank in range(n):
        env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hosts)}
        log = open(tmp_path / f"rank{rank}-{time.monotonic_ns()}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs


def logs(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.log")))


def wait(procs: list[subprocess.Popen], tmp_path: Path, timeout: float = 240) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("a rank hung:\n" + logs(tmp_path))


@pytest.fixture(scope="module")
def model_dir():
    from mlx_harmony_core.models.builder import demo_model_path

    return demo_model_path()


def _weight_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_two_ranks_match_one_process(model_dir, tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(HERE / "support" / "distributed_probe.py"), str(model_dir), str(out)]
    procs = start(cmd, hostfile(tmp_path), tmp_path)
    assert wait(procs, tmp_path) == [0, 0], logs(tmp_path)
    got = json.loads(out.read_text())
    assert got["info"] == {"size": 2, "rank": 0, "backend": "ring"}

    single = mhc.load(model_dir)
    logits = single.model(mx.array([list(range(1000, 1200))]))[0, :, :64]
    assert np.abs(np.array(logits) - np.array(got["logits"])).max() < 1e-4
    msgs = [{"role": "user", "content": "Count from one to fifty, in words."}]
    greedy = single.generate(msgs, params=mhc.SamplingParams(temperature=0), max_tokens=200)
    # past the sliding window (128): the rotating caches wrapped on every rank alike
    assert greedy.usage.prompt_tokens + greedy.usage.completion_tokens > 128
    assert got["greedy"] == greedy.text and got["greedy_tokens"] == 200
    seeded = single.generate(
        msgs, params=mhc.SamplingParams(temperature=1.0, seed=7), max_tokens=40
    )
    assert got["seeded"] == seeded.text
    text, finish, cut = got["stopped"]
    assert finish == "stop" and cut not in text and greedy.text.startswith(text)
    short = single.generate(msgs, params=mhc.SamplingParams(temperature=0), max_tokens=5)
    assert got["short"] == short.text  # the group still in step after the early end

    # each rank holds half of the weights (embedding and head split by vocabulary rows too),
    # and that is what is resident
    whole = _weight_bytes(single.model) / 2**20
    for weights, resident in zip(got["sharded_mb"], got["memory_mb"], strict=True):
        assert 0.45 * whole < weights < 0.55 * whole, (got, whole)
        assert resident < 0.6 * whole, (got, whole)


def test_cli_generate_under_mlx_launch(model_dir, tmp_path):
    args = [
        "generate",
        "-m",
        str(model_dir),
        "--prompt",
        "hi",
        "--temperature",
        "0",
        "--max-tokens",
        "40",
    ]
    one = subprocess.run(
        [str(BIN / "mlx-harmony-core"), *args], capture_output=True, text=True, timeout=120
    )
    assert one.returncode == 0, one.stderr
    two = subprocess.run(
        mlx_launch(str(BIN / "mlx-harmony-core"), *args, "--distributed"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count(one.stdout.strip()) == 1  # rank 0 alone prints the reply


def test_without_a_launcher_is_a_clear_error(model_dir):
    run = subprocess.run(
        [
            str(BIN / "mlx-harmony-core"),
            "generate",
            "--distributed",
            "-m",
            str(model_dir),
            "--prompt",
            "hi",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("MLX_")},
    )
    assert run.returncode == 2 and "mlx.launch" in run.stderr


class FakeGroup:
    size, rank, leader, broken = 2, 0, True, None


def test_requests_a_group_cannot_run():
    with pytest.raises(ModelLoadError, match="GGUF"):
        mhc.load("model.gguf", group=FakeGroup())


def _probe():
    spec = importlib.util.spec_from_file_location("batch_probe", BATCH_PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_ranks_batch_eight_requests_like_one_process(model_dir, tmp_path):
    """8 requests at once in one group batch (greedy, seeded, a stop string, penalties,
    prompt lookup, a shared long prefix from the prefix cache, one leaving early), then a
    cancelled one: every reply equals the same request decoded alone in one process."""
    out = tmp_path / "out.json"
    procs = start(
        [sys.executable, str(BATCH_PROBE), str(model_dir), str(out)], hostfile(tmp_path), tmp_path
    )
    assert wait(procs, tmp_path) == [0, 0], logs(tmp_path)
    got = json.loads(out.read_text())
    probe = _probe()
    single = mhc.load(model_dir)
    alone = [
        probe.submit(single, {**spec, "speculative": None}).result()
        for spec in probe.requests(got["cut"])
    ]
    assert got["first"] == alone[0].text
    assert got["texts"] == [c.text for c in alone]
    assert got["finish"] == [c.finish_reason for c in alone]
    assert got["cut"] and got["finish"][2] == "stop"
    assert got["drafted"][3] > 0  # prompt lookup verified drafts in the batch
    assert sum(n > 100 for n in got["cached"]) >= 6  # the shared prefix came from the cache
    text, finish = got["cancelled"]
    assert finish == "cancelled" and alone[0].text.startswith(text)
    assert got["after"] == alone[7].text
    assert got["greedy_steps"] > 0  # all-greedy steps took the best-logit exchange


def test_a_follower_out_of_step_fails_the_group(model_dir, tmp_path):
    out = tmp_path / "out.json"
    cmd = [sys.executable, str(BATCH_PROBE), str(model_dir), str(out), "--out-of-step", "3"]
    procs = start(cmd, hostfile(tmp_path), tmp_path)
    assert wait(procs, tmp_path) == [0, 1], logs(tmp_path)
    got = json.loads(out.read_text())
    assert got["ok"]
    assert got["second"].startswith("GroupError") and "out of step" in got["second"]
    assert got["third"].startswith("GroupError") and got["third_s"] < 1


def _serve(model_dir, tmp_path, *extra):
    port = free_port()
    cmd = [
        str(BIN / "mlx-harmony-core"),
        "serve",
        "--distributed",
        "-m",
        str(model_dir),
        "--model-name",
        "demo",
        "--port",
        str(port),
        *extra,
    ]
    procs = start(cmd, hostfile(tmp_path), tmp_path)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return port, procs
        except httpx.HTTPError:
            time.sleep(0.2)
        if any(p.poll() is not None for p in procs):
            break
    for p in procs:
        p.kill()
    pytest.fail("the distributed server did not start:\n" + logs(tmp_path))


def test_server_on_rank_0(model_dir, tmp_path):
    import openai

    port, procs = _serve(model_dir, tmp_path)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60
        )
        msgs = [{"role": "user", "content": "hi"}]
        single = mhc.load(model_dir).generate(
            msgs, params=mhc.SamplingParams(temperature=0), max_tokens=30
        )
        r = client.chat.completions.create(
            model="demo", messages=msgs, temperature=0, max_tokens=30
        )
        assert r.choices[0].message.content == single.text
        stream = client.chat.completions.create(
            model="demo", messages=msgs, temperature=0, max_tokens=30, stream=True
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == single.text
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="demo", messages=msgs, temperature=-1)
        stream = client.chat.completions.create(
            model="demo", messages=msgs, max_tokens=3000, stream=True
        )
        for i, _ in enumerate(stream):  # a client that goes away mid-reply: cancelled
            if i > 4:
                break
        stream.close()
        t0 = time.monotonic()
        r = client.chat.completions.create(
            model="demo", messages=msgs, temperature=0, max_tokens=30
        )
        assert r.choices[0].message.content == single.text
        assert time.monotonic() - t0 < 30  # the group is still in step

        # 8 clients at once, decoded in one batch: each reply is the one-process reply.
        engine = mhc.load(model_dir)
        asks = [
            ([{"role": "user", "content": f"Client {i} asks."}], i % 2 and 100 + i, 12 + 3 * i)
            for i in range(8)
        ]

        def ask(item):
            messages, seed, n = item
            temperature = 1.0 if seed else 0
            return (
                client.chat.completions.create(
                    model="demo",
                    messages=messages,
                    temperature=temperature,
                    seed=seed or None,
                    max_tokens=n,
                )
                .choices[0]
                .message.content
            )

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, asks))
        for (messages, seed, n), reply in zip(asks, replies, strict=True):
            params = mhc.SamplingParams(temperature=1.0 if seed else 0, seed=seed or None)
            assert reply == engine.generate(messages, params=params, max_tokens=n).text
    finally:
        procs[0].send_signal(signal.SIGINT)
    assert wait(procs, tmp_path, 60) == [0, 0], logs(tmp_path)  # rank 0 released rank 1


def test_a_dead_rank_is_an_error_not_a_hang(model_dir, tmp_path):
    import openai

    port, procs = _serve(model_dir, tmp_path, "--group-timeout", "5")
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=60
        )
        msgs = [{"role": "user", "content": "hi"}]
        others = [
            client.chat.completions.create(
                model="demo", messages=msgs, max_tokens=5000, stream=True
            )
            for _ in range(3)
        ]
        stream = client.chat.completions.create(
            model="demo", messages=msgs, max_tokens=5000, stream=True
        )
        t0 = None
        with pytest.raises(openai.APIError, match="lost a rank"):
            for i, _ in enumerate(stream):
                if i == 5:
                    procs[1].kill()
                    t0 = time.monotonic()
        assert t0 is not None and time.monotonic() - t0 < 15
        for other in others:  # the rows decoding beside it fail too
            with pytest.raises(openai.APIError, match="lost a rank"):
                for _ in other:
                    pass
        assert time.monotonic() - t0 < 15
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(model="demo", messages=msgs, max_tokens=5)
        assert err.value.status_code == 503 and "restart every rank" in str(err.value)
    finally:
        for p in procs:
            p.kill()
            p.wait(30)


def test_vocab_rows_split_and_pad():
    """Each rank keeps ceil(V / N) rows of the embedding and head (the last zero-padded);
    with one rank the split layers are the whole ones."""
    import mlx.nn as nn

    from mlx_harmony_core.distributed import ShardedEmbedding, ShardedHead

    class Rank:
        def __init__(self, rank, size):
            self._r, self._n = rank, size

        def rank(self):
            return self._r

        def size(self):
            return self._n

    table = mx.arange(10 * 4, dtype=mx.float32).reshape(10, 4)
    e = nn.Embedding(10, 4)
    e.weight = table
    last = ShardedEmbedding(e, Rank(2, 3), 10)
    assert last.start == 8 and last.inner.weight.shape == (4, 4)
    assert mx.array_equal(last.inner.weight[:2], table[8:]) and not last.inner.weight[2:].any()
    q = nn.QuantizedLinear(64, 10, bias=False, group_size=32, bits=4)
    head = ShardedHead(q, Rank(1, 3), 10)
    assert head.inner.weight.shape[0] == 4 and head.inner.scales.shape[0] == 4
    whole = mx.distributed.init(strict=False)  # one process: a group of one
    if whole.size() == 1:
        x = mx.random.normal((2, 3, 64))
        ref = nn.QuantizedLinear(64, 10, bias=False, group_size=32, bits=4)
        one = ShardedHead(ref, whole, 10)
        want = mx.quantized_matmul(x, ref.weight, ref.scales, ref.biases, group_size=32)
        assert mx.allclose(one(x), want)
        ids = mx.array([[0, 9, 3]])
        emb = nn.Embedding(10, 4)
        emb.weight = table
        assert mx.array_equal(ShardedEmbedding(emb, whole, 10)(ids), table[ids])


def test_info_shows_the_group():
    run = subprocess.run(
        mlx_launch(str(BIN / "mlx-harmony-core"), "info", "--distributed"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for rank in (0, 1):
        assert f"distributed: {{'size': 2, 'rank': {rank}, 'backend': 'ring'}}" in run.stdout


def test_message_bytes_and_prefix_cache_mirroring():
    """Control messages survive the int32 packing (any length); a follower's prefix cache
    evicts down to rank 0's entry count, oldest first, and clears are counted."""
    from mlx_harmony_core.distributed import _pack, _unpack
    from mlx_harmony_core.prefix_cache import PrefixCache

    for data in (b"", b"{", b'{"ops":[["decode",[1,2,3]]]}', bytes(range(256)) * 3):
        assert _unpack(_pack(data), len(data)) == data
    pc = PrefixCache(max_entries=8)
    for i in range(4):
        pc.put([i, i + 1], [])
    pc.keep_newest(2)
    assert [e.tokens for e in pc._entries] == [[2, 3], [3, 4]]
    pc.keep_newest(5)
    assert len(pc) == 2
    clears = pc.clears
    pc.clear()
    assert pc.clears == clears + 1 and len(pc) == 0


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_greedy_ids_from_slices_equal_the_samplers_greedy_draw(ranks, dtype):
    """A greedy group step exchanges each rank's best logit per row (distributed.
    best_of_slice / best_of_ranks) instead of the logits: the id equals the fused sampler's
    greedy draw on the whole row, ties (within and across slices), NaN, +inf and all -inf
    rows included."""
    from mlx_harmony_core import _core
    from mlx_harmony_core.distributed import best_of_ranks, best_of_slice
    from mlx_harmony_core.sampling import options, sample_rows

    vocab = 1001
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((9, vocab)).astype(np.float32)
    rows[1, [10, 900]] = 50.0  # a tie across slices: the lower id
    rows[2, [400, 401]] = 50.0  # a tie inside a slice
    rows[3, 700] = np.nan
    rows[4, 5] = np.inf
    rows[5] = -np.inf
    rows[6] = -np.inf
    rows[6, vocab - 1] = -3.0  # the last id of the last (short) slice
    rows[7, :] = 1.0  # every id ties: the first
    rows[8, 333] = -np.inf
    logits = mx.array(rows).astype(dtype)
    per = -(-vocab // ranks)
    every = mx.stack(
        [best_of_slice(logits[:, r * per : (r + 1) * per], r * per) for r in range(ranks)]
    )
    got = best_of_ranks(every).tolist()
    greedy = [options(mhc.SamplingParams(temperature=0), 0) for _ in range(len(rows))]
    want = sample_rows(logits, greedy)[0].tolist()
    assert got == want
    assert got[1] == 10 and got[2] == 400 and got[6] == vocab - 1 and got[7] == 0
    assert got[3] == got[4] == _core.ERROR_NON_FINITE and got[5] == _core.ERROR_NO_CANDIDATE


def test_best_of_slice_flags_nan_and_inf_anywhere_in_a_long_row():
    """best_of_slice flags a row from its max alone (MLX's max is NaN or +inf when the row
    holds one): at any position of a vocabulary-long slice, vectorized or tail."""
    from mlx_harmony_core.distributed import best_of_slice

    n = 100544
    rows = np.random.default_rng(1).standard_normal((8, n)).astype(np.float32)
    spots = [0, 1, 7, 8, 17, 4099, n - 9, n - 1]
    for i, pos in enumerate(spots):
        rows[i, pos] = np.nan if i % 2 else np.inf
    got = best_of_slice(mx.array(rows), 0)[:, 2].tolist()
    assert got == [1.0] * len(spots)
    short = best_of_slice(mx.array(rows[:, :100]), 0)[:, 2].tolist()  # rows 5-7: finite
    assert short == [1.0] * 5 + [0.0] * 3
