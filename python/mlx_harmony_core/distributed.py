"""Several processes, one model: tensor-parallel (or pipeline-parallel) decoding over MLX's own
distributed layer (``mx.distributed``: ring over TCP, MPI, JACCL), launched with ``mlx.launch``.

Every rank loads only its shard (mlx-lm's ``Model.shard()`` for tensor parallelism, the
model's ``pipeline()`` where a family has only that) and runs the same batch steps; rank 0
alone talks to the user (CLI output, chat log, HTTP server) and the others follow it:

- Rank 0's scheduler batches requests as in one process (:mod:`.distributed_batch`): it
  decides admissions, prefill chunks, joins, leaves, cancellations, prefix-cache takes and
  stores, plain or verify steps (its drafts) and rewinds. Everything a step does to the
  caches goes to the followers in one control message per step (JSON through an
  ``all_sum``, rank 0 contributing the bytes, the others zeros), sent before any collective
  of the step runs; a :class:`Follower` applies the same operations in the same order, so
  every rank runs the same forward passes over the same batch caches.
- Tokens: every rank computes the same logits, but rank 0 alone samples with the requests'
  controls (grammars, stop strings, penalties live there); the tokens it drew for every row
  (plain or verified) travel in the next step's message, so every rank feeds the very same
  tokens. Bitwise-equal logits on every rank are not something to bet on across machines.
- The prefix cache of every rank holds the same entries: rank 0 sends which prefix each
  prompt reused and how many entries remain after each store (a follower checks it finds the
  same prefix, so a rank that drifted is caught before it runs a different forward pass).
- A step counter rides in every message's header, both ways (rank 0 sends the step, each
  follower the step it expects): a follower that fell out of step fails the group on every
  rank at once. A rank that dies makes the others' next collective fail within seconds
  (the ring backend reports the lost peer): the group is then marked broken and every later
  request gets a :class:`~.errors.GroupError` instead of a hang. A collective can also
  stall instead of failing (MLX's ring backend does, now and then, when a peer dies
  mid-step): a watchdog fails the running requests and the group after ``timeout_s``
  without progress (a step or a prefill chunk); a CLI run, stuck for good, exits with the
  message.

A prompt cache on disk (``prompt_store``) is not used in a group: only rank 0 could read it.
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
import numpy as np

from .errors import GroupError
from .kv_cache import rewind_rows
from .models.head import split_head

__all__ = [
    "Group",
    "current",
    "follow",
    "greedy_ids",
    "greedy_step",
    "init",
    "shard_vocab",
    "sharded_head",
]

logger = logging.getLogger(__name__)

# Control messages ride in a fixed header: (kind, byte length, step, the step the followers
# expect, summed), then up to _INLINE int32 words of the message itself (a decode step's fit:
# one collective); a longer message follows in a second collective.
_STEP, _EXIT = 1, 2
_INLINE = 64
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
        self.steps = 0  # rank 0: step messages sent (the followers count theirs)
        self._lock = threading.Lock()
        self._since: float | None = None  # last progress of the running request
        self._on_stall: list[Callable[[BaseException], None]] = []
        self._watchdog: threading.Thread | None = None
        self._idle = threading.Event()  # no request running (rank 0: the batch is empty)
        self._idle.set()

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
            self._idle.clear()
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="mhc-group-watchdog", daemon=True
                )
                self._watchdog.start()

    def finish(self) -> None:
        """The request ended: nothing to watch until the next."""
        with self._lock:
            self._since = None
            self._idle.set()

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

    # -- control messages (rank 0 -> everyone), one per step ------------------------------
    def _all_sum(self, a: mx.array) -> mx.array:
        # On the caller's stream: in order with the decode loop's collectives.
        out = mx.distributed.all_sum(a, group=self.group)
        mx.eval(out)
        return out

    def out_of_step(self, why: str) -> GroupError:
        """Mark the group broken because a rank no longer mirrors rank 0's steps."""
        return self.lost(RuntimeError(f"a rank fell out of step: {why}"))

    def send(self, message: dict[str, Any] | None, step: int = 0) -> None:
        """Rank 0: send ``message`` (step ``step``'s operations) to every rank (None: tell
        them to exit). Each follower answers with the step it expects, in the same
        collective: a follower out of step is a :class:`GroupError`."""
        data = b"" if message is None else json.dumps(message, separators=(",", ":")).encode()
        kind = _EXIT if message is None else _STEP
        if message is None and not self._idle.wait(self.timeout_s):
            # The scheduler's last message (the batch went idle) must go first.
            logger.warning("rank 0: releasing the group while a request still runs")

        inline = len(data) <= 4 * _INLINE
        words = np.zeros(4 + _INLINE, dtype=np.int32)
        words[:4] = [kind, len(data), step, 0]
        if inline and data:
            packed = np.array(_pack(data))
            words[4 : 4 + packed.size] = packed

        def go() -> None:
            header = self._all_sum(mx.array(words))
            expected = int(header[3].item())
            if kind == _STEP and expected != (self.size - 1) * step:
                raise self.out_of_step(
                    f"rank 0 is at step {step}, the followers expect {expected} in all"
                )
            if not inline:
                self._all_sum(_pack(data))

        self.collective(go)

    def receive(self, step: int = 0) -> dict[str, Any] | None:
        """Followers: the next message from rank 0 (None: exit); ``step``: the step this
        rank expects (a mismatch is a :class:`GroupError` on every rank)."""

        def go() -> dict[str, Any] | None:
            words = np.zeros(4 + _INLINE, dtype=np.int32)
            words[3] = step
            header = self._all_sum(mx.array(words))
            kind, n, sent, _ = header[:4].tolist()
            if kind == _EXIT:
                return None
            if sent != step:
                raise self.out_of_step(f"rank {self.rank} expects step {step}, rank 0 sent {sent}")
            if n <= 4 * _INLINE:
                data = _unpack(header[4:], n)
            else:
                data = _unpack(self._all_sum(mx.zeros(((n + 3) // 4,), dtype=mx.int32)), n)
            return json.loads(data) if n else {}

        return self.collective(go)

    def barrier(self) -> None:
        self.collective(lambda: self._all_sum(mx.zeros((1,), dtype=mx.int32)))


def _pack(data: bytes) -> mx.array:
    """Bytes as int32 words (zero-padded): a sum with the others' zeros keeps them."""
    pad = data + b"\0" * (-len(data) % 4)
    return mx.array(np.frombuffer(pad, dtype=np.int32))


def _unpack(words: mx.array, n: int) -> bytes:
    return np.array(words, dtype=np.int32).tobytes()[:n]


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
        self.valid = max(0, min(vocab, self.start + self.per) - self.start)
        _rows(inner, self.start, self.start + self.valid, self.per)
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

    def local_logits(self, x: mx.array) -> mx.array:
        """This rank's slice of the logits (tied weights), ids ``start`` on; no collective."""
        return self.inner.as_linear(x)[..., : self.valid]


class ShardedHead(nn.Module):
    """An output layer (float or quantized) split by vocabulary rows; logits gathered."""

    def __init__(self, inner: nn.Module, group: Any, vocab: int) -> None:
        super().__init__()
        per = -(-vocab // group.size())
        self.start = group.rank() * per
        self.valid = max(0, min(vocab, self.start + per) - self.start)
        _rows(inner, self.start, self.start + self.valid, per)
        self.inner, self.group, self.vocab = inner, group, vocab

    def __call__(self, x: mx.array) -> mx.array:
        return _gather_vocab(self.inner(x), self.group, self.vocab)

    def local_logits(self, x: mx.array) -> mx.array:
        """This rank's slice of the logits, ids ``start`` on; no collective."""
        return self.inner(x)[..., : self.valid]


def _gather_vocab(part: mx.array, group: Any, vocab: int) -> mx.array:
    """Every rank's (..., per) slice of the logits -> the whole (..., vocab)."""
    moved = mx.moveaxis(part, -1, 0)
    whole = mx.distributed.all_gather(moved, group=group)
    return mx.moveaxis(whole, 0, -1)[..., :vocab]


def sharded_head(model: nn.Module) -> ShardedHead | ShardedEmbedding | None:
    """The vocabulary-split output head of ``model`` when its forward pass is known to end
    in it (see :func:`~.models.head.split_head`), else None."""
    head = split_head(model)
    owner = getattr(head, "__self__", head)  # tied weights: the embedding's as_linear
    return owner if isinstance(owner, ShardedHead | ShardedEmbedding) else None


def greedy_ids(part: mx.array, start: int, group: Any) -> mx.array:
    """Greedy draws (B,) int32 over the whole vocabulary from every rank's slice ``part``
    (B, n) of the logits (ids ``start`` on), exchanging 3 numbers per row and rank instead
    of the logits (see :func:`best_of_slice`, :func:`best_of_ranks`). Every rank gets the
    same ids: they come from the same gathered numbers."""
    mine = best_of_slice(part, start)[None]
    return best_of_ranks(mx.distributed.all_gather(mine, group=group))


def best_of_slice(part: mx.array, start: int) -> mx.array:
    """(B, 3) float32: each row's highest logit in ``part`` (B, n), the first id holding it
    (``start`` + its index; exact in float32 below 2**24) and 1 where the row holds a NaN
    or +inf (0 elsewhere)."""
    best = mx.max(part, axis=-1).astype(mx.float32)
    idx = mx.argmax(part, axis=-1).astype(mx.float32) + start
    # MLX's max is NaN (or +inf) when the row holds one: no second pass over the logits
    # (tests/test_distributed.py checks it, long rows included).
    bad = (mx.isnan(best) | mx.isposinf(best)).astype(mx.float32)
    return mx.stack([best, idx, bad], axis=-1)


def best_of_ranks(every: mx.array) -> mx.array:
    """The greedy ids (B,) int32 from every rank's :func:`best_of_slice` (ranks, B, 3),
    ranks holding ascending id ranges: the first id of the highest logit, as the fused
    sampler's greedy draw, with its error codes (a NaN or +inf anywhere:
    ``ERROR_NON_FINITE``; every logit -inf: ``ERROR_NO_CANDIDATE``)."""
    from . import _core

    maxima = every[..., 0]
    top = mx.max(maxima, axis=0)
    first = mx.argmax((maxima == top).astype(mx.int32), axis=0)  # the lowest rank holding it
    ids = mx.take_along_axis(every[..., 1], first[None], axis=0)[0].astype(mx.int32)
    ids = mx.where(top == -mx.inf, _core.ERROR_NO_CANDIDATE, ids)
    return mx.where(mx.any(every[..., 2] > 0, axis=0), _core.ERROR_NON_FINITE, ids)


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


class Follower:
    """A follower rank's copy of rank 0's batch: the same row caches, batch caches and
    prefix cache, changed by the operations of each step message (see
    :class:`~.distributed_batch.GroupBatch`, which records them on rank 0), in order.

    Operations (JSON lists, the first item names it): ``take`` (a row's prompt and the
    prefix rank 0 reused), ``chunk`` (n prompt tokens of a row), ``first`` (a row's last
    prompt token, its logits drawn on rank 0), ``retire`` (a row leaves: its cache kept for
    the prefix cache or not), ``filter`` (batch rows kept), ``join`` (rows inserted),
    ``store`` (a kept cache into the prefix cache, with the entry count after it), ``clear``,
    ``decode`` (one token per batch row), ``verify`` (each row's token and drafts, the
    positions the head runs at) and ``rewind`` (each row's rejected drafts). A ``first`` or
    ``decode`` marked greedy exchanges only each row's best logits (:func:`greedy_step`)."""

    def __init__(self, runner: Any) -> None:
        from .kv_cache import make_batch_cache

        self.runner = runner
        self.group: Group = runner.group
        self.step = 0
        self.rows: dict[int, _FollowedRow] = {}
        self.batch: list[int] = []  # row ids in batch order
        self.cache: list[Any] | None = None
        self.stash: list[tuple[list[int], list[Any]]] = []  # retired caches to store
        self.solo = make_batch_cache(runner.new_cache()) is None
        # Rank 0 says how many entries stay after each store: no eviction of our own (a
        # rank's share of a cache may weigh differently than rank 0's).
        runner.prefix_cache.max_bytes = None

    def receive(self) -> dict[str, Any] | None:
        """The next step's message (None: exit)."""
        return self.group.receive(self.step + 1)

    def apply(self, message: dict[str, Any]) -> None:
        """Run one step: its operations, then every forward pass of it evaluated in order."""
        group = self.group
        self.step += 1
        try:
            with mx.stream(self.runner.stream()):
                for op in message.get("ops", []):
                    out = getattr(self, "_" + op[0])(*op[1:])
                    if out is not None:  # a forward pass: evaluated as rank 0 evaluates it
                        mx.eval(out)
                        group.progress()
        except GroupError:
            raise
        except Exception as exc:  # this rank can no longer mirror rank 0: the group is lost
            raise group.lost(exc) from exc
        if message.get("idle"):
            group.finish()
        else:
            group.begin()

    # -- the operations ---------------------------------------------------------------------
    def _take(self, rid: int, prompt: list[int], reused: int) -> None:
        cache, n = self.runner.prefix_cache.take(prompt)
        if cache is None:
            cache, n = self.runner.new_cache(), 0
        if n != reused:
            raise self.group.out_of_step(
                f"rank {self.group.rank} reuses {n} prompt tokens where rank 0 reused {reused}"
            )
        self.rows[rid] = _FollowedRow(prompt, cache, prompt[:n])

    def _chunk(self, rid: int, n: int) -> list[mx.array]:
        row = self.rows[rid]
        part = row.prompt[len(row.tokens) : len(row.tokens) + n]
        self.runner.forward(mx.array(part, dtype=mx.int32)[None], row.cache)
        row.tokens += part
        return [c.state for c in row.cache]

    def _first(self, rid: int, greedy: bool = False) -> mx.array:
        row = self.rows[rid]
        rest = row.prompt[len(row.tokens) :]
        row.tokens += rest
        inputs = mx.array(rest, dtype=mx.int32)[None]
        if greedy:  # rank 0 draws it greedily from the ranks' best logits
            return greedy_step(self.runner, inputs, row.cache)
        return self.runner.forward(inputs, row.cache)[:, -1, :]

    def _retire(self, rid: int, batch_row: int | None, stored: bool, count: int) -> None:
        row = self.rows.pop(rid)
        if not stored:
            return
        if batch_row is None:
            cache = row.cache
        else:
            assert self.cache is not None
            cache = self.cache if self.solo else [c.extract(batch_row) for c in self.cache]
        if len(row.tokens) != count:
            raise self.group.out_of_step(
                f"rank {self.group.rank} holds {len(row.tokens)} tokens of a row, rank 0 {count}"
            )
        self.stash.append((row.tokens, cache))

    def _filter(self, keep: list[int]) -> None:
        if self.solo or not keep:
            self.cache = None
        else:
            for layer in self.cache or []:
                layer.filter(keep)
        self.batch = [self.batch[i] for i in keep]

    def _join(self, rids: list[int]) -> None:
        from .kv_cache import make_batch_cache

        for rid in rids:
            row = self.rows[rid]
            if self.solo:
                self.cache = row.cache
            else:
                if self.cache is None:
                    self.cache = make_batch_cache(row.cache)
                for layer, c in zip(self.cache or [], row.cache, strict=True):
                    layer.insert(c)
            row.cache = []
            self.batch.append(rid)

    def _store(self, count: int) -> None:
        tokens, cache = self.stash.pop(0)
        mx.eval([c.state for c in cache])
        pc = self.runner.prefix_cache
        pc.put(tokens, cache)
        pc.keep_newest(count)
        if len(pc) != count:
            raise self.group.out_of_step(
                f"rank {self.group.rank} keeps {len(pc)} prefix-cache entries, rank 0 {count}"
            )

    def _clear(self) -> None:
        self.runner.prefix_cache.clear()
        self.stash.clear()  # rows retired before the clear: rank 0 stores none of them

    def _decode(self, tokens: list[int], greedy: bool = False) -> mx.array:
        for rid, t in zip(self.batch, tokens, strict=True):
            self.rows[rid].tokens.append(t)
        inputs = mx.array(tokens, dtype=mx.int32)[:, None]
        if greedy:  # every row draws greedily: rank 0 takes its ids from greedy_ids
            return greedy_step(self.runner, inputs, self.cache)
        return self.runner.forward(inputs, self.cache)[:, -1, :]

    def _verify(self, inputs: list[list[int]], where: list[int]) -> mx.array:
        for rid, fed in zip(self.batch, inputs, strict=True):
            self.rows[rid].tokens += fed
        return self.runner.forward_at(mx.array(inputs, dtype=mx.int32), self.cache, where)

    def _rewind(self, back: list[int]) -> None:
        rewind_rows(self.cache, back, self.solo)
        for rid, n in zip(self.batch, back, strict=True):
            if n:
                del self.rows[rid].tokens[-n:]


def greedy_step(runner: Any, inputs: mx.array, cache: Any) -> mx.array:
    """A decode step (lazy) of ``inputs`` (B, 1) whose rows all draw greedily: each rank
    runs the output head over its slice of the vocabulary and the ranks exchange only each
    row's best logit (:func:`greedy_ids`). The same collectives on every rank."""
    head = sharded_head(runner.model)
    assert head is not None
    with mx.stream(runner.stream()):
        hidden = runner.model.model(inputs, cache)[:, -1, :]
        return greedy_ids(head.local_logits(hidden), head.start, runner.group.group)


class _FollowedRow:
    """A row on a follower: its prompt, its own cache until it joins, the tokens cached."""

    def __init__(self, prompt: list[int], cache: list[Any], tokens: list[int]) -> None:
        self.prompt, self.cache, self.tokens = prompt, cache, list(tokens)


def follow(engine: Any) -> int:
    """A follower rank's life: mirror every step rank 0 sends, until it says exit.
    Returns the process exit code (1 when the group broke)."""
    follower = engine.runner._follower = Follower(engine.runner)
    group = follower.group
    while True:
        try:
            message = follower.receive()
            if message is None:
                return 0
            follower.apply(message)
        except GroupError as exc:
            logger.error("rank %d: %s", group.rank, exc)
            return 1
