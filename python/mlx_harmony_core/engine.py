"""The generation engine: one decode loop behind ``generate`` and ``stream``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from .config import SamplingParams
from .harmony import (
    CALL,
    STOP_TOKENS,
    Delta,
    HarmonyStream,
    MessagesLike,
    ToolCall,
    normalize_messages,
    render_prompt,
    reply_primer,
)
from .kv_cache import make_cache
from .prefix_cache import PrefixCache
from .sampling import Sampler, check_ids
from .stopping import (
    Detokenizer,
    StopStrings,
    TokenStops,
    harmony_detokenizer,
    o200k_harmony_bytes,
    token_sequences,
    tokenizer_bytes,
)

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Wall-clock measurements of one request (seconds, tokens/s, bytes)."""

    ttft_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    decode_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    total_s: float = 0.0
    peak_memory_bytes: int = 0


@dataclass
class TokenLogprob:
    """Log-probability of a generated token under the model, and the top alternatives."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    """The result of :meth:`Engine.generate`."""

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    timings: Timings
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usage"]["total_tokens"] = self.usage.total_tokens
        return out


@dataclass
class StreamEvent:
    """One step of :meth:`Engine.stream`: a text delta, or (last) the finish."""

    channel: str = "final"
    delta: str = ""
    recipient: str | None = None
    finish_reason: str | None = None
    completion: Completion | None = None


class Engine:
    """Generates from any model with mlx-lm's calling convention ``model(tokens, cache=...)``.

    With a Harmony ``encoding`` (GPT-OSS) prompts are rendered and replies parsed as Harmony;
    with an mlx-lm ``tokenizer`` the model's own chat template is used and the reply is plain
    text on the ``final`` channel.

    Each finished request's KV cache is kept for prefix reuse: ``prefix_cache_entries``
    caches (1: the last turn, as a chat needs; a server keeps more), at most
    ``prefix_cache_bytes`` in all; ``reuse_cache=False`` turns it off.
    """

    def __init__(
        self,
        model: Any,
        *,
        encoding: Any = None,
        tokenizer: Any = None,
        config: dict[str, Any] | None = None,
        context_length: int | None = None,
        prefill_step_size: int = 512,
        reuse_cache: bool = True,
        cache_options: dict[str, Any] | None = None,
        prefix_cache_entries: int = 1,
        prefix_cache_bytes: int | None = None,
    ) -> None:
        if encoding is None and tokenizer is None:
            raise ValueError("Engine needs a Harmony encoding (GPT-OSS) or an mlx-lm tokenizer")
        if prefill_step_size < 1:
            raise ValueError("prefill_step_size must be >= 1")
        self.model = model
        self.encoding = encoding
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.context_length = context_length or self.config.get("max_position_embeddings")
        self.prefill_step_size = prefill_step_size
        self.reuse_cache = reuse_cache
        self.cache_options = dict(cache_options or {})
        self._detok: Detokenizer | None = None
        self._token_bytes: list[bytes] | None = None
        # Generation runs on its own stream (as in mlx-lm): measurably faster first tokens.
        _materialize(model)
        # MLX streams belong to the thread that made them: one per generating thread.
        self._local = threading.local()
        # Earlier requests' caches, found again by common prefix (one entry: the last turn).
        self.prefix_cache = PrefixCache(
            prefix_cache_bytes, prefix_cache_entries if reuse_cache else 0
        )

    # -- prompts ---------------------------------------------------------------------------
    def render(self, messages: MessagesLike | Sequence[int], **options: Any) -> list[int]:
        """Prompt token ids for ``messages`` (token ids pass through unchanged)."""
        if _is_token_ids(messages):
            return list(messages)  # type: ignore[arg-type]
        if self.encoding is not None:
            return render_prompt(messages, **options)  # type: ignore[arg-type]
        chat = [m for m in normalize_messages(messages) if isinstance(m, dict)]  # type: ignore[arg-type]
        tools = options.get("tools")
        extra = {"tools": tools} if tools and options.get("tool_choice") != "none" else {}
        return list(
            self.tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, **extra
            )
        )

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
        items = normalize_messages(messages)
        dropped = 0
        while len(prompt_ids) + need > limit:
            users = [i for i, m in enumerate(items) if _role(m) == "user"]
            if len(users) < 2:
                break  # only the current turn is left: it is never cut
            first = next(i for i, m in enumerate(items) if _role(m) not in ("system", "developer"))
            # Remove one whole turn: everything up to (not including) the next user message.
            nxt = next(i for i in users if i > first)
            dropped += nxt - first
            items = items[:first] + items[nxt:]
            prompt_ids = self.render(items, **options)
        if dropped:
            logger.info("dropped the %d oldest messages to fit the context window", dropped)
        return prompt_ids

    def _stop_ids(self) -> list[int]:
        if self.encoding is not None:
            return list(STOP_TOKENS)
        return sorted(
            getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id]
        )

    def token_bytes(self) -> Sequence[bytes]:
        """The bytes of every token id (special tokens as their text)."""
        if self.encoding is not None:
            return o200k_harmony_bytes()
        if self._token_bytes is None:
            self._token_bytes = tokenizer_bytes(self.tokenizer)
        return self._token_bytes

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text (special-token text is allowed: raw prompts use it)."""
        if self.encoding is not None:
            return list(self.encoding.encode(text, allowed_special="all"))
        return list(self.tokenizer.encode(text))

    def _detokenizer(self) -> Detokenizer:
        if self.encoding is not None:
            return harmony_detokenizer()
        if self._detok is None:
            self._detok = Detokenizer(tokenizer_bytes(self.tokenizer))
        return self._detok.fresh()

    # -- the decode loop -------------------------------------------------------------------
    def _make_cache(self) -> list[Any]:
        return make_cache(self.model, **self.cache_options)

    def _gen_stream(self) -> Any:
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = mx.new_stream(mx.default_device())
        return stream

    def _reuse(self, prompt_ids: list[int]) -> tuple[list[Any], int]:
        """A cache holding the longest reusable prefix of ``prompt_ids``, and its length
        (a fresh cache and 0 when nothing can be reused)."""
        cache, common = self.prefix_cache.take(prompt_ids)
        if cache is None:
            return self._make_cache(), 0
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
            if progress is not None:
                progress(done, total)
        return prompt[done:]

    def _tokens(
        self,
        prompt_ids: list[int],
        sampler: Sampler,
        max_tokens: int,
        progress: Progress | None,
        logprobs: int | None = None,
    ) -> Iterator[tuple[int, TokenLogprob | None]]:
        """Yield sampled ids; step n+1 is built and queued while step n evaluates.

        On the way out the cache is kept, with the tokens it holds, for the next request.
        """
        cache, cached = self._reuse(prompt_ids)
        self.last_cached_tokens = cached
        rest = self._prefill(mx.array(prompt_ids[cached:], dtype=mx.int32), cache, progress)
        window = sampler.window(prompt_ids)
        generated: list[int] = []
        fed = 0  # generated tokens already run through the model (so in the cache)
        ok = False

        def step(tokens: mx.array) -> tuple[mx.array, Any]:
            nonlocal window
            with mx.stream(
                self._gen_stream()
            ):  # only while building: the caller's stream is untouched
                logits = self.model(tokens[None], cache=cache)[:, -1, :]
                if logprobs is None:
                    ids, lp = sampler.lazy(logits, window), None
                else:
                    ids, lp = sampler.lazy(logits, window, logprobs=logprobs)
                window = sampler.advance(window, ids)
            return ids, lp

        try:
            y, lp = step(rest)
            mx.async_eval(y, *([] if lp is None else vars(lp).values()))
            for n in range(max_tokens):
                if n + 1 < max_tokens:
                    nxt, nlp = step(y)
                    fed += 1
                    mx.async_eval(nxt, *([] if nlp is None else vars(nlp).values()))
                token = int(y.item())
                if token < 0:  # the kernel flagged the row: raise its error
                    check_ids(y)
                generated.append(token)
                info = None
                if lp is not None:
                    top = zip(
                        lp.top_ids.reshape(-1).tolist(),
                        lp.top_logprobs.reshape(-1).tolist(),
                        strict=True,
                    )
                    info = TokenLogprob(token, float(lp.logprob.item()), list(top))
                ok = True
                yield token, info
                ok = False
                if n + 1 < max_tokens:
                    y, lp = nxt, nlp
            ok = True
        finally:
            # A consumer that stops early (GeneratorExit) leaves a valid cache; an error does not.
            if ok and self.reuse_cache:
                self.prefix_cache.put(prompt_ids + generated[:fed], cache)

    # -- public API ------------------------------------------------------------------------
    def stream(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 512,
        progress: Progress | None = None,
        logprobs: int | None = None,
        stop: str | Sequence[str] | None = None,
        stop_tokens: Sequence[int | Sequence[int]] | None = None,
        include_stop: bool = False,
        ignore_eos: bool = False,
        truncate: bool = False,
        raw: bool = False,
        should_stop: Callable[[], bool] | None = None,
        **render_options: Any,
    ) -> Iterator[StreamEvent]:
        """Generate a reply, yielding text deltas per channel as they are decoded.

        The last event has ``finish_reason`` (``stop``, ``length`` or ``tool_calls``) and the
        full :class:`Completion`. ``logprobs=n`` records each token's log-probability and
        the top ``n`` alternatives. ``stop`` strings act on the final channel's text (never
        on reasoning): nothing that belongs to a stop string is streamed, generation stops
        when one completes, and the text before it is kept. ``stop_tokens`` adds token ids
        or id sequences to the model's own stop tokens; ``ignore_eos`` drops the model's own
        (for benchmarks that need exactly ``max_tokens``). ``render_options`` go to the Harmony renderer
        (``reasoning_effort``, ``model_identity``, ``tools``, ``tool_choice``, ...); a
        forced ``tool_choice`` opens the reply with the call's header.

        A prompt longer than the context window is an error, or with ``truncate=True`` the
        oldest turns (never system/developer messages or the last user turn) are dropped
        until the reply has room for ``max_tokens`` (at most half the window). ``raw=True``
        decodes the reply as plain text (no Harmony parsing; for raw completions).
        ``should_stop`` is polled after each token; when it returns True the reply ends
        with ``finish_reason="cancelled"``.
        """
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError("params must be a SamplingParams")
        t0 = time.perf_counter()
        prompt_ids = self.render(messages, **render_options)
        if truncate:
            prompt_ids = self._truncate(messages, prompt_ids, max_tokens, render_options)
        harmony = HarmonyStream(self.encoding) if self.encoding is not None and not raw else None
        if harmony is not None:
            primer = reply_primer(render_options.get("tool_choice"), render_options.get("tools"))
            for tok in primer:
                harmony.push(tok)
            prompt_ids = prompt_ids + primer
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if self.context_length:
            room = self.context_length - len(prompt_ids)
            if room < 1:
                raise ValueError(
                    f"the prompt has {len(prompt_ids)} tokens, more than the model's context "
                    f"window of {self.context_length}; shorten the conversation"
                )
            max_tokens = min(max_tokens, room)
        mx.reset_peak_memory()
        sampler = Sampler(params)
        stop_seqs = token_sequences(
            [*([] if ignore_eos else self._stop_ids()), *(stop_tokens or [])]
        )
        token_stops = TokenStops(stop_seqs) if stop_seqs else None
        own_stops = set() if ignore_eos else set(self._stop_ids())
        out = _Output(StopStrings(stop, include_stop=include_stop) if stop else None)
        detok = self._detokenizer() if harmony is None else None

        def decode(tok: int) -> list[Delta]:
            if harmony is not None:
                return harmony.push(tok)
            return [Delta("final", detok.push(tok))]

        generated: list[int] = []
        token_logprobs: list[TokenLogprob] | None = [] if logprobs is not None else None
        finish = "length"
        t_first = t0
        for tok, info in self._tokens(prompt_ids, sampler, max_tokens, progress, logprobs):
            if not generated:
                t_first = time.perf_counter()
            generated.append(tok)
            if token_logprobs is not None and info is not None:
                token_logprobs.append(info)
            hit = token_stops.push(tok) if token_stops is not None else None
            if hit is None or tok not in own_stops:  # the model's end token is not text
                yield from out.feed(decode(tok))
            if out.matched is not None:
                finish = "stop"
                break
            if hit is not None:
                finish = "tool_calls" if tok == CALL else "stop"
                break
            if should_stop is not None and should_stop():
                finish = "cancelled"
                break
        if out.matched is None:
            tail = harmony.finish() if harmony is not None else [Delta("final", detok.flush())]
            yield from out.feed(tail)
            if out.matched is not None:
                finish = "stop"
            yield from out.flush()
        calls = harmony.tool_calls() if harmony is not None else []
        if finish == "tool_calls" and not calls:
            finish = "stop"
        text, reasoning = out.text("final"), out.text("analysis")

        t_end = time.perf_counter()
        n = len(generated)
        ttft = t_first - t0
        decode_s = t_end - t_first
        timings = Timings(
            ttft_s=ttft,
            prefill_tokens_per_s=len(prompt_ids) / ttft if ttft > 0 else 0.0,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=t_end - t0,
            peak_memory_bytes=int(mx.get_peak_memory()),
        )
        completion = Completion(
            text=text,
            reasoning=reasoning,
            tool_calls=calls,
            finish_reason=finish,
            usage=Usage(
                prompt_tokens=len(prompt_ids),
                completion_tokens=n,
                cached_prompt_tokens=self.last_cached_tokens,
            ),
            timings=timings,
            tokens=generated,
            logprobs=token_logprobs,
            stop_sequence=out.matched,
        )
        yield StreamEvent(finish_reason=finish, completion=completion)

    def generate(
        self,
        messages: MessagesLike | Sequence[int],
        params: SamplingParams | None = None,
        *,
        max_tokens: int = 512,
        progress: Progress | None = None,
        **render_options: Any,
    ) -> Completion:
        """Generate a whole reply; same arguments as :meth:`stream`."""
        completion = None
        for event in self.stream(
            messages, params, max_tokens=max_tokens, progress=progress, **render_options
        ):
            completion = event.completion or completion
        assert completion is not None
        return completion


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
        and all(isinstance(t, int) for t in messages)
    )


def _role(m: Any) -> str:
    return m["role"] if isinstance(m, dict) else str(m.author.role.value)


class _Output:
    """Turns parsed deltas into events; user stop strings act on the final channel only."""

    def __init__(self, stops: StopStrings | None) -> None:
        self.stops = stops
        self.matched: str | None = None
        self._texts: dict[str, list[str]] = {}

    def _event(self, channel: str, text: str, recipient: str | None = None) -> StreamEvent:
        if recipient is None:
            self._texts.setdefault(channel, []).append(text)
        return StreamEvent(channel, text, recipient)

    def feed(self, deltas: list[Delta]) -> Iterator[StreamEvent]:
        for d in deltas:
            if self.matched is not None or not d.text:
                continue
            if self.stops is None or d.channel != "final" or d.recipient is not None:
                yield self._event(d.channel, d.text, d.recipient)
                continue
            safe, self.matched = self.stops.push(d.text)
            if safe:
                yield self._event("final", safe)

    def flush(self) -> Iterator[StreamEvent]:
        held = self.stops.flush() if self.stops is not None and self.matched is None else ""
        if held:
            yield self._event("final", held)

    def text(self, channel: str) -> str:
        return "".join(self._texts.get(channel, []))
