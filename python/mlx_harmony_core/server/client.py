"""The engine as the server sees it: :class:`EngineClient`, and :class:`LocalClient`, which
serves it from an :class:`~mlx_harmony_core.engine.Engine` in this process.

The server never sees the scheduler: it builds a request (rendered and checked), submits it
with a sink, and reads the events the sink receives. Anything with these members can be
served (a test double, a client of a remote engine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from ..scheduler import END
from .options import ServerOptions

__all__ = ["END", "Cancellable", "EngineClient", "LocalClient", "Sink"]

# Receives a request's StreamEvents from any thread, then an exception if it failed, then END.
Sink = Callable[[Any], None]


class Cancellable(Protocol):
    """A submitted request: ``cancel()`` ends it at its next token."""

    def cancel(self) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    """What the server needs from an engine.

    ``request`` and ``encode`` may be slow (rendering, tokenizing): the server calls them
    off the event loop. ``submit`` returns at once; the request's events then reach
    ``sink`` (each a :class:`~mlx_harmony_core.request.StreamEvent`, the last with its
    ``completion``), then an exception if it failed, then :data:`END`. ``submit`` raises
    :class:`~mlx_harmony_core.errors.CapacityError` when the queue is full or closing.
    """

    @property
    def context_length(self) -> int | None:
        """The model's window (``/v1/models`` shows it)."""
        ...

    @property
    def pending(self) -> int:
        """Requests waiting or running (``/health`` shows it)."""
        ...

    def request(self, prompt: Any, params: Any, **options: Any) -> Any:
        """A request for ``prompt`` (messages, or token ids with ``raw=True``), rendered
        and checked; the options are :meth:`Engine.request <mlx_harmony_core.Engine.request>`'s.
        Raises the engine's errors (``InvalidRequestError``, ``ContextLengthError``)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text."""
        ...

    def token_bytes(self) -> Sequence[bytes]:
        """The bytes of every token id (for logprobs)."""
        ...

    def submit(self, request: Any, sink: Sink) -> Cancellable:
        """Queue ``request``; its events go to ``sink``."""
        ...

    def shutdown(self) -> None:
        """End running requests at their next token, refuse waiting and new ones."""
        ...

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs (after :meth:`shutdown`); False on timeout."""
        ...


class ClientWrapper:
    """An engine client that adds to another one (``self.client``): what it does not
    define itself is the wrapped client's."""

    client: Any

    def __getattr__(self, name: str) -> Any:
        if name == "client":  # not set yet: no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.client, name)

    @property
    def context_length(self) -> int | None:
        """The wrapped client's window."""
        return self.client.context_length

    @property
    def pending(self) -> int:
        """The wrapped client's waiting and running requests."""
        return self.client.pending


class LocalClient:
    """:class:`EngineClient` for an engine in this process: requests go to its
    continuous-batching scheduler, configured from ``options`` (up to ``max_batch`` decode
    together, at most ``max_queue`` wait). ``worker``: the thread its scheduler runs on
    (a :func:`~mlx_harmony_core.threads.worker`; default: the generation thread)."""

    def __init__(self, engine: Any, options: ServerOptions, worker: Any = None) -> None:
        self.engine = engine
        self.scheduler = engine.batching(
            max_batch=options.max_batch,
            max_queue=options.max_queue,
            kv_budget_bytes=options.kv_budget_bytes,
            prefill_chunk=options.prefill_chunk,
            **({} if worker is None else {"worker": worker}),
        )
        if options.tools:  # requests may then ask for these (and only these)
            engine.enable_tools(options.tools, options.tool_options)

    @property
    def context_length(self) -> int | None:
        """The engine's window."""
        return self.engine.context_length

    @property
    def pending(self) -> int:
        """The scheduler's waiting and running requests."""
        return self.scheduler.pending

    def request(self, prompt: Any, params: Any, **options: Any) -> Any:
        """:meth:`Engine.request <mlx_harmony_core.Engine.request>`."""
        return self.engine.request(prompt, params, **options)

    def encode(self, text: str) -> list[int]:
        """:meth:`Engine.encode <mlx_harmony_core.Engine.encode>`."""
        return self.engine.encode(text)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of ``text`` without what the tokenizer adds on its own (an optional
        member: ``/tokenize`` with ``add_special_tokens: false``)."""
        return self.engine.chat_format.encode_text(text)

    def render(self, messages: Any, **options: Any) -> list[int]:
        """:meth:`Engine.render <mlx_harmony_core.Engine.render>` (an optional member: the
        Responses API continues a stored reply from its exact tokens where it has this)."""
        return self.engine.render(messages, **options)

    def token_bytes(self) -> Sequence[bytes]:
        """:meth:`Engine.token_bytes <mlx_harmony_core.Engine.token_bytes>`."""
        return self.engine.token_bytes()

    def submit(self, request: Any, sink: Sink) -> Cancellable:
        """Queue ``request`` on the scheduler (with built-in tools, its reply's loop)."""
        return self.engine.start(request, sink=sink)

    def shutdown(self) -> None:
        """Shut the scheduler down (see :meth:`EngineClient.shutdown`) and the built-in
        tools' sessions."""
        self.scheduler.shutdown()
        self.engine.close_tools()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the scheduler's generation loop to park."""
        return self.scheduler.idle.wait(timeout=timeout)
