"""Several processes, one model: tensor-parallel (or pipeline-parallel) decoding over MLX's own
distributed layer (``mx.distributed``: ring over TCP, MPI, JACCL), launched with ``mlx.launch``.

Every rank loads only its shard (mlx-lm's ``Model.shard()`` for tensor parallelism, the
model's ``pipeline()`` where a family has only that) and runs the same decode loop; rank 0
alone talks to the user (CLI output, chat log, HTTP server) and the others follow it:

- Requests reach the followers as control messages over the group itself (JSON through an
  ``all_sum``, rank 0 contributing the bytes, the others zeros): only what the forward passes
  need (the prompt ids and the token budget) travels; everything that can fail is checked on
  rank 0 first, so a bad request never reaches the others.
- Tokens: every rank runs the same forward passes, so every rank has the same logits, but rank
  0 alone samples with the request's controls (grammars, stop strings, penalties live there),
  and its token is broadcast in the graph (one 8-byte ``all_sum`` per step, carrying a
  "go on" bit). Bitwise-equal logits on every rank are not something to bet on across
  machines; one broadcast makes every rank feed the very same token.
- Ending (a stop, a cancel, an error on rank 0): rank 0 sends one last broadcast with the
  bit cleared in place of the next token, so the followers never wait for a step that will
  not come. A rank that dies makes the others' next collective fail within seconds
  (the ring backend reports the lost peer): the group is then marked broken and every later
  request gets a :class:`~.errors.GroupError` instead of a hang. A collective can also
  stall instead of failing (MLX's ring backend does, now and then, when a peer dies
  mid-step): a watchdog fails the request and the group after ``timeout_s`` without progress
  (a step or a prefill chunk); a CLI run, stuck for good, exits with the message.

Prefix reuse across requests is off in a group (each rank would have to evict the same caches
at the same time); speculative decoding and batching run one request at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .errors import GroupError

__all__ = ["Group", "current", "follow", "init", "shard_vocab"]

logger = logging.getLogger(__name__)

# Control message sizes ride in a fixed 2-int header: (kind, byte length).
_RUN, _EXIT = 1, 2
# Seconds a request may go without a step or a prefill chunk before the group is declared
# lost (a chunk of a large model's prefill over slow links can take a few seconds).
TIMEOUT_S = 30.0


class Group:
    """An ``mx.distributed`` group and the little protocol rank 0 drives it with."""

    def __init__(self, group: Any, backend: str = "any", timeout_s: float = TIMEOUT_S) -> None:
        self.group = group
        self.rank = group.rank()
        self.size = group.size()
        self.backend = backend
        self.timeout_s = timeout_s
        self.broken: str | None = None  # why the group can no longer run requests
        self.released = False  # rank 0 told the others to exit
        self._lock = threading.Lock()
        self._since: float | None = None  # last progress of the running request
        self._on_stall: list[Callable[[BaseException], None]] = []
        self._watchdog: threading.Thread | None = None

    def info(self) -> dict[str, object]:
        """Size, rank and backend (for :func:`mlx_harmony_core.backend_info`)."""
        out: dict[str, object] = {"size": self.size, "rank": self.rank, "backend": self.backend}
        if self.broken:
            out["broken"] = self.broken
        return out

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def check(self) -> None:
        """Raise :class:`GroupError` once a rank has been lost."""
        if self.broken:
            raise GroupError(self.broken)

    def lost(self, exc: BaseException) -> GroupError:
        if not self.broken:
            self.broken = (
                f"the distributed group ({self.size} ranks, {self.backend}) lost a rank: "
                f"{exc}; restart every rank"
            )
            logger.error("%s", self.broken)
        return GroupError(self.broken)

    # -- the watchdog -----------------------------------------------------------------------
    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around one request: the watchdog expects progress every ``timeout_s``."""
        self.begin()
        try:
            yield
        finally:
            self.finish()

    def begin(self) -> None:
        """A request starts: from now on the watchdog expects progress every ``timeout_s``."""
        with self._lock:
            self._since = time.monotonic()
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="mhc-group-watchdog", daemon=True
                )
                self._watchdog.start()

    def finish(self) -> None:
        """The request ended: nothing to watch until the next."""
        with self._lock:
            self._since = None

    def progress(self) -> None:
        """A step or a chunk went through."""
        self._since = time.monotonic()

    @contextlib.contextmanager
    def on_stall(self, handler: Callable[[BaseException], None]) -> Iterator[None]:
        """Call ``handler(GroupError)`` (from the watchdog's thread) if the running request
        stalls; without a handler a stall ends the process."""
        self._on_stall.append(handler)
        try:
            yield
        finally:
            self._on_stall.remove(handler)

    def set_stall_handler(self, handler: Callable[[BaseException], None] | None) -> None:
        """The one handler for the running request (``None``: none; see :meth:`on_stall`)."""
        self._on_stall[:] = [] if handler is None else [handler]

    def _watch(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout_s / 4))
            since = self._since
            if since is None or time.monotonic() - since < self.timeout_s:
                continue
            error = self.lost(
                TimeoutError(f"rank {self.rank} saw no progress for {self.timeout_s:g} s")
            )
            handlers = list(self._on_stall)
            if not handlers:  # nothing can unblock this process's MLX wait: leave
                logger.error("rank %d: exiting: %s", self.rank, error)
                logging.shutdown()
                os._exit(1)
            for handler in handlers:
                handler(error)
            with self._lock:
                self._since = None

    def collective(self, fn: Any) -> Any:
        """Run ``fn()`` (which evaluates collectives); a failure marks the group broken."""
        self.check()
        try:
            return fn()
        except RuntimeError as exc:
            raise self.lost(exc) from exc

    # -- control messages (rank 0 -> everyone), between requests ---------------------------
    def _all_sum(self, a: mx.array) -> mx.array:
        # On the caller's stream: in order with the decode loop's collectives.
        out = mx.distributed.all_sum(a, group=self.group)
        mx.eval(out)
        return out

    def send(self, message: dict[str, Any] | None) -> None:
        """Rank 0: send ``message`` to every rank (None: tell them to exit)."""
        data = b"" if message is None else json.dumps(message).encode()
        kind = _EXIT if message is None else _RUN

        def go() -> None:
            self._all_sum(mx.array([kind, len(data)], dtype=mx.int32))
            if data:
                self._all_sum(mx.array(list(data), dtype=mx.int32))

        self.collective(go)

    def receive(self) -> dict[str, Any] | None:
        """Followers: the next message from rank 0 (None: exit)."""

        def go() -> dict[str, Any] | None:
            kind, n = self._all_sum(mx.zeros((2,), dtype=mx.int32)).tolist()
            if kind == _EXIT:
                return None
            data = bytes(self._all_sum(mx.zeros((n,), dtype=mx.int32)).tolist()) if n else b""
            return json.loads(data)

        return self.collective(go)

    def barrier(self) -> None:
        self.collective(lambda: self._all_sum(mx.zeros((1,), dtype=mx.int32)))

    # -- in the decode loop -----------------------------------------------------------------
    def share(self, ids: mx.array | None, go: bool = True) -> mx.array:
        """(token, go) from rank 0, lazily, as two int32: rank 0 passes its sampled id
        (shape (1,)), the followers None."""
        if self.leader:
            assert ids is not None
            vec = mx.concatenate(
                [ids.reshape(1).astype(mx.int32), mx.array([1 if go else 0], dtype=mx.int32)]
            )
        else:
            vec = mx.zeros((2,), dtype=mx.int32)
        return mx.distributed.all_sum(vec, group=self.group)

    def end(self) -> None:
        """Rank 0: the broadcast that takes the place of a step that will not come."""
        self.collective(lambda: mx.eval(self.share(mx.zeros((1,), dtype=mx.int32), go=False)))


def is_peer_error(exc: BaseException) -> bool:
    """Whether an MLX error says a distributed peer is gone (the ring backend's words)."""
    text = str(exc).lower()
    return any(w in text for w in ("[ring]", "[mpi]", "[jaccl]", "peer", "connection"))


_current: list[Group] = []


def current() -> Group | None:
    """The group this process joined with :func:`init`, if any."""
    return _current[0] if _current else None


# -- vocabulary parallelism ------------------------------------------------------------------
# mlx-lm's shard() splits attention and experts but keeps the embedding and the output head
# whole on every rank; with GPT-OSS's 201088-token vocabulary they are most of a small model
# (and 1% of gpt-oss-120b). Here each rank keeps 1/N of their rows.


def _rows(module: nn.Module, start: int, stop: int, per: int) -> None:
    """Keep rows [start, stop) of ``module``'s row-indexed arrays, zero-padded to ``per``."""
    for name in ("weight", "scales", "biases", "bias"):
        a = module.get(name) if hasattr(module, "get") else None
        if a is None:
            continue
        part = a[start:stop]
        if stop - start < per:
            pad = mx.zeros((per - (stop - start), *a.shape[1:]), dtype=a.dtype)
            part = mx.concatenate([part, pad])
        setattr(module, name, mx.contiguous(part))  # a copy: the whole table is let go


class ShardedEmbedding(nn.Module):
    """An embedding (float or quantized) split by vocabulary rows over ``group``: a lookup
    sums every rank's rows (each has zeros where it holds no row); as a linear layer (tied
    weights) every rank computes its slice of the logits and they are gathered."""

    def __init__(self, inner: nn.Module, group: Any, vocab: int) -> None:
        super().__init__()
        n, r = group.size(), group.rank()
        self.per = -(-vocab // n)
        self.start, self.vocab = r * self.per, vocab
        _rows(inner, self.start, min(vocab, self.start + self.per), self.per)
        self.inner = inner
        self.group = group

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        inside = (local >= 0) & (local < self.per)
        rows = self.inner(mx.where(inside, local, 0))
        rows = mx.where(inside[..., None], rows, mx.zeros_like(rows))
        return mx.distributed.all_sum(rows, group=self.group)

    def as_linear(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.inner.as_linear(x), self.group, self.vocab)


class ShardedHead(nn.Module):
    """An output layer (float or quantized) split by vocabulary rows; logits gathered."""

    def __init__(self, inner: nn.Module, group: Any, vocab: int) -> None:
        super().__init__()
        per = -(-vocab // group.size())
        start = group.rank() * per
        _rows(inner, start, min(vocab, start + per), per)
        self.inner, self.group, self.vocab = inner, group, vocab

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.inner(x), self.group, self.vocab)


def _gather_vocab(part: mx.array, group: Any, vocab: int) -> mx.array:
    """Every rank's (..., per) slice of the logits -> the whole (..., vocab)."""
    moved = mx.moveaxis(part, -1, 0)
    whole = mx.distributed.all_gather(moved, group=group)
    return mx.moveaxis(whole, 0, -1)[..., :vocab]


def shard_vocab(model: nn.Module, group: Any) -> bool:
    """Split ``model``'s embedding and output head by vocabulary rows over ``group`` (mlx-lm
    models with ``model.embed_tokens`` and, untied, ``lm_head``); False if it has neither."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if embed is None or not hasattr(embed, "weight"):
        return False
    vocab = int(embed.weight.shape[0])
    inner.embed_tokens = ShardedEmbedding(embed, group, vocab)
    head = getattr(model, "lm_head", None)
    if head is not None and hasattr(head, "weight") and int(head.weight.shape[0]) == vocab:
        model.lm_head = ShardedHead(head, group, vocab)
    return True


def init(backend: str = "any", timeout_s: float | None = None) -> Group:
    """Join the group ``mlx.launch`` set up (raises a clear error when there is none);
    ``timeout_s``: see :data:`TIMEOUT_S`."""
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"the group timeout must be > 0 seconds, got {timeout_s}")
    if _current:
        return _current[0]
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as exc:
        raise RuntimeError(
            f"no distributed group to join ({exc}); start every rank with mlx.launch, e.g. "
            "mlx.launch --backend ring --hosts HOST1,HOST2 mlx-harmony-core serve --distributed"
        ) from exc
    name = backend if backend != "any" else _backend_name()
    _current.append(Group(group, name, timeout_s or TIMEOUT_S))
    return _current[0]


def _backend_name() -> str:
    for name in ("ring", "mpi", "jaccl", "nccl"):
        if mx.distributed.is_available(name) and _launched_with(name):
            return name
    return "any"


def _launched_with(name: str) -> bool:
    env = {
        "ring": "MLX_HOSTFILE",
        "jaccl": "MLX_IBV_DEVICES",
        "nccl": "NCCL_HOST_IP",
        "mpi": "OMPI_COMM_WORLD_SIZE",
    }
    return env[name] in os.environ


def follow(engine: Any) -> int:
    """A follower rank's life: run every request rank 0 sends, until it says exit.
    Returns the process exit code (1 when the group broke)."""
    group: Group = engine.group
    while True:
        try:
            message = group.receive()
        except GroupError as exc:
            logger.error("rank %d: %s", group.rank, exc)
            return 1
        if message is None:
            return 0
        try:
            engine.follow(message)
        except GroupError as exc:
            logger.error("rank %d: %s", group.rank, exc)
            return 1
