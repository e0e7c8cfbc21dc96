"""The generation engine: requests in, events out, through the one decode path.

The engine builds and checks requests (:mod:`.request`) with a chat format
(:mod:`.chat_format`), never a model family: rendering, stop tokens, token bytes and reply
parsing come from the format. Every request, ``generate`` and ``stream`` included, decodes on
the :class:`~.scheduler.Scheduler` (a request alone is a batch of one), which runs the model
through a :class:`~.runner.ModelRunner`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .chat_format import ChatFormat
from .distributed import is_peer_error
from .distributed_batch import GroupBatch
from .errors import ContextLengthError, InvalidRequestError, RequestTypeError
from .messages import MessagesLike, normalize_messages, role
from .options import GUIDE, RENDER, SPECULATION, TOOLS, RequestOptions
from .params import SamplingParams
from .prefix_cache import PrefixCache
from .request import (
    Completion,
    Request,
    StreamEvent,
    Timings,
    TokenLogprob,
    Usage,
)
from .runner import ModelRunner
from .scheduler import Handle, Scheduler, Sink, events, not_on
from .speculative import make_speculation
from .structured import make_guide
from .threads import generation
from .tool_loop import ToolLoop, builtin_system

if TYPE_CHECKING:
    from .distributed import Group

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

__all__ = [
    "Completion",
    "Engine",
    "StreamEvent",
    "Timings",
    "TokenLogprob",
    "Usage",
    "is_peer_error",
]


class Engine:
    """Generates from any model with mlx-lm's calling convention ``model(tokens, cache=...)``.

    ``chat_format`` renders prompts and parses replies (``load()`` picks Harmony for GPT-OSS
    and the tokenizer's chat template for other models). ``encoding=`` (a Harmony encoding)
    and ``tokenizer=`` (an mlx-lm tokenizer) still work and pick those formats.

    Each finished request's KV cache is kept for prefix reuse: ``prefix_cache_entries``
    caches (1: the last turn, as a chat needs; a server keeps more), at most
    ``prefix_cache_bytes`` in all; ``reuse_cache=False`` turns it off.

    ``group`` (a :class:`~.distributed.Group`, with a model sharded over it): rank 0's engine
    runs requests and the other ranks' engines follow them (see :mod:`.distributed`).
    """

    load_seconds: float | None = None  # set by load(): how long loading took

    def __init__(
        self,
        model: Any,
        *,
        chat_format: ChatFormat | None = None,
        encoding: Any = None,
        tokenizer: Any = None,
        config: dict[str, Any] | None = None,
        context_length: int | None = None,
        prefill_step_size: int = 512,
        reuse_cache: bool = True,
        cache_options: dict[str, Any] | None = None,
        prefix_cache_entries: int = 1,
        prefix_cache_bytes: int | None = None,
        group: Group | None = None,
    ) -> None:
        self.chat_format = chat_format or _format_from(encoding, tokenizer)
        group = group if group is not None and group.size > 1 else None
        self.config = dict(config or {})
        self.context_length = context_length or self.config.get("max_position_embeddings")
        self.vocab_size = int(self.config.get("vocab_size") or self.chat_format.vocab_size)
        _materialize(model)
        self.runner = ModelRunner(
            model,
            vocab_size=self.vocab_size,
            cache_options=cache_options,
            prefill_step_size=prefill_step_size,
            reuse_cache=reuse_cache,
            # Earlier requests' caches, found again by common prefix (one entry: the last turn).
            prefix_cache=PrefixCache(
                prefix_cache_bytes, prefix_cache_entries if reuse_cache else 0
            ),
            group=group,
        )
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()
        # Built-in tools by name (python, browser): made on first use with
        # ``builtin_tool_options``, or enabled up front (the server: only those).
        self.builtin_tools: dict[str, Any] = {}
        self.builtin_tool_options: Any = None  # a tools.builtin.BuiltinToolOptions
        self.builtin_tools_fixed = False  # True: requests may use only the enabled ones
        self._tools_lock = threading.Lock()

    @property
    def model(self) -> Any:
        """The model (mlx-lm's calling convention)."""
        return self.runner.model

    @model.setter
    def model(self, model: Any) -> None:
        # Another model may cache differently: the next request gets a new scheduler.
        _materialize(model)
        with self._scheduler_lock:
            if self._scheduler is not None and not self._scheduler.idle.wait(timeout=5):
                raise RuntimeError("the scheduler is busy; replace the model when idle")
            self.runner.model = model
            self._scheduler = None
        self.prefix_cache.clear()

    @property
    def group(self) -> Group | None:
        """The distributed group the model is sharded over (``None``: one process)."""
        return self.runner.group

    @property
    def prefix_cache(self) -> PrefixCache:
        """Finished requests' caches, reused by common prefix."""
        return self.runner.prefix_cache

    @prefix_cache.setter
    def prefix_cache(self, cache: PrefixCache) -> None:
        self.runner.prefix_cache = cache

    @property
    def cache_options(self) -> dict[str, Any]:
        return self.runner.cache_options

    @property
    def reuse_cache(self) -> bool:
        return self.runner.reuse_cache

    @property
    def prefill_step_size(self) -> int:
        return self.runner.prefill_step_size

    @prefill_step_size.setter
    def prefill_step_size(self, value: int) -> None:
        self.runner.prefill_step_size = value

    @property
    def encoding(self) -> Any:
        """The Harmony encoding when the format is Harmony (else ``None``)."""
        return getattr(self.chat_format, "encoding", None)

    @property
    def tokenizer(self) -> Any:
        """The mlx-lm tokenizer when the format is a chat template (else ``None``)."""
        return getattr(self.chat_format, "tokenizer", None)

    # -- built-in tools ----------------------------------------------------------------------
    def enable_tools(self, names: Sequence[str], options: Any = None) -> None:
        """Enable the built-in tools ``names`` (``python``, ``browser``) with ``options`` (a
        :class:`~mlx_harmony_core.tools.builtin.BuiltinToolOptions`); from then on requests
        may ask for these only (a server's operator enables them, requests opt in)."""
        from .tools.builtin import BuiltinTools

        with self._tools_lock:
            self.builtin_tool_options = options
            for name in _tool_names(names):
                if name not in self.builtin_tools:
                    self.builtin_tools[name] = BuiltinTools([name], options)
            self.builtin_tools_fixed = True

    def tools_for(self, names: Sequence[str]) -> dict[str, Any]:
        """The built-in tools ``names`` (made on first use unless :meth:`enable_tools`
        fixed the set; then asking for another is an :class:`InvalidRequestError`)."""
        from .tools.builtin import BuiltinTools

        wanted = _tool_names(names)
        with self._tools_lock:
            for name in wanted:
                if name in self.builtin_tools:
                    continue
                if self.builtin_tools_fixed:
                    enabled = ", ".join(sorted(self.builtin_tools)) or "none"
                    raise InvalidRequestError(
                        f"the built-in tool {name!r} is not enabled here (enabled: {enabled})",
                        param="builtin_tools",
                    )
                self.builtin_tools[name] = BuiltinTools([name], self.builtin_tool_options)
            return {name: self.builtin_tools[name] for name in wanted}

    def close_tools(self) -> None:
        """Stop the built-in tools' sessions (their processes) and forget them."""
        with self._tools_lock:
            tools, self.builtin_tools = self.builtin_tools, {}
        for t in tools.values():
            try:
                t.close()
            except Exception:
                logger.debug("closing a built-in tool failed", exc_info=True)

    # -- prompts ---------------------------------------------------------------------------
    def render(self, messages: MessagesLike | Sequence[int], **options: Any) -> list[int]:
        """Prompt token ids for ``messages`` (token ids pass through, checked)."""
        if _is_token_ids(messages):
            ids = list(messages)  # type: ignore[arg-type]
            self.check_vocab(ids)
            return ids
        return self.chat_format.render(messages, **options)

    def check_vocab(self, ids: Sequence[int], what: str = "prompt") -> None:
        """Raise :class:`InvalidRequestError` for ids outside the model's vocabulary."""
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"{what} token id {bad} is outside this model's vocabulary [0, {self.vocab_size})"
            )

    def token_bytes(self) -> Sequence[bytes]:
        """The bytes of every token id (special tokens as their text)."""
        return self.chat_format.token_bytes()

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (special-token text is allowed: raw prompts use it)."""
        return self.chat_format.encode(text)

    def _truncate(
        self,
        messages: MessagesLike | Sequence[int],
        prompt_ids: list[int],
        max_tokens: int,
        options: dict[str, Any],
    ) -> list[int]:
        """Drop the oldest turns until the reply has room (see :meth:`stream`)."""
        limit = self.context_length
        if not limit or isinstance(messages, str) or _is_token_ids(messages):
            return prompt_ids
        need = min(max_tokens, limit // 2)
        items = normalize_messages(messages)  # type: ignore[arg-type]
        dropped = 0
        while len(prompt_ids) + need > limit:
            users = [i for i, m in enumerate(items) if role(m) == "user"]
            if len(users) < 2:
                break  # only the current turn is left: it is never cut
            first = next(i for i, m in enumerate(items) if role(m) not in ("system", "developer"))
            # Remove one whole turn: everything up to (not including) the next user message.
            nxt = next(i for i in users if i > first)
            dropped += nxt - first
            items = items[:first] + items[nxt:]
            prompt_ids = self.render(items, **options)
        if dropped:
            logger.info("dropped the %d oldest messages to fit the context window", dropped)
        return prompt_ids

    # -- requests ----------------------------------------------------------------------------
    def request(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        options: RequestOptions | None = None,
        **kwargs: Any,
    ) -> Request:
        """A :class:`Request` for ``messages``, rendered and checked. The options are a
        :class:`~.options.RequestOptions` or its fields as keyword arguments (those of
        :meth:`stream`); drive the request with :meth:`run`."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestTypeError("params must be a SamplingParams")
        if options is None:
            options = RequestOptions.of(kwargs)
        elif not isinstance(options, RequestOptions):
            raise RequestTypeError("options must be a RequestOptions")
        elif kwargs:
            options = RequestOptions.of({**options.model_dump(exclude_unset=True), **kwargs})
        render_options = options.group(RENDER)
        names = options.group(TOOLS).get("builtin_tools")
        if names and not options.raw and not _is_token_ids(messages):
            if self.chat_format.name != "harmony":
                raise InvalidRequestError(
                    "built-in tools (python, browser) need a GPT-OSS (Harmony) model",
                    param="builtin_tools",
                )
            tools = self.tools_for(names)
            render_options = {**render_options, "system_tools": builtin_system(tools.values())}
        guide_options = options.group(GUIDE)
        spec_options = options.group(SPECULATION)
        max_tokens = options.max_tokens
        raw = options.raw
        t0 = time.perf_counter()
        prompt_ids = self.render(messages, **render_options)
        if options.truncate:
            prompt_ids = self._truncate(messages, prompt_ids, max_tokens, render_options)
        primer: list[int] = []
        if not raw:
            primer = self.chat_format.primer(
                render_options.get("tool_choice"), render_options.get("tools")
            )
            prompt_ids = prompt_ids + primer
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty")
        if self.context_length:
            room = self.context_length - len(prompt_ids)
            if room < 1:
                raise ContextLengthError(
                    f"the prompt has {len(prompt_ids)} tokens, more than the model's context "
                    f"window of {self.context_length}; shorten the conversation"
                )
            if max_tokens > room:  # Request.asked_max_tokens keeps what was asked
                logger.info("max_tokens %d clamped to the %d tokens left", max_tokens, room)
                max_tokens = room
        guide = None
        if render_options.get("tools") or any(v is not None for v in guide_options.values()):
            guide = make_guide(
                self.chat_format,
                self.vocab_size,
                tools=render_options.get("tools"),
                tool_choice=render_options.get("tool_choice"),
                primer=primer,
                raw=raw,
                **guide_options,
            )
        speculation = make_speculation(vocab_size=self.vocab_size, **spec_options)
        req = Request(
            self.chat_format,
            prompt_ids,
            params,
            options,
            max_tokens=max_tokens,
            primer=primer,
            guide=guide,
            speculation=speculation,
            started=t0,
        )
        req.check(self.vocab_size)
        return req

    def run(self, req: Request, progress: Progress | None = None) -> Iterator[StreamEvent]:
        """Drive ``req`` to its end on the scheduler, yielding its events (the last one has
        the completion); ``progress(done, total)`` is called as the prompt is prefilled."""
        req.progress = progress
        not_on(getattr(self.batching(), "worker", generation))
        yield from events(self.start(req))

    def start(self, req: Request, sink: Sink | None = None) -> Handle:
        """Queue ``req`` (from :meth:`request`) on the scheduler; with ``builtin_tools`` its
        reply runs them and goes on (see :mod:`.tool_loop`). Thread-safe; returns the
        :class:`~.scheduler.Handle` at once (events go to ``sink`` when given)."""
        o = req.options
        if o.builtin_tools and not o.raw:
            loop = ToolLoop(
                self,
                req,
                self.tools_for(o.builtin_tools),
                max_tool_calls=o.max_tool_calls,
                session=o.tool_session,
                sink=sink,
            )
            return loop.start()
        return self.batching().submit(req, sink=sink)

    def follow(self, message: dict[str, Any]) -> None:
        """A follower rank: apply rank 0's step ``message`` (see :meth:`.ModelRunner.follow`)."""
        self.runner.follow(message)

    def reset_cache(self) -> None:
        """Forget earlier requests' caches (the next prompt is prefilled in full)."""
        self.prefix_cache.clear()

    # -- public API ------------------------------------------------------------------------
    def stream(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        *,
        progress: Progress | None = None,
        **options: Any,
    ) -> Iterator[StreamEvent]:
        """Generate a reply, yielding text deltas as they are decoded.

        Keyword arguments (the fields of :class:`~.options.RequestOptions`, or pass one as
        ``options=``): ``max_tokens`` (512), ``logprobs``, ``stop``, ``stop_tokens``,
        ``include_stop``, ``ignore_eos``, ``truncate``, ``raw``, ``should_stop``,
        ``logits_processors``, ``token_mask`` and the chat format's render options.
        Each event has a ``kind`` (``answer``, ``reasoning`` or ``tool_call``); the last one
        has ``finish_reason`` (``stop``, ``length``, ``tool_calls`` or ``cancelled``) and the
        full :class:`Completion`. ``logprobs=n`` records each token's log-probability and
        the top ``n`` alternatives. ``stop`` strings act on the answer's text (never on
        reasoning): nothing that belongs to a stop string is streamed, generation stops
        when one completes, and the text before it is kept. ``stop_tokens`` adds token ids
        or id sequences to the model's own stop tokens; ``ignore_eos`` drops the model's own
        (for benchmarks that need exactly ``max_tokens``). ``render_options`` go to the chat
        format (``reasoning_effort``, ``model_identity``, ``tools``, ``tool_choice``, ...); a
        forced ``tool_choice`` opens the reply with the call's header.

        ``logits_processors`` are mlx-lm-style ``fn(tokens, logits) -> logits`` applied
        before the fused sampler (``tokens``: prompt and reply so far). ``token_mask`` is
        called with the reply's tokens so far and returns a packed bitmask of allowed
        tokens (see :func:`~mlx_harmony_core.sampling.pack_mask`) or ``None``; masked
        tokens are never drawn.

        ``response_format`` (OpenAI's: ``{"type": "json_object"}`` or ``{"type":
        "json_schema", "json_schema": {"name": ..., "schema": {...}}}``), ``regex`` or
        ``grammar`` (a Lark grammar) constrain the answer token by token (see
        :mod:`.structured`); tools with ``"strict": true`` constrain their calls' arguments.
        ``max_reasoning_tokens`` ends the model's reasoning after that many tokens (``0``:
        none), where the chat format has a reasoning channel.

        A prompt longer than the context window is a :class:`ContextLengthError`, or with
        ``truncate=True`` the oldest turns (never system/developer messages or the last user
        turn) are dropped until the reply has room for ``max_tokens`` (at most half the
        window). ``raw=True`` decodes the reply as plain text (for raw completions).
        ``should_stop`` is polled after each token; when it returns True the reply ends
        with ``finish_reason="cancelled"``.

        ``builtin_tools`` (``["python"]``, ``["python", "browser"]``) declares GPT-OSS's
        built-in tools and runs them when the reply calls them; the reply then goes on (see
        :mod:`.tool_loop`): at most ``max_tool_calls`` calls run (16), ``tool_session``
        keys the tools' state (python variables, pages) across replies (by default each
        reply has its own). The calls that ran are the completion's ``builtin_calls``; the
        tools are made with ``engine.builtin_tool_options`` on first use, or enabled up
        front with :meth:`enable_tools`.
        """
        yield from self.run(self.request(messages, params, **options), progress)

    # -- batching ------------------------------------------------------------------------
    def batching(self, **options: Any) -> Scheduler:
        """The engine's continuous-batching :class:`~.scheduler.Scheduler`, created on first
        use. ``options`` (``max_batch`` 8, ``max_queue``, ``kv_budget_bytes``,
        ``prefill_chunk`` 128) replace it with a new one, which needs the old one idle."""
        with self._scheduler_lock:
            old = self._scheduler
            if old is None or options:
                if old is not None and not old.idle.wait(timeout=5):
                    raise RuntimeError("the scheduler is busy; reconfigure it when idle")
                group = GroupBatch if self.runner.group is not None else None
                self._scheduler = Scheduler(self.runner, batch_class=group, **options)
            return self._scheduler

    def submit(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        *,
        sink: Sink | None = None,
        **options: Any,
    ) -> Handle:
        """Queue a request on the batching scheduler; thread-safe, returns at once.

        Same arguments as :meth:`stream` (errors in them raise here). Iterate the returned
        :class:`~.scheduler.Handle` for its events, call ``result()`` for the completion,
        ``cancel()`` to stop it; requests submitted together decode in one batch.
        """
        req = self.request(messages, params, **options)
        return self.start(req, sink=sink)

    def generate_batch(
        self,
        prompts: Sequence[Any],
        params: SamplingParams | None = None,
        **options: Any,
    ) -> list[Completion]:
        """Generate replies for many prompts at once (decoded together); completions in order.

        Each item is a message list (or a string, or token ids), or a dict with
        ``messages`` and its own ``params``, ``max_tokens``, ``stop`` or any other keyword
        of :meth:`stream`; ``params`` and ``options`` are the defaults for every item.
        Every item is checked before any runs.
        """
        requests = []
        for i, item in enumerate(prompts):
            own = dict(options)
            item_params = params
            if isinstance(item, dict):
                extra = dict(item)
                if "messages" not in extra:
                    raise RequestTypeError(f"prompt {i} is a dict without 'messages'")
                messages = extra.pop("messages")
                item_params = extra.pop("params", params)
                own.update(extra)
            else:
                messages = item
            requests.append(self.request(messages, item_params, **own))
        handles = [self.start(r) for r in requests]
        return [h.result() for h in handles]

    def generate(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        *,
        progress: Progress | None = None,
        **options: Any,
    ) -> Completion:
        """Generate a whole reply; same arguments as :meth:`stream`."""
        completion = None
        for event in self.stream(messages, params, progress=progress, **options):
            completion = event.completion or completion
        assert completion is not None
        return completion


def _format_from(encoding: Any, tokenizer: Any) -> ChatFormat:
    """The format the older ``encoding=`` / ``tokenizer=`` arguments stand for."""
    if tokenizer is not None:
        from .chat_format import ChatTemplateFormat

        return ChatTemplateFormat(tokenizer)
    if encoding is None:
        raise RequestTypeError("Engine needs a chat_format (or a Harmony encoding, or a tokenizer)")
    from .harmony import HarmonyFormat

    return HarmonyFormat(encoding)


def _tool_names(names: Sequence[str]) -> list[str]:
    """``names`` checked against the built-in tools (a string may list them: "python,browser")."""
    from .tools.builtin import BUILTIN_TOOL_NAMES

    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[str] = []
    for name in names:
        if name not in BUILTIN_TOOL_NAMES:
            raise InvalidRequestError(
                f"unknown built-in tool {name!r}; choose from {', '.join(BUILTIN_TOOL_NAMES)}",
                param="builtin_tools",
            )
        if name not in out:
            out.append(name)
    return out


def _materialize(model: Any) -> None:
    """Evaluate every array the model holds, private ones too (RoPE tables and the like).

    Since MLX 0.31.2 an unevaluated array can only be evaluated on the thread whose stream
    built it; a model loaded on one thread and served from another would fail otherwise.
    """
    modules = model.modules() if hasattr(model, "modules") else []
    arrays = []
    for m in modules:
        items = list(vars(m).values()) + (list(m.values()) if isinstance(m, dict) else [])
        arrays += [v for v in items if isinstance(v, mx.array)]
    if arrays:
        mx.eval(arrays)


def _is_token_ids(messages: Any) -> bool:
    return (
        isinstance(messages, Sequence)
        and not isinstance(messages, str)
        and bool(messages)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in messages)
    )
