"""Rank 0's batch in a distributed group: the scheduler's own batch steps, sent to the
followers as they are taken.

A :class:`GroupBatch` runs the batch as one process does (admissions, prefill chunks,
joins, leaves, cancellations, prefix reuse, plain and verify steps, the :class:`Pacer`)
with two differences. Every operation on the caches is recorded as it happens (see
:class:`~.distributed.Follower` for the list) and the step's operations go to the followers
in one message, before any of the step's forward passes is evaluated (they hold the
collectives every rank must run in the same order); the forward passes are then evaluated
in the order they were recorded, as the followers do. And steps are not pipelined: rank 0
reads each step's tokens before it builds the next, since the tokens travel in the next
step's message.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx

from .distributed import greedy_step, sharded_head
from .errors import GroupError
from .scheduler import END, Batch, Row, Scheduler
from .speculative import Pacer

logger = logging.getLogger(__name__)

__all__ = ["GroupBatch"]


class _LeaderRunner:
    """The model runner as rank 0's verify step sees it: the step's message goes out
    before the verify pass is built."""

    def __init__(self, runner: Any, batch: GroupBatch) -> None:
        self._runner, self._batch = runner, batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def forward_at(self, inputs: mx.array, cache: Any, where: Any) -> mx.array:
        b = self._batch
        b.width = int(inputs.shape[1])
        b.record("verify", inputs.tolist(), [int(i) for i in where])
        b.send()
        logits = self._runner.forward_at(inputs, cache, where)
        mx.async_eval(logits)  # evaluated whatever the draws need: the followers do
        return logits


class GroupBatch(Batch):
    """The scheduler's batch on rank 0 of a group (see the module's docstring)."""

    def __init__(self, sched: Scheduler) -> None:
        super().__init__(sched)
        group = sched.runner.group
        assert group is not None and group.leader
        self.g = group
        self.real = sched.runner
        self.runner = _LeaderRunner(sched.runner, self)  # type: ignore[assignment]
        self.ops: list[list[Any]] = []  # since the last message
        # This step's forward passes (outputs, row whose prefill progress to report, tokens
        # done), evaluated in order once the message is out.
        self.lazy: list[tuple[Any, Row | None, int]] = []
        self.firsts: list[tuple[Row, mx.array]] = []  # rows to draw a first token for
        self.joined: list[Row] = []  # prefilled this step, joining at its end
        self.sent = False
        self.width = 0  # the last verify step's tokens per row
        self.watching = False
        self.rids: dict[int, int] = {}  # id(row) -> its id in the messages
        self.next_rid = 0
        self.clears = self.real.prefix_cache.clears
        self.head = sharded_head(self.real.model)  # None: logits always gathered
        self.greedy = False  # the step being built draws greedily on every rank

    # -- messages ---------------------------------------------------------------------------
    def record(self, *op: Any) -> None:
        self.ops.append(list(op))

    def send(self, idle: bool = False) -> None:
        """The step's one message, then its recorded forward passes, evaluated in order."""
        ops, self.ops = self.ops, []
        self.g.steps += 1
        message: dict[str, Any] = {"ops": ops}
        if idle:
            message["idle"] = True
        with mx.stream(self._stream()):
            self.g.send(message, self.g.steps)
            lazy, self.lazy = self.lazy, []
            for out, r, done in lazy:
                mx.eval(out)
                self.g.progress()
                if r is not None and r.req.progress is not None:
                    r.req.progress(done, len(r.prompt))
        self.sent = True

    def _sync_clears(self) -> None:
        """A prefix cache cleared on rank 0 (engine.reset_cache) is cleared everywhere."""
        clears = self.real.prefix_cache.clears
        if clears != self.clears:
            self.clears = clears
            self.record("clear")

    # -- one step -------------------------------------------------------------------------
    def iteration(self) -> None:
        if not self.watching:
            self.watching = True
            self.g.begin()
            self.g.set_stall_handler(self._stalled)
        self.sent = False
        self.flush()
        speculate = bool(self.rows) and self._speculating()
        joined = self.joined = self._prefill()
        if self.rows and not (speculate and self._verify_step()):
            if speculate:  # nothing to guess in any row: a few plain steps (measured)
                self._plain_stretch(Pacer.MEASURE)
            self._read(self._build(mx.array([r.last for r in self.rows], dtype=mx.int32)))
        if not self.sent:  # a step of prefill alone
            self.send()
        self.g.progress()
        for r, logits in self.firsts:
            try:  # drawn once the message is out: a processor may read the logits
                with mx.stream(self._stream()):
                    r.first = r.req.sample(logits)
            except Exception as exc:
                self._fail(r, exc)
        self.firsts = []
        for r in joined:
            if r.first is None and r.finished:  # its first draw failed
                self._retire(r)
            self._read_first(r)
        self._update_rows(None, [r for r in joined if not r.finished])
        self.joined = []

    def members(self) -> list[Row]:
        return [*super().members(), *self.joined]

    def _verify_step(self) -> bool:
        """A verify step (base :meth:`_verify`); the rows' rewinds go in the next message."""
        rows = list(self.rows)
        before = [r.cached for r in rows]
        if not self._verify():
            return False
        self.record(
            "rewind", [self.width - (r.cached - b) for r, b in zip(rows, before, strict=True)]
        )
        return True

    def _build(self, inputs: mx.array, ahead: bool = False) -> Any:
        # Rows that all draw greedily with nothing to change their logits need only each
        # rank's best logit per row, not the gathered logits (a vocabulary per row).
        self.greedy = self.head is not None and all(_plain_greedy(r) for r in self.rows)
        return super()._build(inputs, ahead)

    def _forward(self, inputs: mx.array) -> mx.array:
        if self.greedy:
            self.record("decode", inputs.tolist(), True)
            self.send()
            ids = greedy_step(self.real, inputs[:, None], self.cache)
        else:
            self.record("decode", inputs.tolist())
            self.send()
            ids = super()._forward(inputs)  # the logits
        mx.async_eval(ids)
        return ids

    def _draw(
        self, rows: list[Row], logits: mx.array, ahead: bool = False, *, bias: Any
    ) -> tuple[mx.array, Any]:
        if not self.greedy:
            return super()._draw(rows, logits, ahead, bias=bias)
        for r in rows:  # a draw each, as the sampler counts them
            r.req.sampler.next_options()
        return logits, None  # the ids greedy_step drew

    # -- prefill: planned on the host, run once the message is out -------------------------
    def _prefill_one(self, r: Row, budget: int, whole: bool) -> int:
        if r.cache is None:
            if not self.rows:  # a request's peak memory, unless others are decoding
                mx.reset_peak_memory()
            self._take(r)
        assert r.cache is not None
        prompt = r.prompt
        rid = self.rids[id(r)]
        left = len(prompt) - r.done
        if left > 1:
            n = min(left - 1, self.real.prefill_step_size)
            if not whole:
                n = min(n, budget)
            self.record("chunk", rid, n)
            chunk = mx.array(prompt[r.done : r.done + n], dtype=mx.int32)
            self.real.forward(chunk[None], r.cache)
            r.done += n
            self.lazy.append(([c.state for c in r.cache], r, r.done))
            return n
        r.joining = True
        if r.req.speculation is not None:
            # A speculative request feeds its prompt's last token in its first step.
            r.last, r.cached = prompt[-1], r.done
            return 0
        last = mx.array(prompt[r.done :], dtype=mx.int32)
        if self.head is not None and _plain_greedy(r):  # its best logit is all it needs
            self.record("first", rid, True)
            ids = greedy_step(self.real, last[None], r.cache)
            r.req.sampler.next_options()  # a draw, as the sampler counts them
            r.first = (ids, None)
            self.lazy.append((ids, None, 0))
        else:
            self.record("first", rid)
            logits = self.real.forward(last[None], r.cache)[:, -1, :]
            self.lazy.append((logits, None, 0))
            self.firsts.append((r, logits))
        r.done = r.cached = len(prompt)
        return 1

    def _take(self, r: Row) -> None:
        """The longest cached prefix of ``r``'s prompt (the tool loop's own cache and the
        prompt cache on disk are rank 0's alone: not used in a group)."""
        self._sync_clears()
        cache, n = self.real.prefix_cache.take(r.prompt)
        if cache is None:
            cache, n = self.real.new_cache(), 0
        r.cache, r.done = cache, n
        r.req.cached_tokens = n
        rid = self.rids[id(r)] = self.next_rid
        self.next_rid += 1
        self.record("take", rid, list(r.prompt), n)

    # -- leaving and joining ----------------------------------------------------------------
    def _retire(self, r: Row, batch_row: int | None = None) -> None:
        rid = self.rids.pop(id(r), None)
        r.req.hold_cache = None  # a tool loop's held cache would be rank 0's alone
        self._sync_clears()  # a clear before this retire reaches the followers before it
        n = len(self.to_store)
        super()._retire(r, batch_row)
        if len(self.to_store) > n:  # tagged with the clears the followers know of
            tokens, cache, _ = self.to_store[-1]
            self.to_store[-1] = (tokens, cache, self.clears)
        if rid is not None:
            stored = len(self.to_store) > n
            count = len(self.to_store[-1][0]) if stored else 0
            self.record("retire", rid, batch_row, stored, count)

    def _update_rows(self, nxt: Any, joined: list[Row]) -> None:
        keep = [i for i, r in enumerate(self.rows) if not r.finished]
        gone = len(keep) < len(self.rows)
        super()._update_rows(nxt, joined)
        if gone:
            self.record("filter", keep)
        if joined:
            self.record("join", [self.rids[id(r)] for r in joined])

    def flush(self) -> None:
        """Finished rows' caches into the prefix cache (each rank's, alike); with the batch
        empty, the operations left go out and the group is idle."""
        if self.to_store:
            mx.eval([c.state for _, cache, _ in self.to_store for c in cache])
            for tokens, cache, clears in self.to_store:
                self._sync_clears()
                if clears != self.clears:  # cleared since: the followers drop it too
                    continue
                self.real.prefix_cache.put(tokens, cache)  # not the disk's: rank 0's alone
                self.record("store", len(self.real.prefix_cache))
            self.to_store.clear()
        if self.empty() and self.watching:
            self.send(idle=True)
            self.watching = False
            self.g.set_stall_handler(None)
            self.g.finish()

    # -- failures ---------------------------------------------------------------------------
    def fail_all(self, exc: Exception) -> None:
        """The followers can no longer be known to mirror this batch: the group is lost."""
        error = exc if isinstance(exc, GroupError) else self.g.lost(exc)
        super().fail_all(error)
        self.ops, self.lazy, self.firsts, self.joined = [], [], [], []
        self.rids.clear()
        self.watching = False
        self.g.set_stall_handler(None)
        self.g.finish()

    def _stalled(self, error: BaseException) -> None:
        """The group stalled (the watchdog's thread): every request ends now."""
        with self.s._lock:
            waiting = list(self.s._waiting)
        for r in [*self.members(), *waiting]:
            r.handle._emit(error)
            r.handle._emit(END)


def _plain_greedy(r: Row) -> bool:
    """Whether ``r`` draws greedily from the raw logits (no processors, masks, penalties,
    bias or logprobs): then its draw is the first id of the highest logit."""
    req = r.req
    return (
        req.sampler.params.temperature == 0
        and not req.processors
        and not req.sync
        and req.window is None
        and req.sampler.bias[0] is None
        and req.logprobs is None
    )
