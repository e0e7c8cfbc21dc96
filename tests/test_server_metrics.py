"""``GET /metrics``: Prometheus' text format, counted per request after a known workload."""

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mlx_harmony_core as mhc
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.server.metrics import endpoint_of
from mlx_harmony_core.testing import ServerThread

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def engine():
    return mhc.load("demo", prefix_cache_entries=8, prefix_cache_bytes=2**28)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """Samples by name, then by their labels (sorted pairs)."""
    r = httpx.get(url + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def total(samples: dict[str, dict[tuple, float]], name: str) -> float:
    return sum(samples.get(name, {}).values())


def test_metrics_after_a_known_workload(engine):
    opts = ServerOptions(model_name="demo", api_key=KEY)
    with ServerThread(engine, opts) as url:
        prompt_tokens = cached = 0
        n, max_tokens = 3, 5
        for _ in range(n):  # the same prompt: the 2nd and 3rd hit the prefix cache
            r = httpx.post(
                url + "/v1/chat/completions",
                headers=AUTH,
                json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens},
                timeout=60,
            )
            assert r.status_code == 200
            usage = r.json()["usage"]
            assert usage["completion_tokens"] == max_tokens
            prompt_tokens += usage["prompt_tokens"]
            cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        r = httpx.post(url + "/v1/completions", json={"prompt": "x"})  # no key: 401
        assert r.status_code == 401
        assert httpx.get(url + "/metrics").status_code == 401  # guarded like the API
        m = scrape(url)
    label = (("model_name", "demo"),)
    assert m["mhc:prompt_tokens_total"][label] == prompt_tokens
    assert m["mhc:generation_tokens_total"][label] == n * max_tokens
    assert m["mhc:prefix_cache_queries_total"][label] == prompt_tokens
    assert m["mhc:prefix_cache_hits_total"][label] == cached and cached > 0
    assert m["mhc:request_success_total"][(("finished_reason", "length"), *label)] == n
    assert m["mhc:time_to_first_token_seconds_count"][label] == n
    assert m["mhc:inter_token_latency_seconds_count"][label] == n
    assert m["mhc:e2e_request_latency_seconds_count"][label] == n
    assert m["mhc:request_generation_tokens_sum"][label] == n * max_tokens
    assert m["mhc:time_to_first_token_seconds_sum"][label] > 0
    http = m["mhc:http_requests_total"]
    key = (("endpoint", "/v1/chat/completions"), ("method", "POST"), ("status", "200"))
    assert http[key] == n
    assert http[(("endpoint", "/v1/completions"), ("method", "POST"), ("status", "401"))] == 1
    assert http[(("endpoint", "/metrics"), ("method", "GET"), ("status", "401"))] == 1
    # gauges read on scrape: nothing running now
    assert m["mhc:num_requests_running"][label] == 0
    assert m["mhc:num_requests_waiting"][label] == 0
    assert m["mhc:batch_size"][label] == 0
    assert m["mhc:kv_cache_usage_bytes"][label] == 0
    assert m["mhc:kv_cache_budget_bytes"][label] > 0
    assert m["mhc:model_load_time_seconds"][label] > 0


def test_each_app_has_its_own_registry_and_metrics_can_be_off(engine):
    with (
        ServerThread(engine, ServerOptions(model_name="a")) as a,
        ServerThread(mhc.load("demo"), ServerOptions(model_name="b")) as b,
    ):
        body = {"messages": [{"role": "user", "content": "yo"}], "max_tokens": 2}
        assert httpx.post(a + "/v1/chat/completions", json=body, timeout=60).is_success
        ma, mb = scrape(a), scrape(b)
    assert total(ma, "mhc:generation_tokens_total") == 2
    assert total(mb, "mhc:generation_tokens_total") == 0
    with ServerThread(engine, ServerOptions(model_name="c", metrics=False)) as c:
        assert httpx.get(c + "/metrics").status_code == 404


def test_structured_grammar_compiles_are_counted(engine):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    with ServerThread(engine, ServerOptions(model_name="demo")) as url:
        body = {
            "messages": [{"role": "user", "content": "json"}],
            "max_tokens": 4,
            "response_format": fmt,
        }
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).is_success
        m = scrape(url)
    assert total(m, "mhc:structured_grammar_compiles_total") >= 1
    assert total(m, "mhc:structured_grammar_compile_seconds_total") > 0


def test_endpoint_labels_do_not_grow_with_ids():
    assert endpoint_of("/v1/responses/resp_123") == "/v1/responses/{response_id}"
    assert endpoint_of("/v1/responses/resp_1/input_items") == (
        "/v1/responses/{response_id}/input_items"
    )
    assert endpoint_of("/v1/models/demo") == "/v1/models/{name}"
    assert endpoint_of("/nope/123") == "other"
