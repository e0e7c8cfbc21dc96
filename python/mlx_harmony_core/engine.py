"""The generation engine: one decode loop behind ``generate`` and ``stream``.

The engine knows requests (:mod:`.request`) and a chat format (:mod:`.chat_format`), never a
model family: rendering, stop tokens, token bytes and reply parsing come from the format.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from .chat_format import RENDER_OPTIONS, ChatFormat
from .errors import ContextLengthError, InvalidRequestError, RequestTypeError
from .kv_cache import make_cache
from .messages import MessagesLike, normalize_messages, role
from .params import FIELDS, SamplingParams
from .prefix_cache import PrefixCache
from .request import (
    Completion,
    Request,
    StreamEvent,
    Timings,
    TokenLogprob,
    Usage,
)
from .sampling import LogProbs
from .scheduler import Handle, Scheduler, Sink
from .speculative import make_speculation
from .structured import make_guide

if TYPE_CHECKING:
    from .distributed import Group

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# What a caller may pass through to the Request (its own keyword arguments, less those the
# engine sets itself).
_REQUEST_ARGS = frozenset(inspect.signature(Request).parameters) - {
    "chat_format",
    "prompt_ids",
    "params",
    "max_tokens",
    "primer",
    "guide",
    "speculation",
    "started",
}
# Constraints on the reply (see :mod:`.structured`), turned into the request's guide.
_GUIDE_ARGS = frozenset({"response_format", "regex", "grammar", "max_reasoning_tokens"})
# Speculative decoding (see :mod:`.speculative`).
_SPEC_ARGS = frozenset({"speculative", "draft_model", "num_draft"})

__all__ = ["Completion", "Engine", "StreamEvent", "Timings", "TokenLogprob", "Usage"]


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
        self.group = group if group is not None and group.size > 1 else None
        if self.group is not None:
            reuse_cache = False  # every rank would have to evict alike; see distributed.py
        if prefill_step_size < 1:
            raise ValueError("prefill_step_size must be >= 1")
        self.model = model
        self.config = dict(config or {})
        self.context_length = context_length or self.config.get("max_position_embeddings")
        self.vocab_size = int(self.config.get("vocab_size") or self.chat_format.vocab_size)
        self.prefill_step_size = prefill_step_size
        self.reuse_cache = reuse_cache
        self.cache_options = dict(cache_options or {})
        self.last_cached_tokens = 0
        _materialize(model)
        # MLX streams belong to the thread that made them: one per generating thread.
        self._local = threading.local()
        # Earlier requests' caches, found again by common prefix (one entry: the last turn).
        self.prefix_cache = PrefixCache(
            prefix_cache_bytes, prefix_cache_entries if reuse_cache else 0
        )
        self._scheduler: Scheduler | None = None
        self._scheduler_lock = threading.Lock()

    @property
    def encoding(self) -> Any:
        """The Harmony encoding when the format is Harmony (else ``None``)."""
        return getattr(self.chat_format, "encoding", None)

    @property
    def tokenizer(self) -> Any:
        """The mlx-lm tokenizer when the format is a chat template (else ``None``)."""
        return getattr(self.chat_format, "tokenizer", None)

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
        *,
        max_tokens: int = 512,
        truncate: bool = False,
        **options: Any,
    ) -> Request:
        """A :class:`Request` for ``messages``, rendered and checked; the keyword arguments
        are those of :meth:`stream` (drive it with :meth:`run`)."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestTypeError("params must be a SamplingParams")
        render_options = {k: v for k, v in options.items() if k in RENDER_OPTIONS}
        request_options = {k: v for k, v in options.items() if k in _REQUEST_ARGS}
        guide_options = {k: v for k, v in options.items() if k in _GUIDE_ARGS}
        spec_options = {k: v for k, v in options.items() if k in _SPEC_ARGS}
        unknown = sorted(
            set(options) - render_options.keys() - request_options.keys() - _GUIDE_ARGS - _SPEC_ARGS
        )
        if unknown:
            names = [*RENDER_OPTIONS, *_REQUEST_ARGS, *_GUIDE_ARGS, *_SPEC_ARGS]
            names += ["max_tokens", "truncate"]
            names += list(FIELDS)
            close = difflib.get_close_matches(unknown[0], names, 1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            if close and close[0] in FIELDS:
                hint += " (sampling settings go in params=SamplingParams(...))"
            raise RequestTypeError(f"unexpected keyword argument {unknown[0]!r}{hint}")
        raw = bool(request_options.get("raw", False))
        t0 = time.perf_counter()
        prompt_ids = self.render(messages, **render_options)
        if truncate:
            prompt_ids = self._truncate(messages, prompt_ids, max_tokens, render_options)
        asked = max_tokens
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
                asked, max_tokens = max_tokens, room
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
        if self.group is not None and spec_options.get("speculative"):
            raise InvalidRequestError(
                "speculative decoding does not run in a distributed group; leave it off",
                param="speculative",
            )
        speculation = make_speculation(vocab_size=self.vocab_size, **spec_options)
        req = Request(
            self.chat_format,
            prompt_ids,
            params,
            max_tokens=max_tokens,
            primer=primer,
            guide=guide,
            speculation=speculation,
            started=t0,
            **request_options,
        )
        req.check(self.vocab_size)
        req.asked_max_tokens = asked
        req.lockstep = self.group is not None
        return req

    def run(self, req: Request, progress: Progress | None = None) -> Iterator[StreamEvent]:
        """Drive ``req`` to its end, yielding its events (the last one has the completion)."""
        group = self.group
        if group is None:
            yield from self._run(req, progress)
            return
        req.lockstep = True
        with group.running():
            with mx.stream(self._gen_stream()):  # ordered with the decode loop's collectives
                group.send(
                    {
                        "prompt": req.prompt_ids,
                        "max_tokens": req.max_tokens,
                        "prefill_step": self.prefill_step_size,  # the same chunks everywhere
                    }
                )
            try:
                for event in self._run(req, progress):
                    group.progress()
                    yield event
            except RuntimeError as exc:
                if is_peer_error(exc):
                    raise group.lost(exc) from exc
                raise

    def _run(self, req: Request, progress: Progress | None) -> Iterator[StreamEvent]:
        mx.reset_peak_memory()
        tokens = self._tokens(req, progress)
        try:
            for token, lp in tokens:
                yield from req.push(token, lp)
                if req.finish is not None:
                    break
        finally:
            tokens.close()  # a stop or an error: the followers get their last broadcast now
        yield from req.close(peak_memory=int(mx.get_peak_memory()))

    def follow(self, message: dict[str, Any]) -> None:
        """A follower rank: run rank 0's request ``message`` (its prompt ids and token
        budget) through the same forward passes, feeding the tokens rank 0 broadcasts."""
        group = self.group
        assert group is not None and not group.leader
        n = int(message["max_tokens"])
        self.prefill_step_size = int(message.get("prefill_step", self.prefill_step_size))
        try:
            with group.running(), mx.stream(self._gen_stream()):
                cache = make_cache(self.model, **self.cache_options)
                rest = self._prefill(mx.array(message["prompt"], dtype=mx.int32), cache, None)
                logits = self.model(rest[None], cache=cache)
                for k in range(n):
                    shared = group.share(None)  # rank 0's token for this step, and "go on"
                    mx.async_eval(logits)
                    mx.async_eval(shared)
                    if k + 1 < n:  # built while waiting; run only if rank 0 goes on
                        nxt = self.model(shared[None, :1], cache=cache)
                    if not shared[1].item() or k + 1 >= n:
                        break
                    group.progress()
                    logits = nxt
        except RuntimeError as exc:
            if is_peer_error(exc):
                raise group.lost(exc) from exc
            raise

    # -- the decode loop -------------------------------------------------------------------
    def _gen_stream(self) -> Any:
        # Generation runs on its own stream (as in mlx-lm): measurably faster first tokens.
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = mx.new_stream(mx.default_device())
        return stream

    def _reuse(self, prompt_ids: list[int]) -> tuple[list[Any], int]:
        """A cache holding the longest reusable prefix of ``prompt_ids``, and its length
        (a fresh cache and 0 when nothing can be reused)."""
        cache, common = self.prefix_cache.take(prompt_ids)
        if cache is None:
            return make_cache(self.model, **self.cache_options), 0
        return cache, common

    def reset_cache(self) -> None:
        """Forget earlier requests' caches (the next prompt is prefilled in full)."""
        self.prefix_cache.clear()

    def _prefill(self, prompt: mx.array, cache: list[Any], progress: Progress | None) -> mx.array:
        """Run all but the last prompt token through the model in chunks; return the rest."""
        total = prompt.size
        done = 0
        while prompt.size - done > 1:
            n = min(self.prefill_step_size, prompt.size - done - 1)
            with mx.stream(self._gen_stream()):
                self.model(prompt[None, done : done + n], cache=cache)
            mx.eval([c.state for c in cache])
            done += n
            if self.group is not None:
                self.group.progress()
            if progress is not None:
                progress(done, total)
        return prompt[done:]

    def _tokens(
        self, req: Request, progress: Progress | None
    ) -> Iterator[tuple[int, LogProbs | None]]:
        """Yield ``req``'s sampled ids; step n+1 is built and queued while step n evaluates
        (for a request whose draw needs each token first, a grammar, only its forward pass).

        On the way out the cache is kept, with the tokens it holds, for the next request.
        """
        if req.speculation is not None:
            yield from self._speculate(req, progress)
            return
        prompt_ids = req.prompt_ids
        cache, cached = self._reuse(prompt_ids)
        self.last_cached_tokens = req.cached_tokens = cached
        rest = self._prefill(mx.array(prompt_ids[cached:], dtype=mx.int32), cache, progress)
        generated: list[int] = []
        fed = [len(prompt_ids) - rest.size]  # tokens in the cache
        ok = False
        try:
            for token, lp in self._pipelined(req, cache, rest, req.max_tokens, fed):
                generated.append(token)
                ok = True
                yield token, lp
                ok = False
            ok = True
        finally:
            # A consumer that stops early (GeneratorExit) leaves a valid cache; an error does not.
            if ok and self.reuse_cache:
                self.prefix_cache.put((prompt_ids + generated)[: fed[0]], cache)

    def _forward(self, req: Request, cache: list[Any], tokens: mx.array) -> mx.array:
        """Next-token logits (lazy) after ``tokens``; queued at once when the draw comes
        later (a grammar's mask is computed while this runs)."""
        with mx.stream(self._gen_stream()):  # only while building: the caller's is untouched
            logits = self.model(tokens[None], cache=cache)[:, -1, :]
        if req.sync:
            mx.async_eval(logits)
        return logits

    def _draw(self, req: Request, logits: mx.array) -> tuple[mx.array, LogProbs | None]:
        """``req``'s next token from ``logits`` (lazy, queued)."""
        with mx.stream(self._gen_stream()):
            ids, lp = req.sample(logits)
            if self.group is not None:  # every rank feeds rank 0's token
                ids = self.group.share(ids)[:1]
        mx.async_eval(ids, *([] if lp is None else vars(lp).values()))
        return ids, lp

    def _pipelined(
        self, req: Request, cache: list[Any], inputs: mx.array, n: int, fed: list[int]
    ) -> Iterator[tuple[int, LogProbs | None]]:
        """``n`` tokens of plain decoding after ``inputs`` (not yet in the cache); step k+1
        is queued before token k is read (its draw too, unless it needs token k on the
        host). ``fed[0]`` counts the tokens in the cache."""
        y, lp = self._draw(req, self._forward(req, cache, inputs))
        fed[0] += inputs.size
        owed = False  # a queued forward pass whose draw the followers are waiting for
        try:
            for k in range(n):
                last = k + 1 >= n
                if not last:
                    ahead = self._forward(req, cache, y)
                    owed = True
                    fed[0] += 1
                    if not req.sync:
                        nxt = self._draw(req, ahead)
                yield int(y.item()), lp
                if last:
                    break
                if req.sync:
                    nxt = self._draw(req, ahead)
                owed = False
                y, lp = nxt
        finally:
            if owed and self.group is not None:
                with mx.stream(self._gen_stream()):
                    self.group.end()

    def _speculate(
        self, req: Request, progress: Progress | None
    ) -> Iterator[tuple[int, LogProbs | None]]:
        """``_tokens`` with speculation: each step runs the last token and k drafted ones
        through the model at once, then draws position by position (the same draws as
        plain decoding) while the drafts hold; the cache is rewound past the first miss."""
        spec = req.speculation
        assert spec is not None
        prompt_ids = req.prompt_ids
        cache, cached = self._reuse(prompt_ids)
        self.last_cached_tokens = req.cached_tokens = cached
        rest = self._prefill(mx.array(prompt_ids[cached:], dtype=mx.int32), cache, progress)
        spec.start(prompt_ids)
        context = list(prompt_ids)
        generated: list[int] = []
        in_cache = len(prompt_ids) - rest.size  # tokens the cache holds
        step = rest.tolist()
        ok = False
        try:
            while len(generated) < req.max_tokens:
                t0 = time.perf_counter()
                room = req.max_tokens - len(generated) - 1
                plain = spec.plain_steps()
                drafts = []
                if not plain:
                    drafts = [t for t in spec.propose(context)[:room] if 0 <= t < self.vocab_size]
                    plain = 0 if drafts else 8  # nothing to guess: a few plain steps
                if plain:  # plain decoding, pipelined as in _tokens, for a stretch
                    n = min(plain, room + 1)
                    fed = [in_cache]
                    for token, lp in self._pipelined(
                        req, cache, mx.array(step, dtype=mx.int32), n, fed
                    ):
                        in_cache = fed[0]
                        generated.append(token)
                        context.append(token)
                        ok = True
                        yield token, lp
                        ok = False
                    in_cache = fed[0]
                    step = [generated[-1]]
                    spec.record(0, 0, n, time.perf_counter() - t0)
                    continue
                spec.drafted += len(drafts)
                inputs = mx.array(step + drafts, dtype=mx.int32)
                with mx.stream(self._gen_stream()):
                    logits = self.model(inputs[None], cache=cache)[0, len(step) - 1 :, :]
                in_cache += inputs.size
                accepted = emitted = 0
                for i in range(len(drafts) + 1):
                    ids, lp = self._draw(req, logits[i : i + 1])
                    token = int(ids.item())
                    generated.append(token)
                    context.append(token)
                    emitted += 1
                    ok = True
                    yield token, lp
                    ok = False
                    if i == len(drafts) or token != drafts[i]:
                        break
                    accepted += 1
                    spec.accepted += 1
                # Valid: the step's input and the accepted drafts; the last token is fed next.
                miss = len(drafts) - accepted
                if miss and any(c.trim(miss) != miss for c in cache):
                    raise RuntimeError("a KV cache could not rewind a rejected draft")
                in_cache -= miss
                step = [generated[-1]]
                spec.record(len(drafts), accepted, emitted, time.perf_counter() - t0)
            ok = True
        finally:
            # Keep the cache for the next request holding exactly the tokens it has verified.
            extra = in_cache - (len(prompt_ids) + max(0, len(generated) - 1))
            fits = extra == 0 or (extra > 0 and all(c.trim(extra) == extra for c in cache))
            if ok and self.reuse_cache and fits:
                self.prefix_cache.put((prompt_ids + generated)[: in_cache - extra], cache)

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

        Keyword arguments: ``max_tokens`` (512), ``logprobs``, ``stop``, ``stop_tokens``,
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
                self._scheduler = Scheduler(self, **options)
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
        return self.batching().submit(req, sink=sink)

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
        sched = self.batching()
        handles = [sched.submit(r) for r in requests]
        return [h.result() for h in handles]

    def generate(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 512,
        progress: Progress | None = None,
        **options: Any,
    ) -> Completion:
        """Generate a whole reply; same arguments as :meth:`stream`."""
        completion = None
        for event in self.stream(
            messages, params, max_tokens=max_tokens, progress=progress, **options
        ):
            completion = event.completion or completion
        assert completion is not None
        return completion


def is_peer_error(exc: BaseException) -> bool:
    """Whether an MLX error says a distributed peer is gone (the ring backend's words)."""
    text = str(exc).lower()
    return any(w in text for w in ("[ring]", "[mpi]", "[jaccl]", "peer", "connection"))


def _format_from(encoding: Any, tokenizer: Any) -> ChatFormat:
    """The format the older ``encoding=`` / ``tokenizer=`` arguments stand for."""
    if tokenizer is not None:
        from .chat_format import ChatTemplateFormat

        return ChatTemplateFormat(tokenizer)
    if encoding is None:
        raise RequestTypeError("Engine needs a chat_format (or a Harmony encoding, or a tokenizer)")
    from .harmony import HarmonyFormat

    return HarmonyFormat(encoding)


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
