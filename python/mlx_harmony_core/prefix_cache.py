"""An LRU of KV caches keyed by the tokens they hold, bounded in bytes and entries."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    tokens: list[int]
    cache: list[Any]
    nbytes: int


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes held by a per-layer cache list (our caches report capacity; others their state)."""
    total = 0
    for c in cache:
        n = getattr(c, "nbytes", None)
        if n is None:
            n = sum(getattr(a, "nbytes", 0) for a in (c.state if hasattr(c, "state") else []))
        total += int(n)
    return total


def _common(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix; slice comparisons (C speed) halve the range each time."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    """Caches of earlier requests, found again by the longest common token prefix.

    :meth:`take` hands out a cache rewound to the shared prefix: the entry itself when the
    new prompt extends it (it is superseded), else a copy-on-write copy so the entry stays
    for other conversations. :meth:`put` stores a finished request's cache, drops entries
    it extends, and evicts least recently used ones beyond ``max_bytes`` / ``max_entries``.
    Thread-safe: the single-request loop and the batching scheduler share it.
    """

    def __init__(self, max_bytes: int | None = None, max_entries: int = 1) -> None:
        if max_entries < 0 or (max_bytes is not None and max_bytes < 0):
            raise ValueError("max_entries and max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: list[_Entry] = []  # least recently used first
        self._lock = threading.RLock()
        self.clears = 0  # times cleared (a distributed group's ranks clear together)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.clears += 1

    def keep_newest(self, n: int) -> None:
        """Evict the least recently used entries beyond ``n`` (a distributed group's
        followers evict as rank 0 did)."""
        with self._lock:
            del self._entries[: max(0, len(self._entries) - n)]

    def take(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        """A cache holding the longest reusable prefix of ``prompt`` (at least one prompt
        token is left to run), and that prefix's length; ``(None, 0)`` if none."""
        with self._lock:
            return self._take(prompt)

    def longest(self, prompt: Sequence[int]) -> int:
        """How many tokens of ``prompt`` :meth:`take` would reuse (nothing is taken)."""
        with self._lock:
            return self._best(prompt)[1]

    def _best(self, prompt: Sequence[int]) -> tuple[_Entry | None, int]:
        prompt = prompt if isinstance(prompt, list) else list(prompt)  # entries hold lists
        best, best_n = None, 0
        for e in self._entries:
            n = min(_common(e.tokens, prompt), len(prompt) - 1)
            if n > best_n and _can_rewind(e, n):
                best, best_n = e, n
        return best, best_n

    def _take(self, prompt: Sequence[int]) -> tuple[list[Any] | None, int]:
        best, best_n = self._best(prompt)
        if best is None:
            return None, 0
        self._entries.remove(best)
        if best_n < len(best.tokens) and self.max_entries > 1 and _copyable(best.cache):
            self._entries.append(best)  # still useful to others: hand out a copy
            cache = [c.copy() for c in best.cache]
        else:
            cache = best.cache
        extra = len(best.tokens) - best_n
        if extra:
            for c in cache:
                c.trim(extra)
        return cache, best_n

    def put(self, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep ``cache`` (holding ``tokens``) as the most recently used entry."""
        with self._lock:
            self._put(tokens, cache)

    def _put(self, tokens: Sequence[int], cache: list[Any]) -> None:
        if self.max_entries == 0 or not tokens:
            return
        tokens = list(tokens)
        if any(
            getattr(c, "offset", len(tokens)) != len(tokens)
            for c in cache
            if hasattr(c, "trimmable")
        ):
            return  # the cache does not hold what we think: never reuse it
        self._entries = [
            e
            for e in self._entries
            if not (len(e.tokens) <= len(tokens) and tokens[: len(e.tokens)] == e.tokens)
        ]
        self._entries.append(_Entry(tokens, cache, cache_nbytes(cache)))
        while len(self._entries) > self.max_entries or (
            self.max_bytes is not None and self.nbytes > self.max_bytes and len(self._entries) > 0
        ):
            gone = self._entries.pop(0)
            logger.debug(
                "prefix cache: evicted %d tokens (%d bytes)", len(gone.tokens), gone.nbytes
            )


def _can_rewind(entry: _Entry, keep: int) -> bool:
    extra = len(entry.tokens) - keep
    return all(hasattr(c, "trimmable") and c.trimmable() >= extra for c in entry.cache)


def _copyable(cache: Sequence[Any]) -> bool:
    return all(hasattr(c, "copy") for c in cache)
