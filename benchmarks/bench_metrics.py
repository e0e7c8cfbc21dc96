"""What ``/metrics`` costs per token: the same work with metrics on (``ours``) and off
(baseline ``no_metrics``), in one run.

- ``metrics_sink``: 4096 stream events through the server's engine-client seam (a client
  double, no model), metered (:class:`MeteredClient`: one attribute check per event, one
  count per request) or not: the per-token overhead alone.
- ``metrics_server``: a streamed 64-token completion on the demo model through the real
  server with ``metrics=True`` / ``False``.

The time per token is printed for both; the ratio table shows no_metrics / ours (1.0: free).
"""

import json
import time
from typing import Any

import httpx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.request import Completion, StreamEvent, Timings, Usage
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.server.metrics import MeteredClient, ServerMetrics
from mlx_harmony_core.testing import ServerThread

EVENTS = 4096
TOKENS = 64


class _Events:
    """A client double whose ``submit`` delivers ``EVENTS`` events on the caller's thread."""

    context_length = 64
    pending = 0

    def __init__(self) -> None:
        usage = Usage(prompt_tokens=10, completion_tokens=EVENTS, cached_prompt_tokens=4)
        timings = Timings(ttft_s=0.01, decode_s=1.0, decode_tokens_per_s=EVENTS, total_s=1.0)
        done = Completion("", "", [], "length", usage, timings)
        self.events = [StreamEvent(delta="x") for _ in range(EVENTS - 1)]
        self.events.append(StreamEvent(completion=done, finish_reason="length"))

    def submit(self, request: Any, sink: Any) -> Any:
        for event in self.events:
            sink(event)
        return self


@pytest.mark.parametrize("engine", ["ours", "no_metrics"])
def test_metrics_sink(benchmark, engine):
    inner = _Events()
    client = MeteredClient(inner, ServerMetrics(inner, "bench")) if engine == "ours" else inner
    seen: list[Any] = []
    sink = seen.append

    def run() -> None:
        seen.clear()
        client.submit(None, sink)

    benchmark.group = "metrics_sink"
    benchmark.extra_info["engine"] = engine
    benchmark(run)
    assert len(seen) == EVENTS
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        print(f"\n{engine}: {stats.stats.median / EVENTS * 1e9:.1f} ns per event (sink)")


@pytest.fixture(scope="module")
def demo():
    engine = mhc.load("demo", reuse_cache=False)
    # Warm (the first requests of a process are slower): the first case is not penalized.
    opts = ServerOptions(model_name="demo", metrics=False)
    with ServerThread(engine, opts) as url:
        body = {"prompt": "Hello", "max_tokens": TOKENS}
        for _ in range(3):
            httpx.post(url + "/v1/completions", json=body, timeout=300)
    return engine


@pytest.mark.parametrize("engine", ["ours", "no_metrics"])
def test_metrics_server(benchmark, demo, engine):
    opts = ServerOptions(model_name="demo", metrics=engine == "ours")
    body = {"prompt": "Hello", "max_tokens": TOKENS, "stream": True}
    body["logit_bias"] = {"200002": -100, "200012": -100}  # exact token counts
    with ServerThread(demo, opts) as url, httpx.Client() as http:

        def run() -> int:
            chunks = 0
            with http.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {") and json.loads(line[6:])["choices"]:
                        chunks += 1
            return chunks

        benchmark.group = "metrics_server"
        benchmark.extra_info["engine"] = engine
        start = time.perf_counter()
        assert benchmark.pedantic(run, rounds=5, warmup_rounds=1) > 0
        took = time.perf_counter() - start
    print(f"\n{engine}: {took / (6 * TOKENS) * 1e3:.3f} ms per token (server, 6 runs)")
