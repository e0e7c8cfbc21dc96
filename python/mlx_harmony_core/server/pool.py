"""Several models in one server: :class:`ModelPool` loads each on first use, unloads it after
an idle TTL or when the memory budget needs room, and hands requests a :class:`Lease` on it.

Each model has its own scheduler on its own long-lived worker thread (``mhc-model-N``, see
:func:`~mlx_harmony_core.threads.worker`): it loads there, decodes there, and is dropped
there, so a model's MLX work never moves threads, one model decoding never holds up
another, and a model unloaded and loaded again reuses its thread (threads that ran MLX
work never exit before the interpreter). The event loop only awaits loads, so ``/health``
and requests to other models are answered while one loads.

Memory: the budget bounds the weights of the loaded (and loading) models: a model's size
is measured once loaded (its arrays, each counted once), estimated from its files before.
A model that needs room unloads idle models, least recently used first; a model with a
request waiting, running or being prepared is never unloaded, nor a base whose adapter
entry is loaded. One that cannot fit even so is a 503 saying what holds the memory.

An adapter entry (``base`` + ``adapter_path``) shares its base's weights in memory
(:func:`~mlx_harmony_core.models.shared.adapted`): loading it loads the base first and
keeps the base loaded while it is.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import gc
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..scheduler import END, available_memory
from ..threads import worker
from .client import Cancellable, ClientWrapper, LocalClient, Sink
from .model_specs import ModelSpec, check_specs
from .options import ServerOptions
from .protocol import APIError

logger = logging.getLogger(__name__)

Loader = Callable[[ModelSpec, ServerOptions], Any]
# Default budget: this share of the memory available when the server starts.
BUDGET_SHARE = 0.75


@dataclass
class Lease:
    """A model held for one HTTP request: its engine ``client`` and ``opts`` (the server's
    options as this model is served). ``release()`` once the request has submitted its work
    (submitted requests keep the model loaded until they end)."""

    client: Any
    opts: ServerOptions
    entry: Any = None

    def release(self) -> None:
        """Let the model go idle (unloadable) once nothing else holds it."""
        entry, self.entry = self.entry, None
        if entry is not None:
            entry.pool.release(entry)


class _Entry:
    """One model's state (the pool's lock guards every field)."""

    def __init__(self, pool: ModelPool, spec: ModelSpec, index: int) -> None:
        self.pool, self.spec, self.index = pool, spec, index
        self.opts = spec.server_options(pool.options)
        self.worker = worker(f"mhc-model-{index}")
        self.engine: Any = None
        self.client: Any = None  # counted, metered LocalClient while loaded
        self.store: Any = None  # its prompt cache on disk (--prompt-cache-dir) while loaded
        self.loading: concurrent.futures.Future[None] | None = None
        self.users = 0  # leases and submitted requests
        self.pins = 0  # loaded adapter entries sharing these weights
        self.last_used = time.monotonic()
        self.nbytes: int | None = None  # measured once loaded
        self.estimate = 0
        self.load_seconds: float | None = None
        self.loads = self.unloads = 0

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> str:
        if self.client is not None:
            return "loaded"
        return "loading" if self.loading is not None else "unloaded"

    def need(self) -> int:
        """Bytes this model takes once loaded (measured, else estimated)."""
        return self.nbytes if self.nbytes is not None else self.estimate

    def idle(self) -> bool:
        return (
            self.client is not None
            and self.users == 0
            and self.pins == 0
            and self.client.pending == 0
        )


class ModelPool:
    """The models a server holds, by name; the first is the default (a request that names
    no model). Also the app's engine client for what spans every model (``pending``,
    ``shutdown``, ``wait_idle``).

    ``options``: the server's (``model_ttl_s``, ``memory_budget_bytes``, and the defaults
    each spec's options override). ``load(spec, opts)`` returns an Engine for a plain entry
    (default: :func:`mlx_harmony_core.load` with the spec's loading options over
    ``load_defaults``).
    """

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        options: ServerOptions,
        *,
        load: Loader | None = None,
        load_defaults: dict[str, Any] | None = None,
    ) -> None:
        check_specs(specs)
        self.options = options
        self.load_defaults = dict(load_defaults or {})
        self._load = load or self._load_engine
        self._lock = threading.Lock()
        self.entries = {s.name: _Entry(self, s, i) for i, s in enumerate(specs)}
        self.default = specs[0].name
        self.ttl_s = options.model_ttl_s
        self.budget_bytes = options.memory_budget_bytes or int(available_memory() * BUDGET_SHARE)
        for e in self.entries.values():
            e.estimate = _estimate(e.spec)
        # Wraps each loaded model's client (the app adds metrics and the request log).
        self.wrap: Callable[[str, Any], Any] = lambda name, client: client
        self._closing = threading.Event()
        self._reaper: threading.Thread | None = None
        if self.ttl_s is not None:
            self._reaper = threading.Thread(target=self._reap, name="mhc-pool-ttl", daemon=True)
            self._reaper.start()

    # -- the app's view ---------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The served models' names, the default first."""
        return list(self.entries)

    @property
    def context_length(self) -> int | None:
        """No single window: each model has its own (``/v1/models``)."""
        return None

    @property
    def pending(self) -> int:
        """Requests waiting or running on every loaded model."""
        with self._lock:
            clients = [e.client for e in self.entries.values() if e.client is not None]
        return sum(c.pending for c in clients)

    def loaded(self) -> list[tuple[str, Any, Any]]:
        """(name, client, engine) of each loaded model (``/metrics``)."""
        with self._lock:
            return [(e.name, e.client, e.engine) for e in self.entries.values() if e.client]

    def describe(self, name: str) -> dict[str, Any]:
        """A model's state for ``/v1/models``."""
        e = self.entry(name)
        with self._lock:
            out: dict[str, Any] = {
                "status": e.state,
                "memory_bytes": e.need() or None,
                "context_length": e.engine.context_length if e.engine is not None else None,
                "root": e.spec.path or e.spec.adapter_path,
                "parent": e.spec.base,
            }
        if e.spec.adapter_path is not None:
            out["adapter_path"] = e.spec.adapter_path
        return out

    def stats(self) -> dict[str, Any]:
        """Loads, unloads and memory per model, and the budget (``/metrics``)."""
        with self._lock:
            return {
                "budget_bytes": self.budget_bytes,
                "models": {
                    e.name: {
                        "loaded": e.client is not None,
                        "bytes": e.need() if e.state != "unloaded" else 0,
                        "loads": e.loads,
                        "unloads": e.unloads,
                        "load_seconds": e.load_seconds,
                    }
                    for e in self.entries.values()
                },
            }

    def entry(self, name: str | None) -> _Entry:
        """The entry called ``name`` (None: the default); 404 naming the served models."""
        e = self.entries.get(self.default if name is None else name)
        if e is None:
            raise APIError(
                404,
                f"model {name!r} is not served here; the models are: {', '.join(self.names)}",
                param="model",
                code="model_not_found",
            )
        return e

    # -- leases -----------------------------------------------------------------------------
    async def acquire(self, name: str | None) -> Lease:
        """The model ``name`` (None: the default), loaded if it is not (this waits, without
        blocking the event loop, for a load in progress). 404 for an unknown name, 503 when
        it cannot fit the memory budget, 500 when it fails to load."""
        e = self.entry(name)
        if e.spec.base is None:
            return await self._acquire(e, None)
        # An adapter entry: its base first (counters only when loaded), held while the
        # adapters load on it (always, so an unload between two checks cannot slip in).
        base = await self.acquire(e.spec.base)
        try:
            return await self._acquire(e, base.entry)
        finally:
            base.release()

    async def _acquire(self, e: _Entry, base: _Entry | None) -> Lease:
        with self._lock:
            if self._closing.is_set():
                raise APIError(503, "the server is shutting down", type="server_error")
            e.users += 1
            e.last_used = time.monotonic()
            future = None
            if e.client is None:
                try:
                    future = e.loading or self._start_load(e, base)
                except BaseException:
                    e.users -= 1
                    raise
        if future is not None:
            try:  # shielded: one request leaving does not cancel a load others wait for
                await asyncio.shield(asyncio.wrap_future(future))
            except BaseException as exc:
                self.release(e)
                if isinstance(exc, APIError | asyncio.CancelledError):
                    raise
                raise APIError(
                    500,
                    f"model {e.name!r} failed to load: {type(exc).__name__}: {exc}",
                    type="server_error",
                    code="model_load_failed",
                ) from None
        return Lease(_Counted(e), e.opts, e)

    def release(self, e: _Entry) -> None:
        """One holder of ``e`` is done."""
        with self._lock:
            e.users -= 1
            e.last_used = time.monotonic()

    def preload(self) -> None:
        """Load every model now, in order (``serve --preload``; before serving, no event
        loop running); raises a load's error."""
        for name in self.names:
            asyncio.run(self._hold_once(name))

    async def _hold_once(self, name: str) -> None:
        lease = await self.acquire(name)
        lease.release()

    # -- loading and unloading (under the lock) ---------------------------------------------
    def _start_load(self, e: _Entry, base: _Entry | None) -> concurrent.futures.Future[None]:
        self._make_room(e)
        if base is not None:
            base.pins += 1
        e.loading = e.worker.call(lambda: self._load_on_worker(e, base))
        return e.loading

    def _make_room(self, e: _Entry) -> None:
        """Unload idle models (LRU) until ``e`` fits the budget; 503 if it cannot."""
        used = sum(x.need() for x in self.entries.values() if x.state != "unloaded")
        need = e.need()
        if used + need <= self.budget_bytes:
            return
        idle = sorted(
            (x for x in self.entries.values() if x is not e and x.idle()),
            key=lambda x: x.last_used,
        )
        if used - sum(x.need() for x in idle) + need > self.budget_bytes:
            busy = [f"{x.name} ({_mb(x.need())} MB)" for x in self.entries.values()
                    if x.state != "unloaded" and x not in idle]  # fmt: skip
            raise APIError(
                503,
                f"model {e.name!r} needs about {_mb(need)} MB and cannot fit the memory budget "
                f"of {_mb(self.budget_bytes)} MB"
                + (f" while these models are in use: {', '.join(busy)}" if busy else "")
                + "; retry later, or start the server with a larger --memory-budget-mb",
                type="server_error",
                code="model_memory",
                headers={"Retry-After": "5"},
            )
        for x in idle:
            if used + need <= self.budget_bytes:
                break
            used -= x.need()
            self._unload(x, "to make room for " + repr(e.name))

    def _load_on_worker(self, e: _Entry, base: _Entry | None) -> None:
        """Load ``e`` (its worker thread); its state is set before the waiters wake."""
        start = time.perf_counter()
        try:
            logger.info("loading model %r", e.name)
            if base is not None:
                from ..models.shared import adapted, own_bytes

                engine = adapted(
                    base.engine,
                    e.spec.adapter_path or "",
                    prefix_cache_entries=e.opts.prefix_cache_entries,
                    prefix_cache_bytes=e.opts.prefix_cache_bytes,
                )
                nbytes = own_bytes(engine.model, base.engine.model)
            else:
                from ..models.shared import own_bytes

                engine = self._load(e.spec, e.opts)
                nbytes = own_bytes(engine.model)
            store = None
            if e.opts.prompt_cache_dir:  # each model its own files (keyed by identity)
                from ..prompt_store import attach

                store = attach(engine, e.opts.prompt_cache_dir, max_bytes=e.opts.prompt_cache_bytes)
            client = LocalClient(engine, e.opts, worker=e.worker)
        except BaseException:
            with self._lock:
                e.loading = None
                if base is not None:
                    base.pins -= 1
            logger.exception("model %r failed to load", e.name)
            raise
        seconds = time.perf_counter() - start
        with self._lock:
            e.engine, e.client, e.store = engine, self.wrap(e.name, client), store
            e.nbytes, e.load_seconds, e.loading = nbytes, seconds, None
            e.loads += 1
            used = sum(x.need() for x in self.entries.values() if x.state != "unloaded")
        logger.info("loaded model %r in %.2f s (%s MB)", e.name, seconds, _mb(nbytes))
        if used > self.budget_bytes:
            logger.warning(
                "models now take %s MB, over the %s MB budget (%r was estimated at %s MB)",
                _mb(used), _mb(self.budget_bytes), e.name, _mb(e.estimate),
            )  # fmt: skip

    def _load_engine(self, spec: ModelSpec, opts: ServerOptions) -> Any:
        """:func:`mlx_harmony_core.load` for a plain entry."""
        import mlx_harmony_core as mhc

        options = {**self.load_defaults, **spec.load}
        cache = dict(options.pop("cache_options", {}))
        for key, name in (("kv_bits", "kv_bits"), ("kv_group_size", "kv_group_size"),
                          ("kv_history", "history")):  # fmt: skip
            if key in options:
                cache[name] = options.pop(key)
        return mhc.load(
            spec.path,
            adapter_path=spec.adapter_path,
            cache_options=cache or None,
            prefix_cache_entries=opts.prefix_cache_entries,
            prefix_cache_bytes=opts.prefix_cache_bytes,
            **options,
        )

    def _unload(self, e: _Entry, why: str) -> None:
        """Drop ``e`` (idle) now; its memory is freed on its worker thread."""
        held = [e.engine, e.client]
        store, e.engine, e.client, e.store = e.store, None, None, None
        e.unloads += 1
        if e.spec.base is not None:
            self.entries[e.spec.base].pins -= 1
        logger.info("unloading model %r (%s)", e.name, why)

        def drop() -> None:
            import mlx.core as mx

            held[1].shutdown()
            if store is not None:  # its queued caches are written before the model goes
                store.close()
            held.clear()
            gc.collect()
            mx.clear_cache()
            _trim_heap()

        e.worker.put(drop)

    def _reap(self) -> None:
        """Unload models idle longer than the TTL (a thread of its own; no MLX work)."""
        assert self.ttl_s is not None
        interval = min(max(self.ttl_s / 4, 0.05), 5.0)
        while not self._closing.wait(interval):
            now = time.monotonic()
            with self._lock:
                for e in sorted(self.entries.values(), key=lambda x: x.spec.base is None):
                    if e.idle() and now - e.last_used >= self.ttl_s:
                        self._unload(e, f"idle for {self.ttl_s:g} s")

    # -- the whole server -------------------------------------------------------------------
    def shutdown(self) -> None:
        """End every model's running requests at their next token, refuse new ones."""
        self._closing.set()
        with self._lock:
            clients = [e.client for e in self.entries.values() if e.client is not None]
        for c in clients:
            c.shutdown()

    def close_stores(self) -> None:
        """Write every loaded model's queued prompt caches to disk (after :meth:`shutdown`,
        before the process exits)."""
        with self._lock:
            stores = [e.store for e in self.entries.values() if e.store is not None]
        for store in stores:
            store.close()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every model's loop and worker thread is parked."""
        deadline = time.monotonic() + timeout
        with self._lock:
            clients = [e.client for e in self.entries.values() if e.client is not None]
            workers = [e.worker for e in self.entries.values()]
        ok = all(c.wait_idle(max(0.0, deadline - time.monotonic())) for c in clients)
        return ok and all(w.wait_idle(max(0.0, deadline - time.monotonic())) for w in workers)


class _Counted(ClientWrapper):
    """A loaded model's client, counting each submitted request as a holder of the model
    until its last event (so a model with running requests is never unloaded); any other
    member is the client's."""

    def __init__(self, e: _Entry) -> None:
        self._entry, self.client = e, e.client

    def submit(self, request: Any, sink: Sink) -> Cancellable:
        """Submit; the model is held until the request's :data:`END`."""
        e, pool = self._entry, self._entry.pool
        with pool._lock:
            e.users += 1

        def counted(item: Any) -> None:
            sink(item)
            if item is END:
                pool.release(e)

        try:
            return self.client.submit(request, counted)
        except BaseException:
            pool.release(e)
            raise


def _estimate(spec: ModelSpec) -> int:
    """Bytes a model's weights take, from its files (0 when unknown: a repo not fetched)."""
    if spec.base is not None:
        files = [Path(spec.adapter_path or "") / "adapters.safetensors"]
    elif spec.path == "demo":
        from ..models.builder import demo_model_path

        files = list(demo_model_path().glob("*.safetensors"))
    else:
        path = Path(spec.path or "").expanduser()
        files = [path] if path.is_file() else list(path.glob("*.safetensors"))
    return sum(f.stat().st_size for f in files if f.is_file())


def _trim_heap() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: a GGUF load's
    many small buffers left ~110 of 150 MB resident after the unload; measured)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its allocator decides
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _mb(n: int) -> str:
    return f"{n / 2**20:.0f}" if n >= 2**20 else f"{n / 2**20:.2f}"
