"""``GET /metrics``: the server's counters in Prometheus' text format.

Names and labels follow vLLM's (``vllm:`` -> ``mhc:``). Every app has a registry of its own
(never the process-global one), so several apps in one process do not clash.

Nothing here runs per token: a request is counted once, when its last event (the one that
carries its :class:`~mlx_harmony_core.request.Completion`) passes, from its ``Usage`` and
``Timings``; inter-token latency is that request's mean (decode seconds over decoded
tokens), one observation per request. Gauges (queue, batch, KV cache, load time, grammar
compiles) are read from the engine when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .client import Cancellable, ClientWrapper, EngineClient, Sink
from .requestlog import CURRENT, endpoint_of

__all__ = ["CONTENT_TYPE_LATEST", "MeteredClient", "MetricsGuard", "ServerMetrics", "endpoint_of"]

# vLLM's buckets (seconds)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000)  # fmt: skip


class ServerMetrics:
    """One app's metrics: a :class:`CollectorRegistry` of its own, the per-request counters,
    and a collector reading ``client``'s gauges on scrape."""

    def __init__(self, client: EngineClient, model_name: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        self.http_requests = Counter(
            "mhc:http_requests",
            "HTTP requests by endpoint, method and status",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_success = Counter(
            "mhc:request_success",
            "Finished generation requests by finish reason",
            [*m, "finished_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("mhc:prompt_tokens", "Prefill tokens processed", m, registry=r)
        self.generation_tokens = Counter("mhc:generation_tokens", "Generated tokens", m, registry=r)
        self.prefix_cache_queries = Counter(
            "mhc:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", m, registry=r
        )
        self.prefix_cache_hits = Counter(
            "mhc:prefix_cache_hits", "Prompt tokens found in the prefix cache", m, registry=r
        )
        self.spec_drafted = Counter(
            "mhc:spec_decode_num_draft_tokens", "Speculative tokens drafted", m, registry=r
        )
        self.spec_accepted = Counter(
            "mhc:spec_decode_num_accepted_tokens", "Speculative tokens accepted", m, registry=r
        )
        self.ttft = Histogram(
            "mhc:time_to_first_token_seconds",
            "Time to first token",
            m,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mhc:inter_token_latency_seconds",
            "Inter-token latency (one observation per request: its mean)",
            m,
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mhc:e2e_request_latency_seconds",
            "End-to-end request latency (in the engine)",
            m,
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.request_prompt = Histogram(
            "mhc:request_prompt_tokens", "Prompt tokens per request", m,
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.request_generation = Histogram(
            "mhc:request_generation_tokens", "Generated tokens per request", m,
            buckets=TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.registry.register(_EngineGauges(client, model_name))
        self._by_model: dict[str, list[Any]] = {}
        self._bound = self.bound(model_name)

    def bound(self, model_name: str) -> list[Any]:
        """The per-request children of ``model_name``, bound once: finishing a request
        touches no label lookup but the reason's."""
        children = self._by_model.get(model_name)
        if children is None:
            children = self._by_model[model_name] = [
                c.labels(model_name)
                for c in (
                    self.prompt_tokens, self.generation_tokens, self.prefix_cache_queries,
                    self.prefix_cache_hits, self.spec_drafted, self.spec_accepted, self.ttft,
                    self.itl, self.e2e, self.request_prompt, self.request_generation,
                )
            ]  # fmt: skip
        return children

    def finished(self, completion: Any, model_name: str | None = None) -> None:
        """Count one finished request (its ``Completion``) of ``model_name`` (default: the
        server's model): called once, at its end."""
        u, t = completion.usage, completion.timings
        bound = self._bound if model_name is None else self.bound(model_name)
        prompt, gen, queries, hits, drafted, accepted, ttft, itl, e2e, rp, rg = bound
        name = self.model_name if model_name is None else model_name
        self.request_success.labels(name, completion.finish_reason or "stop").inc()
        prompt.inc(u.prompt_tokens)
        gen.inc(u.completion_tokens)
        queries.inc(u.prompt_tokens)
        hits.inc(u.cached_prompt_tokens)
        if u.drafted_tokens:
            drafted.inc(u.drafted_tokens)
            accepted.inc(u.accepted_tokens)
        rp.observe(u.prompt_tokens)
        rg.observe(u.completion_tokens)
        if u.completion_tokens:
            ttft.observe(t.ttft_s)
        if u.completion_tokens > 1 and t.decode_tokens_per_s > 0:
            itl.observe(1.0 / t.decode_tokens_per_s)
        e2e.observe(t.total_s)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)


class _EngineGauges:
    """Gauges read from the engine client when scraped."""

    def __init__(self, client: EngineClient, model_name: str) -> None:
        self.client, self.model_name = client, model_name

    def describe(self) -> list[Metric]:
        """No fixed description (values are read at scrape)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The scheduler's queue, batch and KV use; load time; grammar compiles (per model:
        every loaded one of a server holding several, see :mod:`.pool`)."""
        pool = self.client if hasattr(self.client, "loaded") else None
        if pool is not None:
            models = [(n, c, e) for n, c, e in pool.loaded()]
        else:
            models = [(self.model_name, self.client, getattr(self.client, "engine", None))]
        families: dict[str, Metric] = {}

        def add(kind: type, metric: str, doc: str, name: str, value: float) -> None:
            family = families.get(metric)
            if family is None:
                family = families[metric] = kind(metric, doc, labels=["model_name"])
            family.add_metric([name], value)

        def gauge(metric: str, doc: str, name: str, value: float) -> None:
            add(GaugeMetricFamily, metric, doc, name, value)

        for name, client, engine in models:
            sched = getattr(client, "scheduler", None)
            if sched is not None and hasattr(sched, "stats"):
                s = sched.stats()
                gauge("mhc:num_requests_running", "Requests prefilling or decoding", name,
                      s["running"])  # fmt: skip
                gauge("mhc:num_requests_waiting", "Requests waiting to join", name, s["waiting"])
                gauge("mhc:batch_size", "Rows in the running batch", name, s["batch"])
                gauge("mhc:kv_cache_usage_bytes", "KV budget reserved", name, s["kv_bytes"])
                gauge("mhc:kv_cache_budget_bytes", "KV budget", name, s["kv_budget_bytes"])
                gauge(
                    "mhc:kv_cache_usage_perc",
                    "Fraction of the KV budget reserved",
                    name,
                    s["kv_bytes"] / s["kv_budget_bytes"] if s["kv_budget_bytes"] else 0.0,
                )
            else:
                gauge("mhc:num_requests_running", "Requests waiting or running", name,
                      client.pending)  # fmt: skip
            load_s = getattr(engine, "load_seconds", None)
            if load_s is not None:
                gauge("mhc:model_load_time_seconds", "Seconds the model took to load", name,
                      load_s)  # fmt: skip
            grammars = getattr(getattr(engine, "chat_format", None), "__dict__", {}).get(
                "_grammars"
            )
            if grammars is not None:
                add(CounterMetricFamily, "mhc:structured_grammar_compiles",
                    "Grammars compiled", name, grammars.compiles)  # fmt: skip
                add(CounterMetricFamily, "mhc:structured_grammar_compile_seconds",
                    "Seconds spent compiling grammars", name, grammars.compile_seconds)  # fmt: skip
            # The prompt cache on disk (prompt_store.py): its hits are in prefix_cache_hits too.
            disk = getattr(getattr(engine, "runner", None), "prompt_store", None)
            if disk is not None:
                add(CounterMetricFamily, "mhc:prefix_cache_disk_hits",
                    "Prompt tokens loaded from the prompt cache on disk", name,
                    disk.stats.hit_tokens)  # fmt: skip
                add(CounterMetricFamily, "mhc:prefix_cache_disk_writes",
                    "Prompt caches written to disk", name, disk.stats.writes)  # fmt: skip
                gauge("mhc:prefix_cache_disk_bytes", "Bytes of this model's prompt cache files",
                      name, disk.nbytes)  # fmt: skip
        if pool is not None:
            stats = pool.stats()
            for name, m in stats["models"].items():
                gauge("mhc:model_loaded", "1 while the model is loaded", name, int(m["loaded"]))
                gauge("mhc:model_memory_bytes", "Bytes of weights the model holds (or reserves "
                      "while loading)", name, m["bytes"])  # fmt: skip
                add(CounterMetricFamily, "mhc:model_loads", "Times the model was loaded", name,
                    m["loads"])  # fmt: skip
                add(CounterMetricFamily, "mhc:model_unloads", "Times the model was unloaded",
                    name, m["unloads"])  # fmt: skip
            budget = GaugeMetricFamily(
                "mhc:model_memory_budget_bytes", "Memory budget for the models' weights"
            )
            budget.add_metric([], stats["budget_bytes"])
            yield budget
        yield from families.values()


class MeteredClient(ClientWrapper):
    """``client`` with every finished request counted (``metrics``, if any) and added to
    the current HTTP request's log record (see :mod:`.requestlog`); any other member is
    ``client``'s."""

    def __init__(
        self, client: EngineClient, metrics: ServerMetrics | None, model_name: str | None = None
    ) -> None:
        self.client, self.metrics, self.model_name = client, metrics, model_name

    def submit(self, request: Any, sink: Sink) -> Cancellable:
        """Submit through ``client``; the request's last event is counted and recorded."""
        finished = self.metrics.finished if self.metrics is not None else None
        record = CURRENT.get()
        name = self.model_name
        if record is not None and name is not None:
            record.model = name  # a server of several models: the one that answered

        def metered(item: Any) -> None:
            done = getattr(item, "completion", None)
            if done is not None:
                if finished is not None:
                    finished(done, name)
                if record is not None:
                    record.add(done)
            sink(item)

        return self.client.submit(request, metered)


class MetricsGuard:
    """ASGI middleware counting each HTTP request by endpoint, method and status (once its
    answer is over: a stream counts when it ends)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.http_requests.labels(
                endpoint_of(scope["path"]), scope["method"], str(status[0])
            ).inc()
