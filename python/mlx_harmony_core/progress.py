"""Progress of long work (loading, converting, writing test models, long prefills).

:class:`ProgressBar` is a tqdm bar when stderr is a terminal, else a log line every 10%
(logger ``mlx_harmony_core.progress``, INFO), and nothing at all when quiet
(``--quiet``: :func:`set_quiet`). :func:`log_only` makes every bar log lines (the server:
its output is a log, never a terminal's bar).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

logger = logging.getLogger(__name__)

# Work on less than this many bytes (loading a small model) shows no progress.
BIG_FILE = 256 * 2**20

_state = {"quiet": False, "log_only": False}


def set_quiet(quiet: bool = True) -> None:
    """No bars and no progress lines (``--quiet``)."""
    _state["quiet"] = quiet


def log_only(on: bool = True) -> None:
    """Progress as log lines (INFO, shown) even on a terminal (``serve``)."""
    _state["log_only"] = on
    if on:
        logger.setLevel(logging.INFO)


def is_quiet() -> bool:
    """Whether progress is turned off."""
    return _state["quiet"]


def on_terminal() -> bool:
    """Whether a bar would be drawn (stderr is a terminal, not quiet, not log-only)."""
    return (
        not _state["quiet"]
        and not _state["log_only"]
        and sys.stderr is not None
        and sys.stderr.isatty()
    )


class ProgressBar:
    """Progress of ``total`` units (``unit``: "B" for bytes, "tok", ...) of work ``what``.

    Work under ``min_total`` units shows nothing. ``update(n)`` adds ``n`` done;
    ``close()`` ends the bar (it disappears: ``leave=False``).
    """

    def __init__(self, total: int, what: str, *, unit: str = "B", min_total: int = 0) -> None:
        self.total, self.what, self.unit = total, what, unit
        self.done, self.logged, self.bar = 0, 0, None
        if total < max(min_total, 1) or _state["quiet"]:
            self.total = 0
        elif on_terminal():
            try:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=total,
                    desc=what,
                    unit=unit,
                    unit_scale=unit == "B",
                    leave=False,
                    delay=0.5,
                )
            except ImportError:  # pragma: no cover - a declared dependency
                pass

    def update(self, n: int) -> None:
        """``n`` more units done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done * 10 // self.total > self.logged:
            self.logged = min(10, self.done * 10 // self.total)
            logger.info("%s: %d%% (%s of %s)", self.what, self.logged * 10, *self._amounts())

    def _amounts(self) -> tuple[str, str]:
        if self.unit == "B":
            return f"{self.done / 1e9:.1f}", f"{self.total / 1e9:.1f} GB"
        return str(self.done), f"{self.total} {self.unit}"

    def close(self) -> None:
        """End the bar."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
