"""Error types: front ends map them to what the user sees (an HTTP status, a CLI message).

Every request error is a ``ValueError`` (or ``TypeError``), so ``except ValueError`` keeps
working; :class:`CapacityError` (busy, not wrong) is a ``RuntimeError``.
Anything else that escapes the engine is a bug on our side, never the caller's fault.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """The request itself is wrong (a bad message, parameter or prompt): the caller can fix it.

    ``param`` names the offending field when there is one (the server reports it).
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestTypeError(InvalidRequestError, TypeError):
    """A request argument of the wrong type."""


class ContextLengthError(InvalidRequestError):
    """The prompt (plus room for the reply) does not fit the model's context window."""


class ModelLoadError(ValueError):
    """A model directory is missing, malformed or not supported."""


class CapacityError(RuntimeError):
    """The engine cannot take the request now (queue full, KV memory budget, shutting
    down): not the caller's fault; retry later or elsewhere. ``code`` says which
    (``queue_full``, ``kv_budget``, ``shutting_down``), ``retry_after`` in seconds."""

    def __init__(self, message: str, *, code: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class GroupError(CapacityError):
    """A distributed group lost a rank: no request can run until every rank restarts."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="group_lost", retry_after=30)
