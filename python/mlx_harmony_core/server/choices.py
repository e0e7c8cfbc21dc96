"""Several choices (``n`` > 1) for one HTTP request: ``n`` engine requests, decoded as rows
of the scheduler's batch, whose events reach one sink tagged with their choice's index.

:class:`Choices` stands in for the :class:`~.client.EngineClient` that
:func:`~.serving.respond` submits to: ``build`` returns a list of requests (one per choice),
``submit`` queues them all; the sink receives :class:`Choice` items, the first exception
(the other choices are then cancelled) and one :data:`~.client.END` after every choice ended.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..params import SEED_LIMIT, SamplingParams
from .client import END, Cancellable, EngineClient, Sink


@dataclass(frozen=True)
class Choice:
    """One engine event of choice ``index``."""

    index: int
    event: Any


def seeded(params: SamplingParams, i: int) -> SamplingParams:
    """``params`` for choice ``i``: seed ``seed + i`` (unseeded choices stay unseeded, and
    so draw independently)."""
    if i == 0 or params.seed is None:
        return params
    return params.model_copy(update={"seed": (params.seed + i) % SEED_LIMIT})


class _Group:
    """The submitted requests of one HTTP request: cancelled together."""

    def __init__(self) -> None:
        self.handles: list[Cancellable] = []

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


class Choices:
    """Submits a list of requests through ``client`` as the choices of one answer."""

    def __init__(self, client: EngineClient) -> None:
        self.client = client

    def submit(self, requests: Sequence[Any], sink: Sink) -> Cancellable:
        """Queue every request; a full queue (raised by the client) cancels those queued."""
        group = _Group()
        lock = threading.Lock()
        state = {"left": len(requests), "failed": False}

        def sink_for(index: int) -> Sink:
            def receive(item: Any) -> None:
                if item is END:
                    with lock:
                        state["left"] -= 1
                        last = state["left"] == 0
                    if last:
                        sink(END)
                elif isinstance(item, Exception):
                    with lock:
                        first, state["failed"] = not state["failed"], True
                    if first:
                        sink(item)
                        group.cancel()
                else:
                    sink(Choice(index, item))

            return receive

        try:
            for i, request in enumerate(requests):
                group.handles.append(self.client.submit(request, sink_for(i)))
        except BaseException:
            group.cancel()
            raise
        return group
