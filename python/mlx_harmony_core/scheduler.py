"""The decode path of every request: continuous batching, one forward pass per step.

The scheduler runs on the process's generation thread and drives every request, whatever
front end sent it: ``Engine.generate`` / ``stream`` are a batch of one, the server's
requests decode together. Every step runs the model once over all running requests (one row
each, each at its own position, in :class:`BatchKVCache` layers), samples every row with the
fused sampler (each with its own options and RNG key), and feeds each request its token:
stop matching, parsing and events stay the :class:`~.request.Request`'s own. Finished or
cancelled requests leave between steps and waiting ones join without draining the batch. A
joining prompt is prefilled alone (its own single-sequence caches, reusing the prefix cache)
in chunks of at most ``prefill_chunk`` tokens, one chunk per decode step, so running streams
stall at most one chunk per token; then its cache is inserted as a new row. Step n+1 is
built while step n runs (when a row's draw needs token n first, a grammar's mask, the
forward pass is queued ahead and the draw is built after the read, while that pass runs).

Two kinds of step share this loop: a verify step, when rows speculate (each row feeds its
newest token and its own k_i drafts, or none, in one pass; draws go position by position
with plain decoding's keys; each row's cache rows rewind past their own first miss; the
batch's :class:`~.speculative.Pacer` weighs each row's chances that its drafts hold against
the measured cost of a wider pass and picks the step's width, 1 being a plain stretch). In a distributed
group, rank 0's batch is a :class:`~.distributed_batch.GroupBatch`: the same steps, each
sent to the other ranks, which mirror it (:class:`~.distributed.Follower`). The scheduler
sees a :class:`~.runner.ModelRunner`, never the engine.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .distributed import is_peer_error
from .errors import CapacityError
from .kv_cache import kv_bytes, kv_bytes_per_token, make_batch_cache, rewind_rows
from .params import SamplingParams
from .request import Completion, Request, StreamEvent
from .runner import ModelRunner
from .sampling import LogProbs, Sampler, sample_rows
from .speculative import MAX_DRAFT, DraftBatch, ModelDrafter, Pacer, Speculation
from .threads import generation, stop_at_exit

logger = logging.getLogger(__name__)

# What a handle's sink receives last, after the final event (or an exception).
END = object()

# Defaults every front end shares (Python, CLI, server).
MAX_BATCH = 8
PREFILL_CHUNK = 128  # ~5 ms on the demo model, ~0.2 s on the 0.24B one (this 2-core CPU)

Sink = Callable[[Any], None]


class Handle:
    """A submitted request: its events as they are decoded, readable from any thread.

    Iterate it for :class:`StreamEvent` s (the last has the completion), or call
    :meth:`result`. :meth:`cancel` ends the request at its next token
    (``finish_reason="cancelled"``). With a ``sink`` the events go there instead (then
    an exception, if the request failed, and :data:`END`).
    """

    def __init__(self, request: Request, sink: Sink | None = None) -> None:
        self.request = request
        self._queue: queue.SimpleQueue[Any] | None = None if sink else queue.SimpleQueue()
        self._sink = sink
        self._cancel = threading.Event()
        self._done = threading.Event()
        self.completion: Completion | None = None
        self.error: BaseException | None = None

    def cancel(self) -> None:
        """Stop generating at the next token (or before starting)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, item: Any) -> None:
        if self._done.is_set():  # ended already (a stalled group's watchdog may end it first)
            return
        if isinstance(item, StreamEvent) and item.completion is not None:
            self.completion = item.completion
        elif isinstance(item, BaseException):
            self.error = item
        if item is END:
            self._done.set()
        if self._sink is not None:
            try:
                self._sink(item)
            except Exception:  # the consumer is gone (a closed event loop): stop its request
                if not self._cancel.is_set():
                    logger.debug("a handle's sink failed; cancelling", exc_info=True)
                self._cancel.set()
        else:
            assert self._queue is not None
            self._queue.put(item)

    def __iter__(self) -> Iterator[StreamEvent]:
        if self._queue is None:
            raise RuntimeError("this handle sends its events to a sink")
        while True:
            item = self._queue.get()
            if item is END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the completion (raises the request's error, or ``TimeoutError``)."""
        if self._queue is not None and not self._done.is_set():
            for _ in self:
                pass
        if not self._done.wait(timeout):
            raise TimeoutError("the request has not finished")
        if self.error is not None:
            raise self.error
        assert self.completion is not None
        return self.completion


@dataclass
class Row:
    """A request in the scheduler: waiting, prefilling, or a row of the batch."""

    req: Request
    handle: Handle
    need: int  # worst-case tokens: prompt + max_tokens
    cache: list[Any] | None = None  # its own caches while prefilling
    done: int = 0  # prompt tokens in its cache
    cached: int = 0  # tokens (prompt, then reply) in the row's cache
    joining: bool = False  # prefilled: joins the batch at the end of this step
    last: int = -1  # the last token pushed
    first: tuple[mx.array, LogProbs | None] | None = None  # first token (lazy)
    finished: bool = False
    drafting: bool = False  # speculation: the drafter has seen the prompt

    @property
    def prompt(self) -> list[int]:
        return self.req.prompt_ids


@dataclass
class _Step:
    """A decode step built for ``rows``; ``inputs`` feed the next step (current rows)."""

    rows: list[Row]
    ids: mx.array
    lp: LogProbs | None
    inputs: mx.array = field(init=False)

    def __post_init__(self) -> None:
        self.inputs = self.ids


class Scheduler:
    """Runs every request of one model, many together (continuous batching).

    ``max_batch`` rows decode at once (1: one request at a time); beyond that requests
    wait, at most ``max_queue`` of them (``None``: no limit), later ones get a
    :class:`CapacityError`. ``kv_budget_bytes`` bounds the KV caches of all running
    requests (default: half the memory available when the scheduler starts): a request
    joins only when the batch's worst case (every row at its prompt + ``max_tokens``) fits,
    and one that cannot fit even alone is refused. ``prefill_chunk`` bounds how many
    prompt tokens run between two decode steps. ``worker`` (a
    :func:`~.threads.worker`) is the thread its loop runs on (default: the generation thread).
    ``batch_class`` makes the batch (default :class:`Batch`; a distributed group's is
    :class:`~.distributed_batch.GroupBatch`, which :meth:`Engine.batching` passes).

    Models whose caches cannot batch (state other than attention K/V) run with
    ``max_batch`` 1.
    """

    def __init__(
        self,
        runner: ModelRunner,
        *,
        max_batch: int = MAX_BATCH,
        max_queue: int | None = None,
        kv_budget_bytes: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        worker: Any = None,
        batch_class: Callable[[Scheduler], Batch] | None = None,
    ) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_queue is not None and max_queue < 0:
            raise ValueError("max_queue must be >= 0 (or None: no limit)")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be >= 1")
        if not isinstance(runner, ModelRunner) and isinstance(
            getattr(runner, "runner", None), ModelRunner
        ):  # Scheduler(engine): the old signature, kept for one release
            warnings.warn(
                "Scheduler(engine) is deprecated: pass engine.runner, or use engine.batching()",
                DeprecationWarning,
                stacklevel=2,
            )
            runner = runner.runner  # type: ignore[attr-defined]
        self.runner = runner
        # The thread the loop runs on (a threads.worker; default: the process's generation
        # thread). A server holding several models gives each its own.
        self.worker = worker if worker is not None else generation
        template = runner.new_cache()
        self._template = template
        self.batchable = make_batch_cache(template) is not None
        if not self.batchable and max_batch > 1:
            logger.info("this model's caches cannot batch: one request at a time")
            max_batch = 1
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self.kv_budget_bytes = (
            kv_budget_bytes if kv_budget_bytes is not None else available_memory() // 2
        )
        # Measured with one lazy forward pass (never evaluated); models whose caches cannot
        # batch run one request at a time and are not budgeted.
        self._per_token = [0] * len(template)
        if self.batchable:
            try:
                self._per_token = kv_bytes_per_token(runner.model, runner.new_cache())
            except Exception:  # a model that fails here fails its requests, with their errors
                logger.debug("could not measure the KV cache per token", exc_info=True)
        self._lock = threading.Lock()
        self._waiting: deque[Row] = deque()
        self._admitted = 0  # prefilling or running
        self._posted = False
        self.closing = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        if runner.group is not None and batch_class is None:
            raise ValueError(
                "a distributed group's scheduler batches through "
                "distributed_batch.GroupBatch: use engine.batching()"
            )
        self._batch = (batch_class or Batch)(self)
        me = weakref.ref(self)
        stop_at_exit(lambda: (s := me()) is not None and s.shutdown())

    # -- submitting (any thread) -----------------------------------------------------------
    def kv_need(self, tokens: int) -> int:
        """Bytes of KV cache one request of ``tokens`` tokens can hold."""
        return kv_bytes(self._template, self._per_token, tokens)

    def _fits(self, rows: Sequence[int]) -> bool:
        # Rows are right-aligned in the batch: each is as wide as the widest; capacity
        # grows by doubling, so count twice the need.
        return not rows or 2 * len(rows) * self.kv_need(max(rows)) <= self.kv_budget_bytes

    def submit(self, request: Request, *, sink: Sink | None = None) -> Handle:
        """Queue ``request``; returns its :class:`Handle` at once.

        Raises :class:`CapacityError` when the queue is full, the request's KV cache cannot
        fit the budget even alone, or the scheduler is shutting down.
        """
        if self.runner.group is not None:
            self.runner.group.check()  # a group that lost a rank refuses at once (a 503)
        request.check(self.runner.vocab_size)  # what cannot fit this model never joins
        handle = Handle(request, sink)
        need = len(request.prompt_ids) + request.max_tokens
        if not self._fits([need]):
            raise CapacityError(
                f"the request needs up to {_mb(2 * self.kv_need(need))} MB of KV cache "
                f"({need} tokens), more than the budget of {_mb(self.kv_budget_bytes)} MB; "
                "lower max_tokens or shorten the prompt",
                code="kv_budget",
            )
        row = Row(request, handle, need)
        own = request.should_stop  # the caller's, kept

        def should_stop() -> bool:
            return handle.cancelled or self.closing.is_set() or (own is not None and own())

        request.should_stop = should_stop
        with self._lock:
            if self.closing.is_set():
                raise _shutting_down()
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + max(
                0, self.max_batch - self._admitted
            ):
                raise CapacityError(
                    f"the server is busy ({self._admitted} requests running, "
                    f"{len(self._waiting)} queued); retry later",
                    code="queue_full",
                )
            self._waiting.append(row)
            self.idle.clear()
            if not self._posted:
                self._posted = True
                self.worker.put(self._run)
        return handle

    @property
    def pending(self) -> int:
        """Requests waiting or running."""
        with self._lock:
            return len(self._waiting) + self._admitted

    def stats(self) -> dict[str, int]:
        """What a scrape of ``/metrics`` reads (any thread): ``waiting``, ``running``
        (prefilling or decoding), ``batch`` (rows decoding), ``kv_bytes`` (the KV budget the
        running requests reserve) and ``kv_budget_bytes``."""
        with self._lock:
            waiting, running = len(self._waiting), self._admitted
        b = self._batch
        try:  # read while the generation thread may change them: a snapshot is enough
            needs = [r.need for r in (*b.rows, *b.prefilling)]
            batch = len(b.rows)
        except RuntimeError:  # changed while copied
            needs, batch = [], 0
        kv = 2 * len(needs) * self.kv_need(max(needs)) if needs else 0
        return {
            "waiting": waiting,
            "running": running,
            "batch": batch,
            "kv_bytes": kv,
            "kv_budget_bytes": self.kv_budget_bytes,
        }

    def shutdown(self) -> None:
        """Running requests end at their next token (``cancelled``), waiting ones get a
        :class:`CapacityError`; new ones are refused."""
        self.closing.set()
        with self._lock:
            if not self._posted and self._waiting:
                self._posted = True
                self.worker.put(self._run)

    # -- the loop (generation thread) ------------------------------------------------------
    def _admit(self) -> bool:
        """Move waiting requests into the batch while they fit; False when all is idle."""
        b = self._batch
        with self._lock:
            while self._waiting:
                row = self._waiting[0]
                if self.closing.is_set() or row.handle.cancelled:
                    self._waiting.popleft()
                    b.refuse(row, _shutting_down() if self.closing.is_set() else None)
                    continue
                if self._admitted >= self.max_batch:
                    break
                if not self._fits([r.need for r in b.members()] + [row.need]):
                    if self._admitted == 0:  # checked at submit already; never stall on it
                        self._waiting.popleft()
                        b.refuse(row, CapacityError("over the KV budget", code="kv_budget"))
                        continue
                    break
                self._waiting.popleft()
                self._admitted += 1
                b.prefilling.append(row)
            if b.empty():
                self._posted = False
                self.idle.set()
                return False
        return True

    def _left(self, n: int) -> None:
        with self._lock:
            self._admitted -= n

    def _run(self) -> None:
        while True:
            try:
                if not self._admit():
                    self._batch.flush()
                    return
                self._batch.iteration()
            except Exception as exc:  # the batch as a whole failed: every row gets it
                group = self.runner.group
                if group is not None and is_peer_error(exc):
                    exc = group.lost(exc)
                logger.exception("batched generation failed")
                self._batch.fail_all(exc)

    def run(self, request: Request) -> Iterator[StreamEvent]:
        """Submit ``request`` and yield its events as they are decoded (the caller's
        thread waits; a consumer that stops early cancels the request)."""
        not_on(self.worker)
        yield from events(self.submit(request))


def not_on(worker: Any) -> None:
    """Refuse to wait for a request on ``worker``'s thread (it would wait on itself)."""
    if threading.current_thread().name == worker.name:
        raise RuntimeError(
            "a request cannot be run from the generation thread (it would wait on itself)"
        )


def events(handle: Handle) -> Iterator[StreamEvent]:
    """``handle``'s events on the caller's thread; a consumer that stops early cancels the
    request and waits for its last events (its cache is back before this returns)."""
    try:
        yield from handle
    finally:
        if not handle.done:
            handle.cancel()
            for _ in handle:
                pass


class Batch:
    """The scheduler's state on the generation thread."""

    def __init__(self, sched: Scheduler) -> None:
        self.s = sched
        self.runner = sched.runner
        self.rows: list[Row] = []
        self.solo = not sched.batchable  # rows run on their own caches, one at a time
        self.prefilling: deque[Row] = deque()
        self.cache: list[Any] | None = None
        self.pending: _Step | None = None
        self.bias: tuple[mx.array, mx.array, mx.array] | None = None
        self.pending_inputs: mx.array | None = None  # host tokens, when nothing is pipelined
        self.to_store: list[tuple[list[int], list[Any], int]] = []  # + clears at the end
        # Speculation: whether this batch verifies drafts (measured), its plain stretch
        # (steps left, start time, tokens and prefill seconds so far), what was read.
        self.pacer = Pacer()
        self.stretch: tuple[int, float, int, float] | None = None
        self.emitted = 0  # tokens pushed to rows
        self.reads = 0  # plain steps read
        self.prefill_s = 0.0  # seconds spent prefilling
        self.draft_batches: dict[int, DraftBatch] = {}  # by draft model
        self.draft_tried: set[int] = set()  # draft models (by id) that drafted in this batch
        self.width = 0  # the last verify step's tokens per row
        self.kinds: list[int] = []  # the kind of each row's drafts in the step planned last

    def members(self) -> list[Row]:
        return [*self.rows, *self.prefilling]

    def empty(self) -> bool:
        return not self.rows and not self.prefilling

    # -- one iteration -------------------------------------------------------------------
    def iteration(self) -> None:
        if self._speculating():
            return self._speculate()
        sync = any(r.req.sync for r in self.rows)
        nxt = None
        ahead: tuple[list[Row], mx.array] | None = None
        # Rows that end at the unread token need no next step.
        last = all(len(r.req.generated) + 1 >= r.req.max_tokens for r in self.rows)
        if self.pending is not None and not last:  # queued before step n is read
            if sync:  # a row's draw needs token n on the host: only the forward pass now
                ahead = (list(self.rows), self._forward(self.pending.inputs))
                mx.async_eval(ahead[1])
            else:
                nxt = self._build(self.pending.inputs, ahead=True)
        joined = self._prefill()
        if self.pending is not None:
            self._read(self.pending)
            self._glance()
        self.flush()
        for r in joined:
            self._read_first(r)
        if ahead is not None:  # masks are computed while the forward pass runs
            nxt = self._sample(*ahead)
        self._update_rows(nxt, [r for r in joined if not r.finished])
        if self.pending is None and self.rows and not self._may_speculate():
            self.pending = self._build(self.pending_inputs)

    def _update_rows(self, nxt: _Step | None, joined: list[Row]) -> None:
        """Retire finished rows, insert joined ones; set what the next step feeds."""
        gone = [i for i, r in enumerate(self.rows) if r.finished]
        for i in gone:
            self._retire(self.rows[i], batch_row=i)
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        changed = bool(gone) or bool(joined)
        if gone:
            if self.solo or not keep:
                self.cache = None
            else:
                for layer in self.cache or []:
                    layer.filter(keep)
            self.rows = [self.rows[i] for i in keep]
        if joined:
            if self.solo:  # caches that cannot batch: the one row runs on its own
                assert not self.rows and len(joined) == 1
                self.cache = joined[0].cache
            else:
                if self.cache is None:
                    self.cache = make_batch_cache(joined[0].cache)
                assert self.cache is not None
                for r in joined:
                    for layer, c in zip(self.cache, r.cache, strict=True):
                        layer.insert(c)
            for r in joined:
                r.cache = None
            self.rows += joined
        if not self.rows:
            self.cache, self.pending, self.bias = None, None, None
            self.pending_inputs = None
            self.pacer, self.stretch = Pacer(), None  # the next batch measures afresh
            self.draft_batches, self.draft_tried = {}, set()
            return
        if self.stretch is not None and any(r.req.speculation is not None for r in joined):
            n, t0, e0, p0 = self.stretch  # a plain stretch runs: the new row looks soon
            self.stretch = (min(n, self.reads + Pacer.RETRY), t0, e0, p0)
        if changed:
            self.bias = _bias(self.rows)
        if nxt is not None:
            if gone:
                pos = {id(r): i for i, r in enumerate(nxt.rows)}
                idx = [pos[id(r)] for r in self.rows if id(r) in pos]
                nxt.inputs = mx.take(nxt.ids, mx.array(idx, dtype=mx.int32))
            if joined:
                first = mx.array([r.last for r in joined], dtype=mx.int32)
                nxt.inputs = mx.concatenate([nxt.inputs, first])
            self.pending = nxt
        else:
            self.pending = None
            self.pending_inputs = mx.array([r.last for r in self.rows], dtype=mx.int32)

    # -- speculation: every row verifies its own drafts in one pass --------------------------
    def _spec_rows(self) -> list[Row]:
        return [r for r in self.rows if r.req.speculation is not None and not r.finished]

    def _may_speculate(self) -> bool:
        """Whether the next step may verify drafts (then no plain step is queued ahead)."""
        return self.stretch is None and bool(self._spec_rows())

    def _speculating(self) -> bool:
        """Whether this step looks at the rows' drafts (and verifies them when they are
        worth it; see :meth:`_plan`): some row speculates and no plain stretch runs."""
        if self.stretch is not None:
            n, t0, e0, p0 = self.stretch
            if self.reads < n and self.rows:
                return False  # the stretch goes on, pipelined
            self.stretch = None
            seconds = time.perf_counter() - t0 - (self.prefill_s - p0)
            # The rows of its steps, on average: each step emitted a token per row.
            rows = (self.emitted - e0) / max(1, self.reads)
            self.pacer.record_plain(self.reads, seconds, rows)
        return bool(self._spec_rows())

    def _plain_stretch(self, n: int) -> None:
        """The next ``n`` steps decode plainly (pipelined), measured; a look at the rows'
        drafts after each read may end it sooner (see :meth:`_glance`)."""
        self.reads = 0
        self.stretch = (n, time.perf_counter(), self.emitted, self.prefill_s)

    def _glance(self) -> None:
        """During a plain stretch, after a read: when the rows' drafts (from the tokens
        read so far; one token is still in flight) look worth a verify step, the stretch
        ends after this step (the next step looks again with every token)."""
        if self.stretch is None or not self.reads or not self._spec_rows():
            return
        if self._plan(list(self.rows), commit=False)[0] > 1:
            n, t0, e0, p0 = self.stretch
            self.stretch = (self.reads, t0, e0, p0)

    def _speculate(self) -> None:
        """One verify step for the batch: every row feeds its newest token and its drafts
        (none: it rides along at one token) in one pass, drawn with plain decoding's keys;
        each row's cache is rewound past its first miss. Joining rows prefill as in a plain
        step. When no drafts are worth a verify step, a plain stretch starts instead."""
        if self.pending is not None:  # the plain step in flight: its tokens first
            step, self.pending = self.pending, None
            self._read(step)
        joined = self._prefill()
        self.flush()
        for r in joined:
            self._read_first(r)
        self._update_rows(None, [r for r in joined if not r.finished])
        if self.rows and not self._verify():
            self._plain_stretch(self._rest())
            self.pending = self._build(self.pending_inputs)
            return
        self.flush()
        self._update_rows(None, [])

    def _can_draft(self, spec: Speculation) -> bool:
        """Whether a draft model's row may draft again, now or later: while a draft model
        as fast as measured could pay, or for its first try (which measures its model)
        unless that model already drafted in this batch and measured too dear to pay."""
        tried = id(spec.drafter.model) in self.draft_tried
        return self.pacer.could_pay() or (spec.drafted == 0 and not tried)

    def _rest(self) -> int:
        """Plain steps before the next look: the pacer's, or fewer when a draft model's row
        may try again sooner, or a long stretch when no row can draft again (a look would
        only drain the pipeline; a row that joins shortens the stretch)."""
        pacer = self.pacer
        specs = [r.req.speculation for r in self._spec_rows() if r.req.speculation is not None]
        if not any(not isinstance(s.drafter, ModelDrafter) or self._can_draft(s) for s in specs):
            return pacer.IDLE
        n = pacer.plain_steps()
        if pacer.could_pay():
            for spec in specs:
                if isinstance(spec.drafter, ModelDrafter) and spec.retry_at > pacer.steps:
                    n = min(n, spec.retry_at - pacer.steps)
        return max(1, n)

    def _plan(self, rows: list[Row], commit: bool = True) -> tuple[int, list[int], list[list[int]]]:
        """The next step's width (1: plain) and, per row, how many drafts it verifies and
        prompt lookup's drafts (a draft model's rows draft once the plan is made), from
        each row's chances that its drafts hold and the pacer's measured step costs.

        A draft model's row that has never drafted tries one draft (its cost and its
        chances are measured only so), unless its draft model drafted here and was measured
        too dear to pay; one left out of a plan rests (64 steps, doubling) and tries one
        draft again after, if a draft model that fast could pay at all.
        ``commit``: False for a glance (nothing changes)."""
        pacer = self.pacer
        chances: list[list[float]] = []
        found: list[list[int]] = []
        kinds: list[int] = []
        model = [False] * len(rows)
        probe = [False] * len(rows)
        for i, r in enumerate(rows):
            spec = r.req.speculation
            room = min(r.req.max_tokens - len(r.req.generated) - 1, MAX_DRAFT)
            ch: list[float] = []
            drafts: list[int] = []
            kind = 0
            if spec is not None and not r.finished and room > 0:
                if isinstance(spec.drafter, ModelDrafter):
                    model[i] = True
                    if self._can_draft(spec) and (
                        spec.drafted == 0 or spec.retry_at <= pacer.steps
                    ):
                        if spec.backoff or spec.drafted == 0:  # a try: one draft
                            probe[i] = True
                            ch = [spec.rate()]
                        else:
                            ch = spec.chances(min(room, spec.k_max))
                else:
                    try:  # its drafter is the row's own: a failure fails the row alone
                        drafts, kind = spec.lookup(r.req.prompt_ids + r.req.generated)
                    except Exception as exc:
                        if commit:
                            self._fail(r, exc)
                        drafts = []
                    drafts = drafts[:room]
                    ch = spec.chances(len(drafts), kind)
            chances.append(ch)
            found.append(drafts)
            kinds.append(kind)
        without = [[] if m else c for m, c in zip(model, chances, strict=True)]
        w1, g1 = pacer.best(
            chances, drafting=any(m and c for m, c in zip(model, chances, strict=True))
        )
        w0, g0 = pacer.best(without)
        use_models = g1 > g0 and g1 >= pacer.MARGIN
        width = w1 if use_models else w0 if g0 >= pacer.MARGIN else 1
        if not use_models:
            chances = without
        if any(probe):  # tries are made whatever the plan: only they measure a draft model
            width = max(width, 2)
        ks = [min(len(c), width - 1) for c in chances]
        for i, p in enumerate(probe):
            if p:
                ks[i] = 1
        if commit:
            self.kinds = kinds
            for i, r in enumerate(rows):
                spec = r.req.speculation
                if model[i] and spec is not None and not ks[i] and spec.retry_at <= pacer.steps:
                    # Left out of the plan: it rests, longer each time.
                    spec.backoff = min(512, max(64, 2 * spec.backoff))
                    spec.retry_at = pacer.steps + spec.backoff
        return (width if any(ks) else 1), ks, found

    def _model_drafts(
        self, rows: list[Row], ks: list[int], out: list[list[int]]
    ) -> tuple[int, float]:
        """The draft models' drafts into ``out`` (``ks[i]`` for row i; the rows of one draft
        model draft together, see :class:`DraftBatch`); returns the batched draft steps and
        their seconds (a prompt's first prefill on the draft model not counted)."""
        by_model: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            spec = r.req.speculation
            if spec is not None and ks[i] and isinstance(spec.drafter, ModelDrafter):
                if not r.drafting and not r.finished:
                    try:  # its prompt, on the draft model's own cache
                        spec.start(r.req.prompt_ids)
                        r.drafting = True
                    except Exception as exc:
                        self._fail(r, exc)
                if r.drafting and not r.finished:
                    by_model.setdefault(id(spec.drafter.model), []).append(i)
        for key in [k for k in self.draft_batches if k not in by_model]:
            self.draft_batches.pop(key).propose([], [], [])  # its rows left: free the cache
        steps, t0 = 0, time.perf_counter()
        for key, idx in by_model.items():
            specs = [rows[i].req.speculation for i in idx]
            group = self.draft_batches.get(key)
            if group is None:
                group = self.draft_batches[key] = DraftBatch(specs[0].drafter.model)
            try:
                drafts = group.propose(
                    [s.drafter for s in specs],
                    [rows[i].req.prompt_ids + rows[i].req.generated for i in idx],
                    [ks[i] for i in idx],
                )
            except Exception as exc:  # the draft model failed: its rows fail, alone
                self.draft_batches.pop(key, None)
                for i in idx:
                    self._fail(rows[i], exc)
                continue
            steps += max(ks[i] for i in idx)
            self.draft_tried.add(key)
            for i, d in zip(idx, drafts, strict=True):
                out[i] = d[: ks[i]]
        return steps, time.perf_counter() - t0

    def _verify(self) -> bool:
        """Verify every row's drafts, as :meth:`_plan` says; False (nothing run) when no
        row has drafts worth a verify step."""
        rows = list(self.rows)
        if self.pacer.needs_plain():  # one verify step on priors, then plain ones measured
            return False
        width, ks, found = self._plan(rows)
        if width == 1:
            return False
        drafts = [f[:k] for f, k in zip(found, ks, strict=True)]
        steps, draft_s = self._model_drafts(rows, ks, drafts)
        vocab = self.runner.vocab_size
        drafts = [
            [] if r.finished else [t for t in d if 0 <= t < vocab]
            for r, d in zip(rows, drafts, strict=True)
        ]
        if not any(drafts):
            return False
        t1 = time.perf_counter()
        self.width = width = 1 + max(len(d) for d in drafts)
        inputs = mx.array(
            [[r.last, *d] + [0] * (width - 1 - len(d)) for r, d in zip(rows, drafts, strict=True)],
            dtype=mx.int32,
        )
        # The head runs only where a draw may come: each row's 1 + k_i positions.
        where, base = [], []
        for i, d in enumerate(drafts):
            base.append(len(where))
            where += [i * width + t for t in range(1 + len(d))]
        logits = self.runner.forward_at(inputs, self.cache, where)
        for r, d in zip(rows, drafts, strict=True):
            if r.req.speculation is not None and d:
                r.req.speculation.drafted += len(d)
        accepted = [0] * len(rows)
        if self._fused_draws(rows, drafts, logits, accepted) is None:
            self._draws(rows, drafts, logits, base, accepted)
        self.pacer.record_verify(width, time.perf_counter() - t1, steps, draft_s, len(rows))
        # Kept: each row's newest token and its accepted drafts; the token drawn last is
        # fed next.
        back = [width - 1 - a for a in accepted]
        rewind_rows(self.cache, back, self.solo)
        for i, r in enumerate(rows):
            r.cached += 1 + accepted[i]
            spec = r.req.speculation
            if spec is None or not drafts[i]:
                continue
            spec.accepted += accepted[i]
            spec.observe(len(drafts[i]), accepted[i], self.kinds[i])
            if isinstance(spec.drafter, ModelDrafter):
                if accepted[i]:
                    spec.backoff = 0
                elif spec.backoff or spec.drafted == len(drafts[i]):
                    # A try that kept nothing: the row rests, longer each time.
                    spec.backoff = min(512, max(64, 2 * spec.backoff))
                    spec.retry_at = self.pacer.steps + spec.backoff
        return True

    def _fused_draws(
        self, rows: list[Row], drafts: list[list[int]], logits: mx.array, accepted: list[int]
    ) -> int | None:
        """Every row's draws at all its 1 + k_i positions in one sampler call (one wait, not
        one per position); each row keeps its draws up to its first miss and its sampler
        advances by the draws kept, so every kept draw is keyed as in plain decoding.
        Returns the tokens pushed; None (nothing drawn) when a row needs its draws one at
        a time: processors, grammar, penalties (their state follows the tokens drawn), or
        a row failed before its draw."""
        if any(
            r.finished or r.req.processors or r.req.sync or r.req.window is not None for r in rows
        ):
            return None
        part: list[Row] = []
        opts = []
        for r, d in zip(rows, drafts, strict=True):
            first = r.req.sampler.next_options(r.req.logprobs)
            for t in range(1 + len(d)):
                o = copy.copy(first)
                o.counter = first.counter + t  # draw n + t, as plain decoding keys it
                part.append(r)
                opts.append(o)
        bias = self.bias if all(len(d) == 0 for d in drafts) else _bias(part)
        try:
            with mx.stream(self._stream()):
                ids, lp = sample_rows(logits, opts, bias=bias)
                mx.eval(ids, *([] if lp is None else vars(lp).values()))
        except ValueError:  # a row's options do not fit: the position by position path
            return None
        tokens, lps = ids.tolist(), _host(lp)
        emitted, at = 0, 0
        for i, (r, d) in enumerate(zip(rows, drafts, strict=True)):
            for t in range(1 + len(d)):
                j = at + t
                if t:  # the draw this position used
                    r.req.sampler.next_options(r.req.logprobs)
                one = None
                if lps is not None and r.req.logprobs is not None:
                    k = r.req.logprobs
                    one = LogProbs(lps[0][j], lps[1][j, :k], lps[2][j, :k])  # type: ignore[arg-type]
                emitted += 1
                self._push(r, tokens[j], one)
                if r.finished or t == len(d) or r.last != d[t]:
                    break
                accepted[i] += 1
            at += 1 + len(d)
        return emitted

    def _draws(
        self,
        rows: list[Row],
        drafts: list[list[int]],
        logits: mx.array,
        base: list[int],
        accepted: list[int],
    ) -> None:
        """The rows' draws position by position (each position's draws see the tokens
        before it: processors, grammar masks, penalty windows)."""
        alive = [i for i, r in enumerate(rows) if not r.finished]
        for t in range(1 + max(len(d) for d in drafts)):
            alive = [i for i in alive if t <= len(drafts[i])]
            if not alive:
                break
            part = rows if len(alive) == len(rows) else [rows[i] for i in alive]
            at = mx.take(logits, mx.array([base[i] + t for i in alive], dtype=mx.int32), 0)
            ids, lp = self._draw(part, at, bias=self.bias if part is rows else _bias(part))
            mx.eval(ids, *([] if lp is None else vars(lp).values()))
            tokens, lps = ids.tolist(), _host(lp)
            still = []
            for j, i in enumerate(alive):
                r = rows[i]
                if r.finished:  # failed in its draw
                    continue
                one = None
                if lps is not None and r.req.logprobs is not None:
                    k = r.req.logprobs
                    one = LogProbs(lps[0][j], lps[1][j, :k], lps[2][j, :k])  # type: ignore[arg-type]
                self._push(r, tokens[j], one)
                if r.finished or t == len(drafts[i]) or r.last != drafts[i][t]:
                    continue
                accepted[i] += 1
                still.append(i)
            alive = still

    # -- building a step ------------------------------------------------------------------
    def _stream(self) -> Any:
        return self.runner.stream()

    def _forward(self, inputs: mx.array) -> mx.array:
        """The batch's next-token logits (lazy) for ``inputs``, one token per row."""
        return self.runner.forward(inputs[:, None], self.cache)[:, -1, :]

    def _build(self, inputs: mx.array, ahead: bool = False) -> _Step:
        """The next decode step for every row (lazy, queued). ``ahead``: one token per row
        is still unread, so rows that end at it get a step that is thrown away, and their
        processors and masks are not asked for it."""
        return self._sample(list(self.rows), self._forward(inputs), ahead)

    def _sample(self, rows: list[Row], logits: mx.array, ahead: bool = False) -> _Step:
        """Draw every row's token from ``logits`` (lazy, queued); rows that have finished
        draw unmasked, thrown away."""
        ids, lp = self._draw(rows, logits, ahead, bias=self.bias)
        mx.async_eval(ids, *([] if lp is None else vars(lp).values()))
        for r in rows:
            r.cached += 1
        return _Step(rows, ids, lp)

    def _draw(
        self,
        rows: list[Row],
        logits: mx.array,
        ahead: bool = False,
        *,
        bias: tuple[mx.array, mx.array, mx.array] | None,
    ) -> tuple[mx.array, LogProbs | None]:
        """The rows' draws (lazy) from ``logits`` (one row each), every row with its own
        processors, mask, penalties, ``bias`` (the rows' own) and its next key."""
        with mx.stream(self._stream()):
            masks: list[mx.array | None] = []
            if any(r.req.processors or r.req.sync for r in rows):
                parts = []
                for i, r in enumerate(rows):
                    part, mask = logits[i : i + 1], None
                    if not r.finished and len(r.req.generated) + ahead < r.req.max_tokens:
                        try:  # its processors, mask and grammar are the row's own
                            part, mask = r.req.prepare(part)
                        except Exception as exc:
                            self._fail(r, exc)
                            part, mask = logits[i : i + 1], None
                    parts.append(part)
                    masks.append(mask)
                logits = mx.concatenate(parts)
            opts = [r.req.sampler.next_options(r.req.logprobs) for r in rows]
            mask = _masks(masks, logits.shape[-1]) if any(m is not None for m in masks) else None
            try:
                ids, lp = sample_rows(logits, opts, history=_history(rows), bias=bias, mask=mask)
            except ValueError:
                # A row's options do not fit (checked at submit; a request changed since):
                # fail those rows and draw the others; none found: the batch's own error.
                bad = self._fail_unfit(rows, logits.shape[-1])
                if not bad:
                    raise
                plain = Sampler(SamplingParams(seed=0))  # their draws are thrown away
                opts = [plain.next_options() if i in bad else o for i, o in enumerate(opts)]
                ids, lp = sample_rows(
                    logits, opts, history=_history(rows), bias=_bias(rows, bad), mask=mask
                )
            for i, r in enumerate(rows):
                if r.req.window is not None or r.req.processors:
                    r.req.advance(ids[i : i + 1])
        return ids, lp

    # -- prefill --------------------------------------------------------------------------
    def _prefill(self) -> list[Row]:
        """Up to ``prefill_chunk`` prompt tokens of joining requests (with nothing decoding,
        at least the first request's whole prompt); returns those whose prefill ended
        (their first token queued)."""
        t0 = time.perf_counter()
        try:
            return self._prefill_chunk()
        finally:
            self.prefill_s += time.perf_counter() - t0

    def _prefill_chunk(self) -> list[Row]:
        joined: list[Row] = []
        budget = self.s.prefill_chunk
        whole = not self.rows
        while self.prefilling and (budget > 0 or (whole and not joined)):
            # With nothing decoding, the first prompt runs whole (no one waits on it).
            r = self.prefilling[0]
            if r.handle.cancelled or self.s.closing.is_set():
                r.finished = True
                r.req.finish = "cancelled"
            else:
                try:  # its own cache and first draw: a failure here is the row's alone
                    budget -= self._prefill_one(r, budget, whole)
                except Exception as exc:
                    self._fail(r, exc)
            if r.finished:
                self.prefilling.popleft()
                self._retire(r)
            elif r.joining:
                self.prefilling.popleft()
                joined.append(r)
        return joined

    def _prefill_one(self, r: Row, budget: int, whole: bool) -> int:
        """One chunk of ``r``'s prompt, or its last token and first draw (queued: then
        ``r.first`` is set); returns the prompt tokens it ran."""
        if r.cache is None:
            if not self.rows:  # a request's peak memory, unless others are decoding
                mx.reset_peak_memory()
            take = r.req.take_cache or self.runner.take  # a tool loop's own cache first
            r.cache, r.done = take(r.prompt)
            r.req.cached_tokens = r.done
        prompt = r.prompt
        left = len(prompt) - r.done
        if left > 1:
            n = min(left - 1, self.runner.prefill_step_size)
            if not whole:
                n = min(n, budget)
            chunk = mx.array(prompt[r.done : r.done + n], dtype=mx.int32)
            self.runner.forward(chunk[None], r.cache)
            r.done += n
            if r.req.progress is not None:  # the caller shows it: the chunk has run
                mx.eval([c.state for c in r.cache])
                r.req.progress(r.done, len(prompt))
            else:
                mx.async_eval([c.state for c in r.cache])
            return n
        r.joining = True
        if r.req.speculation is not None:
            # A speculative request feeds its prompt's last token in its first step (a
            # verify step guesses its first token too).
            r.last, r.cached = prompt[-1], r.done
            return 0
        last = mx.array(prompt[r.done :], dtype=mx.int32)
        logits = self.runner.forward(last[None], r.cache)[:, -1, :]
        with mx.stream(self._stream()):
            first = r.req.sample(logits)
        mx.async_eval(first[0], *([] if first[1] is None else vars(first[1]).values()))
        r.first = first
        r.done = r.cached = len(prompt)
        return 1

    # -- reading tokens -------------------------------------------------------------------
    def _read(self, step: _Step) -> None:
        tokens = step.ids.tolist()
        self.reads += 1
        lps = _host(step.lp)
        for i, r in enumerate(step.rows):
            if r.finished:
                continue  # left the batch after this step was built
            lp = None
            if lps is not None and r.req.logprobs is not None:
                k = r.req.logprobs
                lp = LogProbs(lps[0][i], lps[1][i, :k], lps[2][i, :k])  # type: ignore[arg-type]
            self._push(r, tokens[i], lp)

    def _read_first(self, r: Row) -> None:
        if r.first is None:  # it draws its first token in its first step
            return
        ids, lp = r.first
        r.first = None
        try:  # evaluates the row's own prefill and draw
            token = int(ids.item())
        except Exception as exc:
            self._fail(r, exc)
        else:
            self._push(r, token, lp)
        if r.finished:
            self._retire(r)

    def _push(self, r: Row, token: int, lp: LogProbs | None) -> None:
        r.last = token
        self.emitted += 1
        try:
            for event in r.req.push(token, lp):
                r.handle._emit(event)
        except Exception as exc:  # this request's failure (say, NaN logits): it alone ends
            self._fail(r, exc)
            return
        if r.req.finish is not None:
            r.finished = True

    def _fail(self, r: Row, exc: BaseException) -> None:
        """End ``r`` with its own error (it leaves at the next retirement); the other rows
        go on untouched."""
        if not isinstance(exc, ValueError):  # the caller's mistakes are ValueErrors
            logger.error("a request failed alone", exc_info=exc)
        else:
            logger.info("a request failed alone: %s", exc)
        r.finished = True
        if r.handle.error is None:
            r.handle.error = exc

    def _fail_unfit(self, rows: Sequence[Row], vocab: int) -> set[int]:
        """Fail the rows whose sampler options do not fit ``vocab``; their indices."""
        bad = set()
        for i, r in enumerate(rows):
            try:
                r.req.sampler.check(vocab, r.req.logprobs)
            except ValueError as exc:
                self._fail(r, exc)
                bad.add(i)
        return bad

    # -- leaving --------------------------------------------------------------------------
    def _retire(self, r: Row, batch_row: int | None = None) -> None:
        """End ``r``: keep its cache for prefix reuse, send its last events."""
        failed = r.handle.error
        if failed is None and self.runner.reuse_cache:
            if batch_row is None:  # never joined: its own cache holds the prompt so far
                tokens, cache = r.prompt[: r.done], r.cache
            else:
                tokens = (r.req.prompt_ids + r.req.generated)[: r.cached]
                cache = self.cache if self.solo else [c.extract(batch_row) for c in self.cache]
            if cache is not None and tokens:
                mx.async_eval([c.state for c in cache])
                hold = r.req.hold_cache  # a tool loop keeps it for the reply's continuation
                if hold is None or not hold(tokens, cache):
                    # reset_cache() right after the reply must still forget this one
                    self.to_store.append((tokens, cache, self.runner.prefix_cache.clears))
        r.cache = None
        self.s._left(1)
        if failed is not None:
            r.handle._emit(failed)
        else:
            for event in r.req.close(peak_memory=int(mx.get_peak_memory())):
                r.handle._emit(event)
        r.handle._emit(END)

    def refuse(self, r: Row, error: BaseException | None) -> None:
        """End a request that never ran: cancelled, or refused (``error``)."""
        if error is not None:
            r.handle._emit(error)
        else:
            r.req.finish = "cancelled"
            for event in r.req.close():
                r.handle._emit(event)
        r.handle._emit(END)

    def flush(self) -> None:
        """Hand finished rows' caches to the prefix cache (evaluated first: another thread
        may take them)."""
        if not self.to_store:
            return
        mx.eval([c.state for _, cache, _ in self.to_store for c in cache])
        for tokens, cache, clears in self.to_store:
            self.runner.keep(tokens, cache, clears)
        self.to_store.clear()

    def fail_all(self, exc: Exception) -> None:
        for r in self.members():
            if not r.handle.done:
                r.finished = True
                r.handle.error = exc
                r.cache = None
                self.s._left(1)
                r.handle._emit(exc)
                r.handle._emit(END)
        self.rows, self.prefilling = [], deque()
        self.cache, self.pending, self.bias = None, None, None
        self.to_store.clear()


def _history(rows: Sequence[Row]) -> mx.array | None:
    """Every row's penalty window, right-aligned and padded with -1 (None if no row has one)."""
    windows = [r.req.window for r in rows]
    if all(w is None for w in windows):
        return None
    width = max(w.shape[1] for w in windows if w is not None)
    out = []
    for w in windows:
        if w is None:
            out.append(mx.full((1, width), -1, dtype=mx.int32))
        elif w.shape[1] < width:
            out.append(mx.pad(w, [(0, 0), (width - w.shape[1], 0)], constant_values=-1))
        else:
            out.append(w)
    return mx.concatenate(out)


def _bias(
    rows: Sequence[Row], skip: Collection[int] = ()
) -> tuple[mx.array, mx.array, mx.array] | None:
    """Every row's logit bias concatenated, with row offsets (None if no row has one);
    rows in ``skip`` have none."""
    pairs = [(None, None) if i in skip else r.req.sampler.bias for i, r in enumerate(rows)]
    if all(ids is None for ids, _ in pairs):
        return None
    ids_, values, offsets = [], [], [0]
    for ids, vals in pairs:
        if ids is not None:
            ids_.append(ids)
            values.append(vals)
        offsets.append(offsets[-1] + (0 if ids is None else ids.size))
    return (
        mx.concatenate(ids_),
        mx.concatenate(values),
        mx.array(offsets, dtype=mx.int32),
    )


def _masks(masks: Sequence[mx.array | None], vocab: int) -> mx.array:
    """Rows' packed masks, all-allowed for rows without one."""
    words = (vocab + 31) // 32
    full = mx.full((1, words), 0xFFFFFFFF, dtype=mx.uint32)
    return mx.concatenate([m.reshape(1, -1) if m is not None else full for m in masks])


def _host(lp: LogProbs | None) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if lp is None:
        return None
    return np.array(lp.logprob), np.array(lp.top_ids), np.array(lp.top_logprobs)


def _shutting_down() -> CapacityError:
    return CapacityError(
        "the server is shutting down; retry on another instance",
        code="shutting_down",
        retry_after=5,
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f}"


def available_memory() -> int:
    """Bytes of memory available now (Linux: MemAvailable; else the physical total)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30
