"""The process's long-lived worker threads: MLX work never runs on a thread that exits.

A thread that has run MLX work must outlive the interpreter's shutdown: on Linux with MLX
0.32 such a thread exiting first aborts the process at exit ("terminate called without an
active exception"), and so does one still inside MLX when the interpreter finalizes. So
the work runs on two daemon threads that are never stopped, and at exit the work is
stopped and waited for before the interpreter goes: ``generation`` (the model: every
engine, scheduler and server shares it, as they share the device) and ``preparation``
(rendering and tokenizing requests off the event loop and off the generation thread).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_at_exit: list[Callable[[], None]] = []


class _Worker:
    """One daemon thread running queued functions in order, started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: queue.Queue[Callable[[], None]] = queue.Queue()
        self._lock = threading.Lock()
        self._started = False
        self._idle = threading.Event()
        self._idle.set()

    def put(self, fn: Callable[[], None]) -> None:
        with self._lock:
            if not self._started:
                self._started = True
                threading.Thread(target=self._main, name=self.name, daemon=True).start()
            self._idle.clear()
            self._tasks.put(fn)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run ``fn`` there; its result (or exception) in the returned future."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def task() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        self.put(task)
        return future

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def _main(self) -> None:
        while True:
            task = self._tasks.get()
            try:
                task()
            except BaseException:  # a task must not end the thread
                import logging

                logging.getLogger(__name__).exception("task on %s failed", self.name)
            finally:
                with self._lock:
                    if self._tasks.empty():
                        self._idle.set()


generation = _Worker("mhc-generation")
preparation = _Worker("mhc-prepare")
# Further generation threads by name (one per model a server holds): made once, never stopped.
_named: dict[str, _Worker] = {generation.name: generation}
_named_lock = threading.Lock()


def worker(name: str) -> _Worker:
    """The long-lived worker thread called ``name`` (made on first use, then the same one:
    a model unloaded and loaded again reuses its thread; threads that ran MLX work never
    exit before the interpreter)."""
    with _named_lock:
        w = _named.get(name)
        if w is None:
            w = _named[name] = _Worker(name)
        return w


def on_generation_thread(fn: Callable[[], None]) -> None:
    """Run ``fn`` on the generation thread, after whatever was queued before it."""
    generation.put(fn)


def prepare(fn: Callable[[], T]) -> concurrent.futures.Future[T]:
    """Run ``fn`` on the preparation thread (for rendering requests)."""
    return preparation.call(fn)


def stop_at_exit(fn: Callable[[], None]) -> None:
    """Call ``fn`` at interpreter exit, before waiting for the worker threads to park."""
    _at_exit.append(fn)


def _drain(*_: Any) -> None:
    for stop in _at_exit:
        stop()
    with _named_lock:
        workers = list(_named.values())
    for w in workers:
        w.wait_idle(30)
    preparation.wait_idle(5)


atexit.register(_drain)
