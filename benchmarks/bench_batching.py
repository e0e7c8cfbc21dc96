"""Concurrent clients against batching servers: ours vs mlx-lm's own server (which batches).

Three servers, each its own process on the same model directory (make-test-model writes
the Hugging Face tokenizer and Harmony chat template mlx_lm.server needs):

- ``ours``: ``mlx-harmony-core serve --max-batch 16``;
- ``mlx_lm``: ``mlx_lm server --decode-concurrency 16`` as users start it (MLX's reference
  BLAS on Linux);
- ``mlx_lm+blas``: the same with our OpenBLAS routing loaded first (so the comparison is of
  the serving engines, not of the matrix library).

Each of C clients sends requests one after another to ``/v1/completions`` (the Harmony-
rendered chat as text, ``stream: true``, 64 tokens: a logit bias bans the end tokens so
every reply is exactly that long). We measure requests/s, aggregate decode tokens/s and
time to first token (p50 / p95), in alternating rounds (servers in rotating order), and
print min / median / max over the rounds. ``MHC_BENCH_PRESET=small`` runs the 0.24B model;
``MHC_BENCH_CLIENTS`` (1,4,8,16), ``MHC_BENCH_MODES`` (greedy,top_p), ``MHC_BENCH_ROUNDS`` (3)
and ``MHC_BENCH_PER_CLIENT`` (2 requests) trim the run.
"""

import concurrent.futures as cf
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

import mlx_harmony_core as mhc
from conftest import BATCH_ROWS
from mlx_harmony_core.harmony import HarmonyFormat
from mlx_harmony_core.models.builder import make_test_model
from mlx_harmony_core.testing import ServerProcess, free_port

NO_END = {"200002": -100, "200012": -100, "199999": -100, "200007": -100}
SAMPLING = {"greedy": {"temperature": 0.0}, "top_p": {"temperature": 1.0, "top_p": 0.9}}


def _model_dir() -> Path:
    preset = os.environ.get("MHC_BENCH_PRESET", "demo")
    path = Path(os.environ["MLX_HARMONY_CORE_HOME"]) / "bench-models" / preset
    if not (path / "tokenizer.json").exists():
        make_test_model(path, preset=preset, seed=0, overwrite=True)
    return path


def _command(kind: str, model: Path, port: int, batch: int) -> list[str]:
    if kind == "ours":
        return [
            sys.executable,
            "-m",
            "mlx_harmony_core.cli",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--max-batch",
            str(batch),
            "--max-queue",
            "256",
        ]
    args = ["--model", str(model), "--port", str(port), "--decode-concurrency", str(batch)]
    args += ["--log-level", "WARNING"]
    if kind == "mlx_lm":
        return [sys.executable, "-m", "mlx_lm", "server", *args]
    code = (  # our BLAS routing first, then mlx-lm's server, unchanged
        "import sys, mlx_harmony_core\n"
        "from mlx_lm.server import main\n"
        f"sys.argv = ['mlx_lm.server', *{args!r}]\n"
        "main()\n"
    )
    return [sys.executable, "-c", code]


def _server(kind: str, model: Path, batch: int) -> ServerProcess:
    port = free_port()
    return ServerProcess(_command(kind, model, port, batch), port)


def _request(url: str, prompt: str, tokens: int, sampling: dict) -> tuple[float, float, int]:
    body = {"prompt": prompt, "max_tokens": tokens, "stream": True}  # each server's default model
    body.update(logit_bias=NO_END, **sampling)
    start = time.perf_counter()
    ttft, pieces = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    pieces += 1
                    if ttft is None:
                        ttft = time.perf_counter() - start
    end = time.perf_counter()
    return (ttft if ttft is not None else end - start), end - start, pieces


def _prompts(n: int) -> list[str]:
    fmt, enc = HarmonyFormat(), mhc.load_encoding()
    out = []
    for i in range(n):
        ids = fmt.render([{"role": "user", "content": f"I am client {i}. Tell me a story."}])
        out.append(enc.decode(ids))
    return out


def _workload(url: str, clients: int, per_client: int, tokens: int, sampling: dict) -> dict:
    prompts = _prompts(clients)

    def client(i: int) -> list[tuple[float, float, int]]:
        return [_request(url, prompts[i], tokens, sampling) for _ in range(per_client)]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        runs = [x for r in pool.map(client, range(clients)) for x in r]
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in runs)
    return {
        "req_s": len(runs) / wall,
        "tok_s": len(runs) * tokens / wall,
        "ttft_p50": statistics.median(ttfts),
        "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
    }


KINDS = ("ours", "mlx_lm", "mlx_lm+blas")


def test_batching_servers(benchmark):
    quick = benchmark.disabled
    model = _model_dir()
    env = os.environ.get
    kinds = KINDS[:2] if quick else KINDS
    counts = [2] if quick else [int(c) for c in env("MHC_BENCH_CLIENTS", "1,4,8,16").split(",")]
    modes = ["greedy"] if quick else env("MHC_BENCH_MODES", ",".join(SAMPLING)).split(",")
    rounds = 1 if quick else int(env("MHC_BENCH_ROUNDS", "3"))
    tokens, per_client = (4, 1) if quick else (64, int(env("MHC_BENCH_PER_CLIENT", "2")))
    servers = {k: _server(k, model, 16) for k in kinds}
    try:
        for s in servers.values():  # warm-up: first compile and caches
            _request(s.url, _prompts(1)[0], 4, SAMPLING["greedy"])
        results: dict[tuple, list[dict]] = {}
        for mode in modes:
            for clients in counts:
                for r in range(rounds):
                    order = kinds[r % len(kinds) :] + kinds[: r % len(kinds)]
                    for kind in order:
                        m = _workload(
                            servers[kind].url, clients, per_client, tokens, SAMPLING[mode]
                        )
                        results.setdefault((mode, clients, kind), []).append(m)
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    finally:
        for s in servers.values():
            s.close()
    for (mode, clients, kind), runs in results.items():
        BATCH_ROWS.append((f"{mode}, {clients} clients", kind, runs))
    for runs in results.values():
        assert all(r["tok_s"] > 0 for r in runs)
