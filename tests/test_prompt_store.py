"""The prompt cache on disk (prompt_store.py): restarts, identity, bad files, full disks, LRU."""

import errno
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core import prompt_file as pf
from mlx_harmony_core import prompt_store as ps
from mlx_harmony_core.kv_cache import KVCache, QuantizedKVCache, RotatingKVCache
from mlx_harmony_core.threads import generation

SYSTEM = "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer in short, exact sentences." for i in range(40)
)
GREEDY = mhc.SamplingParams(temperature=0)
IDENTITY = {"model": "fake", "weights": "1"}


@pytest.fixture(scope="module")
def engine():
    """A demo engine of this module's own (the session's is shared with other tests)."""
    e = mhc.load("demo")
    yield e
    e.runner.prompt_store = None


@pytest.fixture
def fresh(engine):
    """``engine`` as after a restart: nothing in memory, no store attached."""
    engine.prefix_cache.clear()
    engine.runner.prompt_store = None
    yield engine
    store = engine.runner.prompt_store
    if store is not None:
        store.close()
    engine.runner.prompt_store = None
    engine.prefix_cache.clear()


def messages(user="Hello there"):
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def generate(engine, msgs, n=6):
    """A greedy reply, once its cache is handed on (that happens after the reply returns)."""
    c = engine.generate(msgs, GREEDY, max_tokens=n)
    assert generation.wait_idle(60)
    return c


def restart(engine, directory, **options):
    """Close the engine's store (writing what is queued) and open a new one, memory cleared."""
    old = engine.runner.prompt_store
    if old is not None:
        old.close()
    engine.prefix_cache.clear()
    return ps.attach(engine, directory, **options)


def fake_cache(tokens, *, kind="full", seed=0, heads=2, dim=8):
    """Per-layer caches holding ``tokens`` tokens of random keys and values."""
    rng = np.random.default_rng(seed)
    out = []
    for layer in range(2):
        if kind == "full":
            c = KVCache()
        elif kind == "rotating":
            c = RotatingKVCache(16, 0, 1000)
        else:
            c = QuantizedKVCache(8, 32)
        k = mx.array(rng.standard_normal((1, heads, tokens, dim)).astype(np.float32))
        v = mx.array(rng.standard_normal((1, heads, tokens, dim)).astype(np.float32) + layer)
        c.update_and_fetch(k, v)
        out.append(c)
    mx.eval([c.state for c in out])
    return out


def store(tmp_path, identity=IDENTITY, **options):
    options.setdefault("min_tokens", 4)
    return ps.PromptStore(tmp_path, identity, **options)


def files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


# -- the done-when check: a server restarted on the same directory ------------------------------
def _start_server(cache_dir, log_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = open(log_path, "ab")  # noqa: SIM115  (the server's log outlives this function)
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "serve", "-v", "--port", "0"]
    if cache_dir is not None:
        cmd += ["--prompt-cache-dir", str(cache_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        m = re.search(r"on (http://[\d.]+:\d+/v1)", line)
        if m:
            return proc, m.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {log_path.read_text()[-2000:]}")


def _chat(url):
    body = {"model": "demo", "messages": messages(), "max_tokens": 8, "temperature": 0}
    req = urllib.request.Request(
        url + "/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        data = json.loads(r.read())
    return data["choices"][0]["message"], data["usage"]


def _stop(proc):
    proc.terminate()
    proc.wait(timeout=60)


def test_a_restarted_server_serves_a_long_system_prompt_from_disk(tmp_path):
    cache = tmp_path / "kv"
    log = tmp_path / "server.log"
    proc, url = _start_server(cache, log)
    try:
        first, usage1 = _chat(url)
    finally:
        _stop(proc)
    assert usage1["prompt_tokens_details"]["cached_tokens"] == 0
    assert any(p.suffix == ps.SUFFIX for p in cache.iterdir())  # written before the exit

    proc, url = _start_server(cache, log)
    try:
        again, usage2 = _chat(url)
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=60) as r:
            metrics = r.read().decode()
    finally:
        _stop(proc)
    cached = usage2["prompt_tokens_details"]["cached_tokens"]
    assert cached > 0.9 * usage2["prompt_tokens"]  # the system prompt and more came from disk
    assert again == first  # as the uncached run
    assert "loaded" in log.read_text() and "prompt cache" in log.read_text()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for f in text_string_to_metric_families(metrics) for s in f.samples}
    assert samples["mhc:prefix_cache_disk_hits_total"] == cached
    assert samples["mhc:prefix_cache_hits_total"] == cached


# -- through the engine --------------------------------------------------------------------------
def test_restart_reuses_the_prefix_and_outputs_equal_an_uncached_run(fresh, tmp_path):
    baseline = generate(fresh, messages())  # no store: the reference
    fresh.prefix_cache.clear()
    ps.attach(fresh, tmp_path, min_tokens=16)
    first = generate(fresh, messages())
    assert first.usage.cached_prompt_tokens == 0
    store = restart(fresh, tmp_path, min_tokens=16)
    assert len(store) == 1
    again = generate(fresh, messages())
    assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens - 1
    assert again.text == first.text == baseline.text
    # Another user message after the same system prompt: the cache is rewound to the prefix.
    fresh.prefix_cache.clear()
    other = generate(fresh, messages("What is two plus two?"))
    fresh.prefix_cache.clear()
    fresh.runner.prompt_store = None
    plain = generate(fresh, messages("What is two plus two?"))
    assert 0 < other.usage.cached_prompt_tokens < other.usage.prompt_tokens - 1
    assert other.text == plain.text
    assert store.stats.hits == 2


def test_the_longest_stored_prefix_wins(fresh, tmp_path):
    ps.attach(fresh, tmp_path, min_tokens=16)
    generate(fresh, messages(), n=2)
    store = restart(fresh, tmp_path, min_tokens=16)
    long_user = "Tell me everything. " * 30
    generate(fresh, messages(long_user), n=2)  # shares the system prompt, adds 100+ tokens
    store = restart(fresh, tmp_path, min_tokens=16)
    assert len(store) == 2
    c = generate(fresh, messages(long_user + " And more."))
    short = min(len(e.tokens) for e in store.entries())
    assert c.usage.cached_prompt_tokens > short


def test_a_cache_for_another_model_or_build_is_never_loaded(fresh, tmp_path, caplog):
    ps.attach(fresh, tmp_path, min_tokens=16)
    generate(fresh, messages(), n=2)
    restart(fresh, tmp_path, min_tokens=16)
    fresh.runner.prompt_store.close()
    before = files(tmp_path)
    other = {**fresh.runner.prompt_store.identity, "core": "another build"}
    with caplog.at_level(logging.INFO, logger="mlx_harmony_core.prompt_store"):
        s = ps.PromptStore(tmp_path, other, min_tokens=16, model=fresh.model)
    fresh.runner.prompt_store = s
    assert len(s) == 0
    assert "made for another model or build" in caplog.text
    c = generate(fresh, messages(), n=2)
    assert c.usage.cached_prompt_tokens == 0
    assert set(before) <= set(files(tmp_path))  # never deleted: another process may use it


def test_identity_follows_weights_cache_options_and_build(engine):
    base = ps.model_identity(engine.model, config=engine.config)
    assert ps.model_identity(engine.model, config=engine.config) == base
    quant = ps.model_identity(engine.model, config=engine.config, cache_options={"kv_bits": 8})
    assert ps.identity_key(quant) != ps.identity_key(base)
    # The same shapes with one weight changed: another identity.
    w = engine.model.parameters()
    from mlx.utils import tree_flatten

    name, a = tree_flatten(w)[0]
    saved = a
    try:
        engine.model.update(_set(w, name, a + 1))
        assert ps.model_identity(engine.model, config=engine.config)["weights"] != base["weights"]
    finally:
        engine.model.update(_set(w, name, saved))
    assert base["core"] == ps.core_build() and len(base["core"]) == 64


def _set(tree, dotted, value):
    from mlx.utils import tree_unflatten

    return tree_unflatten([(dotted, value)])


def test_a_replaced_model_does_not_use_the_store(fresh, tmp_path):
    store = ps.attach(fresh, tmp_path, min_tokens=16)
    assert store.serves(fresh.model)
    assert not store.serves(object())


# -- bad files ----------------------------------------------------------------------------------
def _one_file(tmp_path, tokens=40, **options):
    s = store(tmp_path, **options)
    assert s.offer(list(range(tokens)), fake_cache(tokens))
    s.close()
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ps.SUFFIX]
    return path


def test_round_trip_of_each_cache_kind(tmp_path):
    for kind in ("full", "rotating", "quantized"):
        d = tmp_path / kind
        caches = fake_cache(24, kind=kind, dim=32)  # the rotating one wraps its window of 16
        s = store(d)
        assert s.offer(list(range(24)), caches)
        s.close()
        s = store(d)
        entry, n = s.find(list(range(24)) + [99])
        assert n == 24
        loaded = s.load(entry, n)
        for a, b in zip(caches, loaded, strict=True):
            assert type(a) is type(b) and a.offset == b.offset == 24 and a.meta() == b.meta()
            for x, y in zip(a.state, b.state, strict=True):
                assert x.dtype == y.dtype and mx.array_equal(x, y).item()
        # Rewound to a shorter prefix (the rotating cache within its history).
        entry, n = s.find(list(range(8)) + [99])
        assert n == 8 and all(c.offset == 8 for c in s.load(entry, n))


def test_bfloat16_caches_round_trip(tmp_path):
    c = KVCache()
    k = mx.random.normal((1, 2, 10, 8)).astype(mx.bfloat16)
    c.update_and_fetch(k, k + 1)
    mx.eval(c.state)
    s = store(tmp_path)
    assert s.offer(list(range(10)), [c])
    s.close()
    s = store(tmp_path)
    entry, n = s.find(list(range(11)))
    (back,) = s.load(entry, n)
    assert back.state[0].dtype == mx.bfloat16 and mx.array_equal(back.state[0], k).item()


def test_a_corrupt_payload_is_deleted_with_a_log_line_and_the_load_falls_back(tmp_path, caplog):
    path = _one_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit deep in the arrays: only the checksum sees it
    path.write_bytes(bytes(data))
    s = store(tmp_path)
    entry, n = s.find(list(range(41)))
    assert entry is not None
    with caplog.at_level(logging.WARNING, logger="mlx_harmony_core.prompt_store"):
        assert s.load(entry, n) is None
    assert "checksum" in caplog.text and "deleted" in caplog.text
    assert not path.exists() and len(s) == 0


@pytest.mark.parametrize("cut", [10, 30, -7])
def test_a_truncated_file_is_deleted_at_startup(tmp_path, caplog, cut):
    path = _one_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="mlx_harmony_core.prompt_store"):
        s = store(tmp_path)
    assert len(s) == 0 and not path.exists()
    assert "truncated" in caplog.text


def test_a_corrupt_header_is_deleted(tmp_path, caplog):
    path = _one_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[30] ^= 0x01
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mlx_harmony_core.prompt_store"):
        s = store(tmp_path)
    assert len(s) == 0 and not path.exists() and "corrupt" in caplog.text


def test_foreign_files_are_left_alone(tmp_path, caplog):
    _one_file(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "imposter.mhckv").write_bytes(b"safetensors? no: someone else's bytes")
    with caplog.at_level(logging.INFO, logger="mlx_harmony_core.prompt_store"):
        s = store(tmp_path)
    assert len(s) == 1
    assert (tmp_path / "notes.txt").exists() and (tmp_path / "imposter.mhckv").exists()
    assert "imposter.mhckv is not a cache file; left alone" in caplog.text


def test_another_format_version_is_not_loaded_nor_deleted(tmp_path, caplog):
    path = _one_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:12] = (ps.FORMAT_VERSION + 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="mlx_harmony_core.prompt_store"):
        s = store(tmp_path)
    assert len(s) == 0 and path.exists() and "format version" in caplog.text


def test_a_file_removed_by_another_process_is_skipped(tmp_path):
    path = _one_file(tmp_path)
    s = store(tmp_path)
    entry, n = s.find(list(range(41)))
    path.unlink()
    assert s.load(entry, n) is None and len(s) == 0


def test_a_stale_temp_file_is_removed_and_a_fresh_one_kept(tmp_path):
    stale = tmp_path / (ps.TMP_PREFIX + "1-2-x.mhckv")
    fresh = tmp_path / (ps.TMP_PREFIX + "3-4-y.mhckv")
    stale.write_bytes(b"half")
    fresh.write_bytes(b"being written")
    old = time.time() - 2 * ps.STALE_TMP_S
    os.utime(stale, (old, old))
    store(tmp_path)
    assert not stale.exists() and fresh.exists()


# -- a full disk ----------------------------------------------------------------------------------
def test_a_full_disk_leaves_no_half_file_and_the_request_unaffected(
    fresh, tmp_path, monkeypatch, caplog
):
    baseline = generate(fresh, messages())
    fresh.prefix_cache.clear()
    real = pf.write_chunks
    calls = []

    def full_disk(f, chunks):
        calls.append(1)
        if len(calls) > 1:  # the header went out; the arrays do not fit
            f.write(b"\0" * 1000)
            f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(f, chunks)

    monkeypatch.setattr(pf, "write_chunks", full_disk)
    store = ps.attach(fresh, tmp_path, min_tokens=16)
    with caplog.at_level(logging.WARNING, logger="mlx_harmony_core.prompt_store"):
        c = generate(fresh, messages())
        assert store.flush(60)
    assert c.text == baseline.text and c.finish_reason == baseline.finish_reason
    assert calls and files(tmp_path) == []  # no temp file, no entry
    assert store.stats.write_errors == 1 and len(store) == 0
    assert "disk full" in caplog.text
    monkeypatch.setattr(pf, "write_chunks", real)
    generate(fresh, messages(), n=3)  # the store goes on once there is room
    fresh.prefix_cache.clear()
    assert store.flush(60) and len(store) == 1


# -- bounds and LRU --------------------------------------------------------------------------------
def test_lru_eviction_by_last_use_survives_a_restart(tmp_path):
    # 2 layers x (keys, values) x 4 heads x 32 dims x 4 bytes = 2 kB a token: 200 tokens make
    # a ~410 kB file, so the smallest bound (1 MB) holds two files, not three.
    tokens, shape = 200, {"heads": 4, "dim": 32}
    s = store(tmp_path, max_bytes=ps.MIN_MAX_BYTES)
    prompts = [[k] * 5 + list(range(1000 * k, 1000 * k + tokens - 5)) for k in range(1, 4)]
    for k, p in enumerate(prompts[:2]):
        assert s.offer(p, fake_cache(tokens, seed=k, **shape))
        assert s.flush(30)
        time.sleep(0.05)
    s.close()
    s = store(tmp_path, max_bytes=ps.MIN_MAX_BYTES)
    assert len(s) == 2
    entry, n = s.find(prompts[0] + [7])
    assert s.load(entry, n) is not None  # the first is now the most recently used
    assert s.offer(prompts[2], fake_cache(tokens, seed=2, **shape))
    s.close()
    assert s.stats.evictions == 1
    kept = {e.tokens[0] for e in store(tmp_path, max_bytes=ps.MIN_MAX_BYTES).entries()}
    assert kept == {1, 3}  # the second, least recently used, went


def test_max_entries_keeps_the_most_recent(tmp_path):
    s = store(tmp_path, max_entries=1)
    assert s.offer([1] * 10, fake_cache(10))
    s.flush(30)
    assert s.offer([2] * 10, fake_cache(10))
    s.close()
    assert [e.tokens[0] for e in store(tmp_path).entries()] == [2]


def test_offers_that_add_little_or_extend_a_stored_prefix(tmp_path):
    s = store(tmp_path, min_tokens=8)
    assert not s.offer(list(range(5)), fake_cache(5))  # too short
    assert s.offer(list(range(20)), fake_cache(20))
    assert not s.offer(list(range(20)) + [1, 2], fake_cache(22))  # little that is new
    assert s.offer(list(range(40)), fake_cache(40))  # extends the first: it is superseded
    s.close()
    assert [len(e.tokens) for e in store(tmp_path, min_tokens=8).entries()] == [40]


def test_a_cache_bigger_than_the_bound_is_not_written(tmp_path, caplog):
    s = store(tmp_path, max_bytes=ps.MIN_MAX_BYTES)
    with caplog.at_level(logging.INFO, logger="mlx_harmony_core.prompt_store"):
        assert not s.offer(list(range(5000)), fake_cache(5000))
    assert "exceeds" in caplog.text


def test_bad_options_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="at least 1 MB"):
        ps.PromptStore(tmp_path, IDENTITY, max_bytes=1000)
    with pytest.raises(ValueError, match="min_tokens"):
        ps.PromptStore(tmp_path, IDENTITY, min_tokens=0)
    with pytest.raises(ValueError, match="max_entries"):
        ps.PromptStore(tmp_path, IDENTITY, max_entries=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="prompt cache directory"):
        ps.PromptStore(tmp_path / "file", IDENTITY)


def test_serve_flags_come_from_the_options():
    from mlx_harmony_core.cli import build_parser
    from mlx_harmony_core.cli.common import option_values
    from mlx_harmony_core.server.options import ServerOptions

    args = build_parser().parse_args(
        ["serve", "--prompt-cache-dir", "/tmp/x", "--prompt-cache-mb", "64"]
    )
    values = option_values(args, ServerOptions)
    assert values["prompt_cache_dir"] == "/tmp/x"
    assert values["prompt_cache_bytes"] == 64 * ps.MIB
    args = build_parser().parse_args(["serve"])
    values = option_values(args, ServerOptions)
    assert values["prompt_cache_dir"] is None
    assert values["prompt_cache_bytes"] == ps.DEFAULT_MAX_BYTES


# -- chat ------------------------------------------------------------------------------------------
def test_a_resumed_chat_prefills_only_what_is_new(tmp_path):
    pexpect = pytest.importorskip("pexpect")

    def spawn(log):
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
        args = ["-m", "mlx_harmony_core.cli", "chat", "--chat", str(log), "--max-tokens", "6"]
        args += ["--seed", "3", "--system", SYSTEM]
        child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=180)
        child.expect_exact(">>> ")
        return child

    def turn(child, text):
        child.sendline(text)
        child.expect(r"\[(\d+) prompt \((\d+) cached\)")
        prompt, cached = int(child.match.group(1)), int(child.match.group(2))
        child.expect_exact(">>> ")
        return prompt, cached

    def quit_(child):
        child.sendline("\\quit")
        child.expect(pexpect.EOF)

    # One session, two turns: what the in-memory cache reuses for the second.
    child = spawn(tmp_path / "a.json")
    p1, c1 = turn(child, "Hello there")
    p2, in_session = turn(child, "And then?")
    quit_(child)
    assert c1 == 0 and in_session >= p1 - 1
    # The same two turns with a restart between them: the disk gives as much.
    log = tmp_path / "b.json"
    child = spawn(log)
    assert turn(child, "Hello there") == (p1, 0)
    quit_(child)
    assert any(p.suffix == ps.SUFFIX for p in ps.beside(log).iterdir())
    child = spawn(log)
    assert turn(child, "And then?") == (p2, in_session)
    quit_(child)


# -- off the critical path --------------------------------------------------------------------------
def test_requests_never_wait_for_the_writer(fresh, tmp_path, monkeypatch):
    gate = threading.Event()
    real = pf.write_chunks

    def slow_disk(f, chunks):
        assert gate.wait(120)  # the file waits; requests go on meanwhile
        return real(f, chunks)

    monkeypatch.setattr(pf, "write_chunks", slow_disk)
    store = ps.attach(fresh, tmp_path, min_tokens=16)
    generate(fresh, messages())
    fresh.prefix_cache.clear()
    c = generate(fresh, messages("Something else entirely, and longer than before."))
    assert c.usage.completion_tokens > 0
    assert len(store) == 0 and not store.flush(0.1)  # nothing written yet
    gate.set()
    assert store.flush(120) and len(store) >= 1


# -- the in-memory prefix cache's lookup -----------------------------------------------------------
def test_prefix_cache_common_prefix_matches_the_obvious_reference():
    from mlx_harmony_core.prefix_cache import PrefixCache, _common

    def reference(a, b):
        n = 0
        for x, y in zip(a, b, strict=False):
            if x != y:
                break
            n += 1
        return n

    rng = np.random.default_rng(5)
    for _ in range(3000):
        a = rng.integers(0, 3, rng.integers(0, 40)).tolist()
        b = a[: rng.integers(0, len(a) + 1)] + rng.integers(0, 3, rng.integers(0, 6)).tolist()
        assert _common(a, b) == _common(b, a) == reference(a, b)
    pc = PrefixCache(max_entries=2)
    pc.put([1, 2, 3, 4], fake_cache(4))
    assert pc.longest((1, 2, 3, 9, 9)) == 3  # a tuple prompt is compared as a list


def test_a_chat_whose_cache_directory_cannot_be_made_goes_on(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    log = tmp_path / "c.json"
    ps.beside(log).write_text("a file where the directory would go")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"}
    args = ["-m", "mlx_harmony_core.cli", "chat", "--chat", str(log), "--max-tokens", "3"]
    child = pexpect.spawn(sys.executable, args, env=env, encoding="utf-8", timeout=180)
    child.expect_exact("warning: the chat's KV cache is not kept on disk")
    child.expect_exact(">>> ")
    child.sendline("Hi")
    child.expect(r"\[(\d+) prompt")
    child.expect_exact(">>> ")
    child.sendline("\\quit")
    child.expect(pexpect.EOF)
    assert json.loads(log.read_text())["messages"][1]["role"] == "assistant"


def test_serve_with_a_bound_below_the_minimum_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "mlx_harmony_core.cli", "serve", "--port", "0"]
    cmd += ["--prompt-cache-dir", str(tmp_path), "--prompt-cache-mb", "0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "prompt cache bound must be at least 1 MB" in done.stderr


def test_quantized_kv_caches_restart_exactly(tmp_path):
    engine = mhc.load("demo", cache_options={"kv_bits": 8})
    try:
        baseline = generate(engine, messages())
        engine.prefix_cache.clear()
        ps.attach(engine, tmp_path, min_tokens=16)
        generate(engine, messages())
        store = restart(engine, tmp_path, min_tokens=16)
        again = generate(engine, messages())
        assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens - 1
        assert again.text == baseline.text
        kinds = {layer["kind"] for layer in _header(store.entries()[0].path)["layers"]}
        assert "QuantizedKVCache" in kinds
    finally:
        if engine.runner.prompt_store is not None:
            engine.runner.prompt_store.close()


def _header(path):
    with open(path, "rb") as f:
        return pf.read_header(f)
