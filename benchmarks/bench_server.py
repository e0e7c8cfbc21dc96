"""The HTTP server: requests/s and time to first token, 1 and 8 concurrent clients, demo model,
with the prefix cache (ours) vs without it (baseline ``no_reuse``), same server code otherwise.

Each client holds a multi-turn conversation: a shared ~600-token preamble, its own question,
then follow-ups that extend the previous prompt and reply, as chat front ends do. Requests go
to ``/v1/completions`` with the Harmony-rendered conversation and ``stream: true``: the time
to the first streamed text is the TTFT (the chat endpoint holds a random model's first tokens
while it looks for a Harmony header, which would hide the prefill). The benchmark's time is
the whole workload; req/s and mean TTFT are printed at the end.
"""

import concurrent.futures as cf
import json
import time

import httpx
import pytest

import mlx_harmony_core as mhc
from conftest import SERVER_ROWS
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.testing import ServerThread

PREAMBLE = "You are a careful assistant. " + " ".join(f"Rule {i}: be exact." for i in range(120))


@pytest.fixture(scope="module", params=["ours", "no_reuse"])
def server(request):
    reuse = request.param == "ours"
    engine = mhc.load("demo", reuse_cache=reuse, prefix_cache_entries=64)
    with ServerThread(engine, ServerOptions(model_name="demo", max_queue=64)) as url:
        yield request.param, engine, url


def _turn(http: httpx.Client, url: str, ids: list[int], max_tokens: int) -> float:
    body = {"model": "demo", "prompt": ids, "max_tokens": max_tokens, "stream": True}
    body["logit_bias"] = {"200002": -100, "200012": -100}  # exact token counts
    start = time.perf_counter()
    ttft = None
    with http.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
    return ttft if ttft is not None else time.perf_counter() - start


def _client(url: str, engine, i: int, turns: int, max_tokens: int) -> list[float]:
    messages = [
        {"role": "system", "content": PREAMBLE},
        {"role": "user", "content": f"I am client {i}. Tell me about caches."},
    ]
    ttfts = []
    with httpx.Client() as http:  # one keep-alive connection per client, as SDKs do
        for t in range(turns):
            ids = engine.render(messages)
            ttfts.append(_turn(http, url, ids, max_tokens))
            messages += [
                {"role": "assistant", "content": f"Answer {t} to client {i}."},
                {"role": "user", "content": f"Follow-up {t}: and then?"},
            ]
    return ttfts


@pytest.mark.parametrize("clients", [1, 8])
def test_server_throughput(benchmark, server, clients):
    name, engine, url = server
    turns, max_tokens = (3, 16) if not benchmark.disabled else (2, 2)
    clients = clients if not benchmark.disabled else min(clients, 2)
    _client(url, engine, 99, 1, 2)  # warm-up

    def workload():
        with cf.ThreadPoolExecutor(clients) as pool:
            runs = list(
                pool.map(lambda i: _client(url, engine, i, turns, max_tokens), range(clients))
            )
        return [x for r in runs for x in r]

    t0 = time.perf_counter()
    ttfts = benchmark.pedantic(workload, rounds=1 if benchmark.disabled else 3, iterations=1)
    elapsed = (time.perf_counter() - t0) / (1 if benchmark.disabled else 3)
    requests = clients * turns
    benchmark.group = f"server: {clients} client(s) x {turns} turns, {max_tokens} tokens each"
    benchmark.extra_info["engine"] = name
    benchmark.extra_info.update(req_per_s=requests / elapsed, ttft_mean_s=sum(ttfts) / len(ttfts))
    SERVER_ROWS.append((benchmark.group, name, requests / elapsed, sum(ttfts) / len(ttfts)))
    assert len(ttfts) == requests
