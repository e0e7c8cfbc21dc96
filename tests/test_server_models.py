"""Several models in one server (server/pool.py): the request's ``model`` picks one, models
load on first use and unload after an idle TTL or for the memory budget, a request for a
loading model waits while the server stays responsive, an adapter entry shares its base's
weights, and a bad models file is a clear startup error."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mlx_harmony_core as mhc
from mlx_harmony_core.models.builder import demo_model_path, make_test_model
from mlx_harmony_core.server import ServerOptions
from mlx_harmony_core.server.model_specs import (
    ModelSpec,
    check_specs,
    parse_model_flag,
    read_models_file,
)
from mlx_harmony_core.server.pool import ModelPool
from mlx_harmony_core.testing import ServerThread, free_port, write_adapters

MSG = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def second(tmp_path_factory) -> Path:
    """A second small random model (the demo's shape, other weights)."""
    return make_test_model(tmp_path_factory.mktemp("models") / "second", preset="demo", seed=1)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    """Random LoRA weights for the demo model in mlx-lm's adapter format."""
    return write_adapters(tmp_path_factory.mktemp("adapters"), seed=5)


def chat(url: str, model: str | None, max_tokens: int = 3, **extra) -> httpx.Response:
    body = {"messages": MSG, "max_tokens": max_tokens, "temperature": 0, **extra}
    if model is not None:
        body["model"] = model
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def states(url: str) -> dict[str, str]:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200
    return r.json()["models"]


def wait_for(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_two_models_picked_by_name_unloaded_by_ttl_and_reloaded(second):
    opts = ServerOptions(model_ttl_s=0.5)
    pool = ModelPool([ModelSpec("demo", "demo"), ModelSpec("second", str(second))], opts)
    with ServerThread(pool, opts) as url:
        listed = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in listed] == ["demo", "second"]
        assert {m["status"] for m in listed} == {"unloaded"}  # lazily loaded
        assert all(m["memory_bytes"] > 0 for m in listed)  # estimated from the files

        a, b, default = chat(url, "demo"), chat(url, "second"), chat(url, None)
        assert a.status_code == b.status_code == default.status_code == 200
        assert (a.json()["model"], b.json()["model"], default.json()["model"]) == (
            "demo",
            "second",
            "demo",  # no model: the first entry
        )
        got = httpx.get(url + "/v1/models/second").json()
        assert got["id"] == "second" and got["status"] in ("loaded", "unloaded")

        # Idle past the TTL: both unloaded; the next request loads "second" again.
        wait_for(lambda: set(states(url).values()) == {"unloaded"})
        again = chat(url, "second")
        assert again.status_code == 200
        assert again.json()["choices"][0]["message"] == b.json()["choices"][0]["message"]
        assert states(url)["demo"] == "unloaded"

        m = scrape(url)
        second_label = (("model_name", "second"),)
        assert m["mhc:model_loads_total"][second_label] == 2
        assert m["mhc:model_unloads_total"][second_label] >= 1
        assert m["mhc:generation_tokens_total"][second_label] == 6
        assert m["mhc:generation_tokens_total"][(("model_name", "demo"),)] == 6

        # An unknown model: 404 in OpenAI's shape, naming the served ones.
        r = chat(url, "nope")
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert "demo, second" in err["message"]
        assert httpx.get(url + "/v1/models/nope").status_code == 404
        # Other endpoints pick the model too.
        tok = httpx.post(url + "/tokenize", json={"model": "demo", "prompt": "hello"}).json()
        assert tok["count"] > 0
        r = httpx.post(
            url + "/v1/completions", json={"model": "second", "prompt": "x", "max_tokens": 2}
        )
        assert r.status_code == 200 and r.json()["model"] == "second"


def test_budget_unloads_the_least_recently_used_idle_model(second):
    size = demo_model_path().joinpath("model.safetensors").stat().st_size
    opts = ServerOptions(memory_budget_bytes=int(size * 1.5))  # room for one model
    pool = ModelPool([ModelSpec("demo", "demo"), ModelSpec("second", str(second))], opts)
    with ServerThread(pool, opts) as url:
        assert chat(url, "demo").status_code == 200
        assert chat(url, "second").status_code == 200
        assert states(url) == {"demo": "unloaded", "second": "loaded"}
        assert chat(url, "demo").status_code == 200
        assert states(url) == {"demo": "loaded", "second": "unloaded"}


def test_a_model_that_cannot_fit_is_a_503():
    opts = ServerOptions(memory_budget_bytes=2**20)  # 1 MB
    pool = ModelPool([ModelSpec("demo", "demo")], opts)
    with ServerThread(pool, opts) as url:
        r = chat(url, "demo")
        assert r.status_code == 503 and r.headers["retry-after"]
        err = r.json()["error"]
        assert err["code"] == "model_memory"
        assert "'demo' needs about" in err["message"] and "--memory-budget-mb" in err["message"]
        assert states(url) == {"demo": "unloaded"}
        assert httpx.get(url + "/health").status_code == 200


def test_a_busy_model_is_never_unloaded_for_room(second):
    """The only model that could make room is held (a request being prepared or running
    holds it until its last event): 503, nothing unloaded; once released it makes room."""
    import asyncio

    size = demo_model_path().joinpath("model.safetensors").stat().st_size
    opts = ServerOptions(memory_budget_bytes=int(size * 1.5))
    pool = ModelPool([ModelSpec("demo", "demo"), ModelSpec("second", str(second))], opts)
    with ServerThread(pool, opts) as url:
        assert chat(url, "demo").status_code == 200
        lease = asyncio.run(pool.acquire("demo"))  # loaded already: no load to await
        r = chat(url, "second")
        assert r.status_code == 503 and "while these models are in use: demo" in r.text
        assert states(url) == {"demo": "loaded", "second": "unloaded"}
        lease.release()
        assert chat(url, "second").status_code == 200
        assert states(url) == {"demo": "unloaded", "second": "loaded"}


def test_requests_wait_for_a_loading_model_and_the_server_stays_responsive(second):
    gate = threading.Event()
    started = threading.Event()

    def slow_load(spec, opts):
        if spec.name == "slow":
            started.set()
            assert gate.wait(60)
        return mhc.load(spec.path, prefix_cache_entries=opts.prefix_cache_entries)

    opts = ServerOptions()
    specs = [ModelSpec("demo", "demo"), ModelSpec("slow", str(second))]
    pool = ModelPool(specs, opts, load=slow_load)
    with ServerThread(pool, opts) as url:
        assert chat(url, "demo").status_code == 200
        results: list[httpx.Response] = []
        waiters = [
            threading.Thread(target=lambda: results.append(chat(url, "slow"))) for _ in range(2)
        ]
        for t in waiters:
            t.start()
        assert started.wait(60)
        time.sleep(0.2)  # both requests are waiting on the one load
        t0 = time.monotonic()
        assert states(url) == {"demo": "loaded", "slow": "loading"}
        assert chat(url, "demo").status_code == 200  # another model answers meanwhile
        assert time.monotonic() - t0 < 30
        assert not results
        gate.set()
        for t in waiters:
            t.join(120)
        assert [r.status_code for r in results] == [200, 200]
        assert pool.stats()["models"]["slow"]["loads"] == 1


def test_a_model_that_fails_to_load_is_a_500_and_can_be_retried(second):
    calls = []

    def flaky(spec, opts):
        calls.append(spec.name)
        if len(calls) == 1:
            raise OSError("disk went away")
        return mhc.load(spec.path)

    opts = ServerOptions()
    pool = ModelPool([ModelSpec("second", str(second))], opts, load=flaky)
    with ServerThread(pool, opts) as url:
        r = chat(url, "second")
        assert r.status_code == 500 and "failed to load" in r.json()["error"]["message"]
        assert states(url) == {"second": "unloaded"}
        assert chat(url, "second").status_code == 200


def test_adapter_entry_shares_the_base_weights(adapters):
    import asyncio

    from mlx.utils import tree_flatten

    opts = ServerOptions(model_ttl_s=0.5)
    specs = [
        ModelSpec("demo", "demo"),
        ModelSpec("tuned", base="demo", adapter_path=str(adapters)),
    ]
    pool = ModelPool(specs, opts)
    with ServerThread(pool, opts) as url:
        r = chat(url, "tuned")
        assert r.status_code == 200 and r.json()["model"] == "tuned"
        lease = asyncio.run(pool.acquire("tuned"))  # held (not unloaded) while we look
        assert states(url) == {"demo": "loaded", "tuned": "loaded"}  # the base came with it
        listed = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        assert listed["tuned"]["parent"] == "demo"
        base, tuned = pool.entries["demo"].engine, pool.entries["tuned"].engine
        # Shared: every base array is the same object in the adapted model; only the
        # adapters are new memory.
        base_ids = {id(a) for _, a in tree_flatten(base.model.parameters())}
        own = [a for _, a in tree_flatten(tuned.model.parameters()) if id(a) not in base_ids]
        assert own
        assert listed["tuned"]["memory_bytes"] == sum(a.nbytes for a in own)
        assert listed["tuned"]["memory_bytes"] < listed["demo"]["memory_bytes"] / 100
        # Same logits as loading the base with the adapters applied (mlx-lm's way), and the
        # base model's own logits untouched.
        ref = mhc.load(demo_model_path(), adapter_path=adapters)
        plain = mhc.load(demo_model_path())
        ids = mx.array([ref.render(MSG)])
        assert mx.array_equal(tuned.model(ids), ref.model(ids)).item()
        assert mx.array_equal(base.model(ids), plain.model(ids)).item()
        del base, tuned
        lease.release()
        # The base stays while its adapter entry is loaded; both go once idle.
        wait_for(lambda: set(states(url).values()) == {"unloaded"})
        assert chat(url, "tuned").status_code == 200


def test_unload_and_reload_repeatedly_then_exit_cleanly(second, tmp_path):
    """Five TTL unloads and reloads on the model's one worker thread, then a normal
    interpreter exit (no os._exit): no abort, exit status 0."""
    script = tmp_path / "cycle.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import time, threading, httpx
            from mlx_harmony_core.server import ServerOptions
            from mlx_harmony_core.server.model_specs import ModelSpec
            from mlx_harmony_core.server.pool import ModelPool
            from mlx_harmony_core.testing import ServerThread

            opts = ServerOptions(model_ttl_s=0.2)
            pool = ModelPool([ModelSpec("a", "demo"), ModelSpec("b", {str(second)!r})], opts)
            body = {{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 2}}
            with ServerThread(pool, opts) as url:
                for i in range(5):
                    for name in ("a", "b"):
                        r = httpx.post(url + "/v1/chat/completions",
                                       json={{**body, "model": name}}, timeout=120)
                        assert r.status_code == 200, r.text
                    while any(e.client is not None for e in pool.entries.values()):
                        time.sleep(0.05)
            stats = pool.stats()["models"]
            assert stats["a"]["loads"] == stats["b"]["loads"] == 5, stats
            names = sorted(t.name for t in threading.enumerate() if t.name.startswith("mhc-model"))
            print("threads", names)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # One worker thread per model, reused by every reload.
    assert "threads ['mhc-model-0', 'mhc-model-1']" in out.stdout
    assert "terminate called" not in out.stderr


# -- models files and flags: clear startup errors ----------------------------------------------


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_models_file_json_and_toml(tmp_path, second, adapters):
    entries = [
        {"name": "demo", "path": "demo", "max_batch": 2, "kv_budget_mb": 64},
        {"name": "second", "path": str(second), "prefix_cache_entries": 3, "dequantize": True},
        {"name": "tuned", "base": "demo", "adapter_path": str(adapters)},
    ]
    js = read_models_file(write(tmp_path, "m.json", json.dumps({"models": entries})))
    toml = "\n".join(
        [
            '[[models]]\nname = "demo"\npath = "demo"\nmax_batch = 2\nkv_budget_mb = 64',
            f'[[models]]\nname = "second"\npath = "{second}"\nprefix_cache_entries = 3',
            "dequantize = true",
            f'[[models]]\nname = "tuned"\nbase = "demo"\nadapter_path = "{adapters}"',
        ]
    )
    tm = read_models_file(write(tmp_path, "m.toml", toml))
    assert js == tm
    check_specs(js)
    assert js[0].options == {"max_batch": 2, "kv_budget_bytes": 64 * 2**20}
    assert js[1].load == {"dequantize": True}
    opts = js[0].server_options(ServerOptions(max_queue=5))
    assert (opts.model_name, opts.max_batch, opts.max_queue) == ("demo", 2, 5)
    # A path relative to the file is the file's neighbour.
    (tmp_path / "rel").symlink_to(second)
    rel = read_models_file(write(tmp_path, "r.json", '[{"name": "r", "path": "rel"}]'))
    assert rel[0].path == str(tmp_path / "rel")
    check_specs(rel)


@pytest.mark.parametrize(
    "content, needle",
    [
        ('[{"name": "a", "path": "demo", "colour": 1}]', "entry 'a': unknown key(s) ['colour']"),
        ('[{"name": "a", "path": "/no/such/model"}]', "model 'a': '/no/such/model' does not exist"),
        ('[{"name": "a", "path": "demo"}, {"name": "a", "path": "demo"}]', "'a' is listed twice"),
        ('[{"name": "a", "base": "zz", "adapter_path": "."}]', "base 'zz' is not an entry"),
        ('[{"name": "a", "path": "demo"}, {"name": "b", "base": "a"}]', "needs 'adapter_path'"),
        ('[{"name": "a", "path": "demo", "base": "a"}]', "either 'path'"),
        ('[{"name": "a", "path": "demo", "adapter_path": "nowhere"}]', "adapters.safetensors"),
        ('[{"name": "a", "path": "demo", "max_batch": 0}]', "'max_batch' must be >= 1"),
        ('[{"name": "a", "path": "demo", "max_batch": "8"}]', "'max_batch' must be a number"),
        ('[{"name": "a", "path": "demo", "dequantize": 1}]', "'dequantize' must be bool"),
        ('[{"path": "demo"}]', "entry 1: 'name'"),
        ('{"models": []}', "no models"),
        ('{"modles": []}', "unknown top-level key(s) ['modles']"),
        ("[{", "is not valid json"),
        ('["demo"]', "an entry is a table"),
    ],
)
def test_bad_models_files(tmp_path, content, needle):
    path = write(tmp_path, "models.json", content)
    with pytest.raises(ValueError) as info:
        check_specs(read_models_file(path))
    assert needle in str(info.value)


def test_model_flags():
    assert parse_model_flag("demo") == ModelSpec("demo", "demo")
    assert parse_model_flag("fast=demo") == ModelSpec("fast", "demo")
    assert parse_model_flag("org/repo").name == "repo"
    with pytest.raises(ValueError, match="listed twice"):
        check_specs([parse_model_flag("a=demo"), parse_model_flag("a=demo")])
    with pytest.raises(ValueError, match="NAME=PATH"):
        parse_model_flag("a=")


def test_serve_two_models_and_a_bad_models_file(tmp_path, second):
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "serve", "--no-web"]
    bad = write(
        tmp_path, "bad.json", '[{"name": "x", "path": "demo"}, {"name": "x", "path": "demo"}]'
    )
    out = subprocess.run(
        [*cmd, "--models-file", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "model 'x' is listed twice" in out.stderr
    out = subprocess.run(
        [*cmd, "-m", "demo", "-m", "y=/no/such"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "model 'y': '/no/such' does not exist" in out.stderr

    port = free_port()
    argv = [*cmd, "--port", str(port), "-m", "demo", "-m", f"second={second}", "--model-ttl", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["demo", "second"]
        assert chat(url, "second").json()["model"] == "second"
        assert chat(url, None).json()["model"] == "demo"
    finally:
        proc.send_signal(signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, text
    assert "Traceback" not in text


def test_preload_loads_every_model_before_serving(second):
    pool = ModelPool(
        [ModelSpec("demo", "demo"), ModelSpec("second", str(second))],
        ServerOptions(lazy_load=False),
    )
    pool.preload()  # what serve --preload does before it binds the app
    assert [pool.entries[n].state for n in pool.names] == ["loaded", "loaded"]
    assert all(m["loads"] == 1 for m in pool.stats()["models"].values())
    pool.shutdown()
    assert pool.wait_idle(30)


def test_each_model_keeps_its_prompt_cache_on_disk(second, tmp_path):
    """--prompt-cache-dir with several models: a model unloaded by its TTL writes its long
    prefixes to disk and, loaded again, serves them from there (the other model's files,
    keyed by another identity, are never used for it)."""
    system = "You are a careful assistant. " * 60  # well past the store's 128-token minimum
    body = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    opts = ServerOptions(model_ttl_s=0.5, prompt_cache_dir=str(tmp_path / "kv"))
    pool = ModelPool([ModelSpec("demo", "demo"), ModelSpec("second", str(second))], opts)
    with ServerThread(pool, opts) as url:

        def ask(model):
            r = httpx.post(
                url + "/v1/chat/completions",
                json={"model": model, "messages": body, "max_tokens": 3, "temperature": 0},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            return r.json()

        first = {m: ask(m) for m in ("demo", "second")}
        assert all(
            f["usage"]["prompt_tokens_details"]["cached_tokens"] == 0 for f in first.values()
        )
        wait_for(lambda: set(states(url).values()) == {"unloaded"})  # stores closed: on disk
        assert len(list((tmp_path / "kv").iterdir())) >= 2
        for model in ("second", "demo"):
            again = ask(model)
            usage = again["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] > 0.8 * usage["prompt_tokens"]
            assert again["choices"][0]["message"] == first[model]["choices"][0]["message"]
    pool.close_stores()
