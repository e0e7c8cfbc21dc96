"""Prompt caches on disk: KV caches of long shared prefixes, kept across restarts.

A :class:`PromptStore` is a directory of files, one per stored token sequence, each holding
the per-layer KV cache state of that sequence, the tokens themselves and the identity of
the model and build that made it (:func:`model_identity`). The model runner asks it for the
longest stored prefix of a prompt (:meth:`PromptStore.find`) when that beats the in-memory
prefix cache, loads it (:meth:`PromptStore.load`, trimmed to the common prefix) and offers
finished requests' caches back (:meth:`PromptStore.offer`).

Threads: the generation thread owns every MLX array. It copies an offered cache to host
memory (numpy) and builds the arrays of a loaded one; a writer thread of this module writes
files (temp + fsync + rename) and evicts, and touches no MLX array. Nothing here can fail a
request: a file that cannot be written, read or trusted is logged and skipped.

Files (:mod:`.prompt_file`) are checked before use: a header and payload checksum, the
format version and the model identity. The directory is bounded in bytes with
least-recently-used eviction: a file's mtime is its last use, so the order survives restarts.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import hashlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import prompt_file as pf
from ._version import __version__
from .kv_cache import Cache
from .prompt_file import (
    FORMAT_VERSION,
    SUFFIX,
    TMP_PREFIX,
    CacheFileError,
)

logger = logging.getLogger(__name__)

MIB = 2**20
# The one source of the store's defaults and limits (``serve`` flags and ``chat`` use them).
DEFAULT_MAX_BYTES = 4096 * MIB
MIN_MAX_BYTES = 1 * MIB
MIN_TOKENS = 128  # shorter prefixes prefill faster than a file is found, read and checked
MAX_PENDING = 1024 * MIB  # host copies waiting for the writer (one alone may be larger)
STALE_TMP_S = 3600.0  # a temp file this old is a crashed write's, not another process's


# -- model identity ---------------------------------------------------------------------------
_core_build: str | None = None


def core_build() -> str:
    """SHA-256 of the C++ extension's file: a cache from another build is never loaded."""
    global _core_build
    if _core_build is None:
        from . import _core

        h = hashlib.sha256()
        with open(_core.__file__, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _core_build = h.hexdigest()
    return _core_build


def model_identity(
    model: Any,
    *,
    config: dict[str, Any] | None = None,
    cache_options: dict[str, Any] | None = None,
    samples: int = 32,
) -> dict[str, Any]:
    """What makes a stored KV cache valid for ``model``: the package version, the C++ build,
    MLX's version, the model's class and config, every parameter's name, shape and dtype
    and ``samples`` of its values (so another checkpoint, quantization or adapter of the same
    shapes differs), and the cache options (KV quantization, sliding-window history).

    Evaluates a few small arrays: call it on the thread that will run the model, or before
    serving starts.
    """
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters()) if hasattr(model, "parameters") else []
    h = hashlib.sha256()
    picks = []
    for name, a in params:
        h.update(f"{name}:{tuple(a.shape)}:{a.dtype};".encode())
        flat = a.reshape(-1)
        idx = np.linspace(0, max(flat.size - 1, 0), num=min(samples, flat.size)).astype(np.int32)
        picks.append(mx.take(flat, mx.array(idx)).astype(mx.float32))
    mx.eval(picks)
    for p in picks:
        h.update(np.array(p).tobytes())
    return {
        "format": FORMAT_VERSION,
        "package": __version__,
        "core": core_build(),
        "mlx": mx.__version__,
        "model": f"{type(model).__module__}.{type(model).__qualname__}",
        "config": _digest(config or {}),
        "weights": h.hexdigest(),
        "parameters": len(params),
        "cache_options": _digest(cache_options or {}),
    }


def identity_key(identity: dict[str, Any]) -> str:
    """The short hash files carry and lookups compare."""
    return _digest(identity)[:32]


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# -- the store ----------------------------------------------------------------------------------
@dataclass
class StoreEntry:
    """One usable file: the tokens its cache holds and how far that cache can rewind."""

    path: Path
    tokens: np.ndarray
    nbytes: int
    last_used: float
    trimmable: int


@dataclass
class _Job:
    tokens: np.ndarray
    layers: pf.Layers
    trimmable: int
    nbytes: int


@dataclass
class StoreStats:
    """What the store did since it opened (read by ``/metrics``)."""

    hits: int = 0
    hit_tokens: int = 0
    writes: int = 0
    write_errors: int = 0
    evictions: int = 0
    dropped: int = 0  # unusable files removed or skipped


class PromptStore:
    """KV caches of token prefixes in ``directory`` for one model identity.

    ``identity`` is :func:`model_identity`'s dict. ``max_bytes`` bounds every cache file in
    the directory (this model's and others', least recently used evicted first);
    ``min_tokens`` is the shortest prefix stored or loaded, and a cache is only written when
    it holds at least that many tokens beyond what is stored already; ``max_entries`` (None:
    no limit) keeps only the most recently used files of this model (a chat keeps one).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        identity: dict[str, Any],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        min_tokens: int = MIN_TOKENS,
        max_entries: int | None = None,
        model: Any = None,
    ) -> None:
        check_options(max_bytes, min_tokens, max_entries)
        self.directory = Path(directory).expanduser()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(
                f"prompt cache directory {self.directory} cannot be created ({exc.strerror})"
            ) from None
        if not self.directory.is_dir():
            raise ValueError(f"prompt cache directory {self.directory} is not a directory")
        self.identity = dict(identity)
        self.key = identity_key(self.identity)
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens
        self.max_entries = max_entries
        self.stats = StoreStats()
        self._model_id = id(model) if model is not None else None
        self._lock = threading.Lock()
        self._entries: dict[Path, StoreEntry] = {}
        self._others: dict[Path, tuple[int, float]] = {}  # our format, not loadable: size, mtime
        self._pending: list[np.ndarray] = []
        self._pending_bytes = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._writer: threading.Thread | None = None
        self._closed = False
        self._scan()
        atexit.register(self.close)

    # -- what the runner calls (generation thread) ------------------------------------------
    def serves(self, model: Any) -> bool:
        """False when the store was opened for another model object (the engine's model was
        replaced): its files would not be valid for this one."""
        return self._model_id is None or self._model_id == id(model)

    def find(self, prompt: Sequence[int], longer_than: int = 0) -> tuple[StoreEntry | None, int]:
        """The stored entry sharing the longest rewindable prefix with ``prompt`` (leaving at
        least one token to run), if that prefix is ``min_tokens`` or more and longer than
        ``longer_than``; and its length."""
        p = np.asarray(prompt, dtype=np.int64)
        best, best_n = None, max(longer_than, self.min_tokens - 1)
        with self._lock:
            entries = list(self._entries.values())
        for e in entries:
            m = min(len(e.tokens), len(p) - 1)
            if m <= best_n:
                continue
            n = _common(e.tokens[:m], p[:m])
            if n > best_n and len(e.tokens) - n <= e.trimmable:
                best, best_n = e, n
        return (best, best_n) if best is not None else (None, 0)

    def load(self, entry: StoreEntry, n: int) -> list[Any] | None:
        """``entry``'s caches trimmed to its first ``n`` tokens (evaluated), or ``None`` when
        its file cannot be used (logged; removed from the store, deleted if it is ours)."""
        start = time.perf_counter()
        try:
            header, payload = pf.read(entry.path)
            if header.get("identity") != self.key:
                raise CacheFileError("it was made for another model or build", reason="foreign")
            caches = pf.build(header, payload)
            extra = len(entry.tokens) - n
            for c in caches:
                if c.trim(extra) != extra:
                    raise CacheFileError("its cache cannot rewind to the prefix", reason="unusable")
            mx.eval([c.state for c in caches])
        except (OSError, CacheFileError, ValueError, KeyError, TypeError) as exc:
            self._drop(entry.path, exc)
            return None
        now = time.time()
        with contextlib.suppress(OSError):  # its last use, for LRU across restarts
            os.utime(entry.path, (now, now))
        with self._lock:
            entry.last_used = now
            self.stats.hits += 1
            self.stats.hit_tokens += n
        logger.info(
            "prompt cache: loaded %d of %d tokens from %s in %.0f ms",
            n,
            len(entry.tokens),
            entry.path.name,
            1000 * (time.perf_counter() - start),
        )
        return caches

    def offer(self, tokens: Sequence[int], cache: Sequence[Any]) -> bool:
        """Queue ``cache`` (evaluated, holding exactly ``tokens``) for writing when it holds
        ``min_tokens`` or more tokens that no stored or queued file holds; returns whether
        it was queued. Copies the arrays to host memory here (the caller's thread owns them);
        the file is written on the store's writer thread."""
        if self._closed or len(tokens) < self.min_tokens:
            return False
        if not all(isinstance(c, Cache) and c.offset == len(tokens) for c in cache):
            return False  # mlx-lm's own caches (SSM state...) or a cache off its tokens
        t = np.asarray(tokens, dtype=np.int32)
        with self._lock:
            known = [e.tokens for e in self._entries.values()] + self._pending
        if len(t) - max((_common(k, t) for k in known), default=0) < self.min_tokens:
            return False  # what is new in it is short: the shared prefix is stored already
        trimmable = min(c.trimmable() for c in cache)
        nbytes = sum(int(a.nbytes) for c in cache for a in c.state)
        if nbytes > self.max_bytes:
            logger.info(
                "prompt cache: a %d-token cache (%.1f MB) exceeds the store's bound; not stored",
                len(t),
                nbytes / MIB,
            )
            return False
        with self._lock:
            if self._pending and self._pending_bytes + nbytes > min(self.max_bytes, MAX_PENDING):
                self.stats.dropped += 1
                logger.info("prompt cache: the writer is behind; a %d-token cache skipped", len(t))
                return False
        layers = []
        for c in cache:
            arrays = list(c.state)
            dtypes = [str(a.dtype).rsplit(".", 1)[-1] for a in arrays]
            host = [pf.host_copy(a) for a in arrays]
            layers.append((c.kind, {k: int(v) for k, v in c.meta().items()}, host, dtypes))
        with self._lock:
            self._pending.append(t)
            self._pending_bytes += nbytes
        self._start_writer()
        self._queue.put(_Job(t, layers, trimmable, nbytes))
        return True

    # -- lifetime --------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        """Wait until finished requests' caches are offered (the generation thread is idle)
        and queued ones written (or ``timeout`` seconds); True if done."""
        from .threads import generation

        deadline = None if timeout is None else time.monotonic() + timeout
        if threading.current_thread().name != generation.name:
            generation.wait_idle(timeout if timeout is not None else 1e9)
        while True:
            with self._lock:
                if not self._pending:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued (up to ``timeout`` seconds), then accept nothing more."""
        if self._closed:
            return
        if not self.flush(timeout):
            logger.warning("prompt cache: %d caches not written at close", len(self._pending))
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
        atexit.unregister(self.close)

    @property
    def nbytes(self) -> int:
        """Bytes of this model's files."""
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[StoreEntry]:
        """This model's usable files, least recently used first."""
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.last_used)

    # -- the directory ---------------------------------------------------------------------------
    def _scan(self) -> None:
        foreign_model = 0
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith(TMP_PREFIX):
                self._remove_stale_tmp(path)
                continue
            if path.suffix != SUFFIX or not path.is_file():
                continue  # not a cache file: none of our business
            try:
                with open(path, "rb") as f:
                    header = pf.read_header(f)
            except OSError as exc:
                logger.warning("prompt cache: cannot read %s (%s); skipped", path, exc)
                continue
            except CacheFileError as exc:
                st = _stat(path)
                if exc.reason == "version" and st is not None:
                    self._others[path] = st  # a later or earlier format: only LRU removes it
                    logger.warning("prompt cache: %s %s; not loaded", path, exc)
                elif exc.reason == "foreign":
                    logger.warning("prompt cache: %s is not a cache file; left alone", path)
                else:
                    self._drop(path, exc)
                continue
            st = _stat(path)
            if st is None:
                continue
            if header.get("identity") != self.key:
                self._others[path] = st
                foreign_model += 1
                continue
            self._entries[path] = StoreEntry(
                path,
                np.asarray(header["tokens"], dtype=np.int32),
                st[0],
                st[1],
                int(header["trimmable"]),
            )
        if foreign_model:
            logger.info(
                "prompt cache: %d file(s) in %s were made for another model or build; "
                "they are ignored (never loaded)",
                foreign_model,
                self.directory,
            )
        if self._entries:
            logger.info(
                "prompt cache: %d cached prefix(es) for this model in %s (%.1f MB)",
                len(self._entries),
                self.directory,
                self.nbytes / MIB,
            )
        self._evict()

    def _remove_stale_tmp(self, path: Path) -> None:
        st = _stat(path)
        if st is not None and time.time() - st[1] > STALE_TMP_S:
            logger.info("prompt cache: removing %s, left by an interrupted write", path.name)
            path.unlink(missing_ok=True)

    def _drop(self, path: Path, exc: BaseException) -> None:
        with self._lock:
            self._entries.pop(path, None)
            self._others.pop(path, None)
            self.stats.dropped += 1
        if isinstance(exc, CacheFileError) and exc.reason == "corrupt":
            logger.warning("prompt cache: %s is unusable (%s); deleted", path, exc)
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                logger.warning("prompt cache: could not delete %s (%s)", path, err)
        elif isinstance(exc, FileNotFoundError):
            logger.info("prompt cache: %s is gone (another process evicted it?)", path)
        else:
            logger.warning("prompt cache: %s is not used (%s); left alone", path, exc)

    def _evict(self) -> None:
        with self._lock:
            files = [(e.last_used, p, e.nbytes, True) for p, e in self._entries.items()]
            files += [(m, p, n, False) for p, (n, m) in self._others.items()]
            files.sort(key=lambda f: f[0])
            total = sum(f[2] for f in files)
            mine = sum(1 for f in files if f[3])
            gone = []
            for _, p, n, is_mine in files:
                over_entries = self.max_entries is not None and is_mine and mine > self.max_entries
                if total <= self.max_bytes and not over_entries:
                    continue
                gone.append(p)
                total -= n
                mine -= int(is_mine)
                self._entries.pop(p, None)
                self._others.pop(p, None)
                self.stats.evictions += 1
        for p in gone:
            logger.debug("prompt cache: evicted %s", p.name)
            try:
                p.unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("prompt cache: could not evict %s (%s)", p, exc)

    # -- the writer thread -------------------------------------------------------------------
    def _start_writer(self) -> None:
        with self._lock:
            if self._writer is None:
                self._writer = threading.Thread(
                    target=self._write_loop, name="mhc-prompt-cache", daemon=True
                )
                self._writer.start()

    def _write_loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._write(job)
            except Exception:  # the writer must go on: one cache is lost, nothing else
                logger.exception("prompt cache: writing a cache failed")
            finally:
                with self._lock:
                    self._pending = [p for p in self._pending if p is not job.tokens]
                    self._pending_bytes -= job.nbytes

    def _write(self, job: _Job) -> None:
        name = hashlib.sha256(self.key.encode() + job.tokens.tobytes()).hexdigest()[:40]
        path = self.directory / (name + SUFFIX)
        made_by = {k: self.identity[k] for k in ("package", "mlx", "model") if k in self.identity}
        header, chunks = pf.encode(self.key, made_by, job.tokens, job.layers, job.trimmable)
        try:
            size = pf.write_atomically(path, header, chunks)
        except OSError as exc:
            with self._lock:
                self.stats.write_errors += 1
            full = " (disk full)" if exc.errno == errno.ENOSPC else ""
            logger.warning(
                "prompt cache: could not write a %d-token cache%s: %s; the request is unaffected",
                len(job.tokens),
                full,
                exc,
            )
            return
        now = time.time()
        t = job.tokens
        with self._lock:
            # Files this one extends (and can rewind to) are superseded: they go.
            gone = [
                e.path
                for e in self._entries.values()
                if e.path != path
                and len(e.tokens) <= len(t)
                and len(t) - len(e.tokens) <= job.trimmable
                and _common(e.tokens, t) == len(e.tokens)
            ]
            for p in gone:
                del self._entries[p]
            self._entries[path] = StoreEntry(path, t, size, now, job.trimmable)
            self.stats.writes += 1
        for p in gone:
            p.unlink(missing_ok=True)
        logger.info(
            "prompt cache: stored %d tokens (%.1f MB) in %s",
            len(job.tokens),
            size / MIB,
            path.name,
        )
        self._evict()


def check_options(max_bytes: int, min_tokens: int, max_entries: int | None) -> None:
    """Raise ``ValueError`` for bounds a store cannot work with."""
    if not isinstance(max_bytes, int) or max_bytes < MIN_MAX_BYTES:
        raise ValueError(
            f"the prompt cache bound must be at least {MIN_MAX_BYTES // MIB} MB "
            f"(got {max_bytes} bytes)"
        )
    if not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a whole number >= 1 (got {min_tokens!r})")
    if max_entries is not None and (not isinstance(max_entries, int) or max_entries < 1):
        raise ValueError(f"max_entries must be None or >= 1 (got {max_entries!r})")


def attach(
    engine: Any,
    directory: str | os.PathLike[str],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    min_tokens: int = MIN_TOKENS,
    max_entries: int | None = None,
) -> PromptStore:
    """Open a :class:`PromptStore` in ``directory`` for ``engine``'s model and let its runner
    use it (loading prefixes from it, offering finished caches to it). Call before serving:
    it evaluates a few small arrays of the model. A store attached before is closed."""
    runner = engine.runner
    if runner.group is not None:
        raise ValueError("a prompt cache on disk does not work with a distributed group")
    if not runner.reuse_cache:
        raise ValueError("a prompt cache on disk needs cache reuse (reuse_cache=True)")
    identity = model_identity(
        runner.model, config=getattr(engine, "config", None), cache_options=runner.cache_options
    )
    store = PromptStore(
        directory,
        identity,
        max_bytes=max_bytes,
        min_tokens=min_tokens,
        max_entries=max_entries,
        model=runner.model,
    )
    old, runner.prompt_store = runner.prompt_store, store
    if old is not None:
        old.close()
    return store


def beside(log_path: str | os.PathLike[str]) -> Path:
    """The prompt cache directory of a chat log: ``chat.json`` -> ``chat.json.kv``."""
    path = Path(log_path)
    return path.with_name(path.name + ".kv")


def _common(a: np.ndarray, b: np.ndarray) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def _stat(path: Path) -> tuple[int, float] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime
