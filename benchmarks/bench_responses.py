"""The Responses API's cost per token against chat completions, same server, same run: a
streamed request of N tokens (the model's end tokens biased away, so every request decodes
exactly N) to ``/v1/responses`` (typed events: ``ours``) and to ``/v1/chat/completions``
(chunks: the baseline ``chat_completions``), demo model. The ratio table at the end is
chat / responses (>= 1: the Responses path costs no more per token).

A second case measures what a ``previous_response_id`` continuation prefills: the printed
line gives its prompt tokens and how many came from the prefix cache.
"""

import json
import time

import httpx
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.testing import ServerThread

BIAS = {"200002": -100, "200012": -100}  # <|return|>, <|call|>: exact token counts
MESSAGE = "Tell me about caches, at length."
TOOL = {
    "type": "function",
    "name": "lookup",
    "strict": True,
    "parameters": {
        "type": "object",
        "properties": {"q": {"type": "string", "maxLength": 8}},
        "required": ["q"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def url():
    engine = mhc.load("demo", prefix_cache_entries=16)
    with ServerThread(engine, ServerOptions(model_name="demo")) as base:
        yield base


def _stream(http: httpx.Client, url: str, endpoint: str, tokens: int) -> int:
    """One streamed request of ``tokens`` tokens; the number of events / chunks read."""
    if endpoint == "responses":
        path = "/v1/responses"
        body = {"input": MESSAGE, "max_output_tokens": tokens, "store": False}
    else:
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": MESSAGE}], "max_tokens": tokens}
    body.update(model="demo", stream=True, seed=1, logit_bias=BIAS)
    n = 0
    with http.stream("POST", url + path, json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                n += 1
    return n


@pytest.mark.parametrize("endpoint", ["responses", "chat_completions"])
def test_per_token_cost(benchmark, url, endpoint):
    tokens = 48 if not benchmark.disabled else 4
    benchmark.group = f"stream {tokens} tokens: responses vs chat"
    benchmark.extra_info["engine"] = "ours" if endpoint == "responses" else "chat_completions"
    with httpx.Client() as http:
        _stream(http, url, endpoint, 2)  # warm-up
        events = benchmark.pedantic(
            _stream, args=(http, url, endpoint, tokens), rounds=5 if not benchmark.disabled else 1
        )
    assert events >= 1  # a random model's reply streams in few chunks: time is what counts
    if not benchmark.disabled:
        per_token = benchmark.stats.stats.median / tokens
        print(f"\n{endpoint}: {per_token * 1e3:.2f} ms per token (median of 5)")


def test_continuation_prefill(benchmark, url):
    """A tool-call continuation by ``previous_response_id`` prefills only the new input."""
    benchmark.group = "previous_response_id continuation"
    benchmark.extra_info["engine"] = "ours"
    with httpx.Client(timeout=300) as http:
        body = {"model": "demo", "input": MESSAGE, "tools": [TOOL], "tool_choice": "required"}
        first = http.post(url + "/v1/responses", json={**body, "seed": 1}).json()
        call = first["output"][-1]
        assert call["type"] == "function_call"
        new = {"type": "function_call_output", "call_id": call["call_id"], "output": "found"}

        def turn() -> dict:
            body = {
                "model": "demo",
                "previous_response_id": first["id"],
                "input": [new],
                "tools": [TOOL],
                "max_output_tokens": 1,
                "store": False,
            }
            return http.post(url + "/v1/responses", json=body).json()["usage"]

        start = time.perf_counter()
        usage = turn()  # the first continuation: measured exactly
        elapsed = time.perf_counter() - start
        benchmark.pedantic(turn, rounds=3 if not benchmark.disabled else 1)
    cached = usage["input_tokens_details"]["cached_tokens"]
    before = first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    assert cached == before  # the previous prompt and reply, all from the cache
    print(
        "\ncontinuation: "
        + json.dumps(
            {
                "input_tokens": usage["input_tokens"],
                "cached_tokens": cached,
                "prefilled": usage["input_tokens"] - cached,
                "seconds": round(elapsed, 3),
            }
        )
    )


def test_interleaved_per_token(benchmark, url):
    """Both endpoints in alternating order (one shared, noisy machine: neighbours' load
    hits both alike); prints the median milliseconds per token of each."""
    import statistics

    tokens, rounds = (48, 8) if not benchmark.disabled else (4, 1)
    benchmark.group = "interleaved responses/chat"
    benchmark.extra_info["engine"] = "ours"
    times: dict[str, list[float]] = {"responses": [], "chat_completions": []}

    def workload() -> None:
        with httpx.Client() as http:
            for i in range(rounds):
                order = list(times) if i % 2 else list(times)[::-1]
                for endpoint in order:
                    start = time.perf_counter()
                    _stream(http, url, endpoint, tokens)
                    times[endpoint].append(time.perf_counter() - start)

    benchmark.pedantic(workload, rounds=1)
    medians = {k: statistics.median(v) / tokens * 1e3 for k, v in times.items()}
    benchmark.extra_info.update(ms_per_token=medians)
    print("\ninterleaved ms per token: " + json.dumps({k: round(v, 2) for k, v in medians.items()}))
