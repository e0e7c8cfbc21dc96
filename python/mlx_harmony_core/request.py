"""One request in flight: everything a decode loop advances one token at a time.

:class:`Request` holds the prompt, the sampler and its penalty window, the logits processors
and token mask, the stop matchers, the reply parser, the output so far, usage, timings and
cancellation. ``Engine.generate`` and ``Engine.stream`` drive one; a batching scheduler can
drive many from one loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from .chat_format import ANSWER, REASONING, ChatFormat, Delta
from .errors import InvalidRequestError
from .messages import ToolCall
from .options import RequestOptions
from .params import SamplingParams
from .sampling import LogProbs, Sampler, as_mask, check_ids
from .stopping import StopStrings, TokenStops, token_sequences
from .structured import Guide

# mlx-lm's convention: fn(tokens so far (prompt + reply), logits (1, V)) -> logits.
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]
# A token-mask source: the reply so far -> packed allowed-token bitmask (None = no limit).
TokenMask = Callable[[Sequence[int]], "np.ndarray | mx.array | None"]


@dataclass
class Usage:
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    drafted_tokens: int = 0  # speculative decoding: tokens guessed
    accepted_tokens: int = 0  # ... and kept
    reasoning_tokens: int = 0  # generated tokens of the reasoning's text

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
    """The result of :meth:`Engine.generate`: ``text`` is the answer, ``reasoning`` the
    model's reasoning (GPT-OSS's analysis channel)."""

    text: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: str
    usage: Usage
    timings: Timings
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None
    # The logprobs of the answer's tokens only (no control, reasoning or tool-call tokens).
    content_logprobs: list[TokenLogprob] | None = None
    # Built-in tool calls the engine ran in this reply (tool_loop.BuiltinCall), in order.
    builtin_calls: list[Any] = field(default_factory=list)
    # With the browser: the answer with its citations resolved, and url_citation annotations.
    cited: tuple[str, list[dict[str, Any]]] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usage"]["total_tokens"] = self.usage.total_tokens
        return out


@dataclass
class StreamEvent:
    """One step of :meth:`Engine.stream`: a text delta, or (last) the finish.

    ``kind`` is ``"answer"``, ``"reasoning"`` or ``"tool_call"`` for every model;
    ``channel`` is the chat format's own name for it (Harmony's ``final``, ``analysis``,
    ``commentary``). With ``logprobs`` asked for, an answer delta's ``logprobs`` are those
    of the tokens whose text it carries (concatenated, their bytes are the delta's; a
    token whose text is held back, by a stop string or an unfinished UTF-8 character,
    comes with the delta that releases it). ``call_id``: a tool-call delta's call.
    """

    channel: str = "final"
    delta: str = ""
    recipient: str | None = None
    finish_reason: str | None = None
    completion: Completion | None = None
    kind: str = ANSWER
    logprobs: list[TokenLogprob] | None = None
    call_id: str | None = None


class Request:
    """A reply being generated: feed it sampled tokens, read events and, at the end, the
    :class:`Completion`."""

    def __init__(
        self,
        chat_format: ChatFormat,
        prompt_ids: list[int],
        params: SamplingParams,
        options: RequestOptions | None = None,
        *,
        max_tokens: int | None = None,
        primer: Sequence[int] = (),
        guide: Guide | None = None,
        speculation: Any = None,
        started: float | None = None,
    ) -> None:
        o = options if options is not None else RequestOptions()
        self.options = o
        self.format = chat_format
        self.prompt_ids = prompt_ids
        # ``max_tokens``: the options' limit cut to the room in the context window.
        self.max_tokens = max_tokens if max_tokens is not None else o.max_tokens
        self.asked_max_tokens = o.max_tokens
        self.logprobs = o.logprobs
        self.sampler = Sampler(params)
        self.processors: list[LogitsProcessor] = list(o.logits_processors or [])
        self.token_mask: TokenMask | None = o.token_mask
        self.guide = guide
        self.speculation = speculation  # a speculative.Speculation, or None
        self.should_stop = o.should_stop
        # Called as prompt chunks run: (tokens done, prompt length); on the decode thread.
        self.progress: Callable[[int, int], None] | None = None
        own = [] if o.ignore_eos else chat_format.stop_ids()
        seqs = token_sequences([*own, *(o.stop_tokens or [])])
        self.token_stops = TokenStops(seqs) if seqs else None
        self.own_stops = set(own)
        self._stop_ids = [t for seq in seqs for t in seq]
        self.parser = chat_format.parser(primer, raw=o.raw)
        stop = o.stop
        self.out = _Output(StopStrings(stop, include_stop=o.include_stop) if stop else None)
        self.generated: list[int] = []
        self.token_logprobs: list[TokenLogprob] | None = [] if o.logprobs is not None else None
        # Logprobs of the answer's text (see StreamEvent): per generated token (None where
        # none was drawn), answer tokens whose text is not yet out, answer events held
        # until their text ends on a token boundary, and those handed out.
        self._lps: list[TokenLogprob | None] | None = [] if o.logprobs is not None else None
        self._pending: list[tuple[TokenLogprob, int]] = []
        self._held: list[StreamEvent] = []
        self.content_logprobs: list[TokenLogprob] | None = [] if o.logprobs is not None else None
        self.reasoning_tokens = 0
        self.finish: str | None = None
        self.cached_tokens = 0
        # A tool loop's hooks (see tool_loop.py): ``hold_cache(tokens, cache) -> bool`` takes
        # the finished row's cache for the reply's continuation; ``take_cache(prompt)`` gives
        # the continuation that cache (else the prefix cache's) as ``(cache, cached tokens)``.
        self.hold_cache: Callable[[list[int], list[Any]], bool] | None = None
        self.take_cache: Callable[[Sequence[int]], tuple[list[Any], int]] | None = None
        self.t0 = started if started is not None else time.perf_counter()
        self.t_first = self.t0
        self._window = self.sampler.window(prompt_ids)
        self._tokens = mx.array(prompt_ids, dtype=mx.int32) if self.processors else None

    def check(self, vocab: int) -> None:
        """Raise :class:`InvalidRequestError` for anything that does not fit a model with
        ``vocab`` logits (token ids, logit bias, ``top_k``, ``logprobs``): checked before the
        request is admitted, so that no bad request reaches a step it shares with others."""
        self.sampler.check(vocab, self.logprobs)
        for what, ids in (("prompt", self.prompt_ids), ("stop_tokens", self._stop_ids)):
            if not ids:
                continue
            arr = np.asarray(ids, dtype=np.int64)
            bad = arr[(arr < 0) | (arr >= vocab)]
            if bad.size:
                raise InvalidRequestError(
                    f"{what} has token id {int(bad[0])}, outside this model's vocabulary "
                    f"[0, {vocab})",
                    param=what,
                )

    def clamp_note(self) -> str | None:
        """A line for the user when ``max_tokens`` was cut to the room in the context."""
        if self.asked_max_tokens <= self.max_tokens:
            return None
        return (
            f"note: max_tokens {self.asked_max_tokens} is more than the {self.max_tokens} "
            "tokens left in the context window; generating at most "
            f"{self.max_tokens}"
        )

    @property
    def sync(self) -> bool:
        """True when each step's sampling needs the previous token on the host (a token
        mask, a grammar): the forward pass is still queued ahead, the draw after the read."""
        return self.token_mask is not None or self.guide is not None

    # -- sampling (lazy: a pipelined loop builds step n+1 before step n is read) -----------
    def prepare(self, logits: mx.array) -> tuple[mx.array, mx.array | None]:
        """``logits`` (1, V) after the logits processors, and this step's token mask
        (both checked: a processor or mask source of the wrong shape is this request's
        :class:`InvalidRequestError`, never a batch's)."""
        out = logits
        for fn in self.processors:
            out = fn(self._tokens, out)
        if not isinstance(out, mx.array) or out.shape != logits.shape:
            shape = getattr(out, "shape", type(out).__name__)
            raise InvalidRequestError(
                f"a logits processor returned {shape}; it must return logits of shape "
                f"{tuple(logits.shape)}"
            )
        mask = self.token_mask(self.generated) if self.token_mask is not None else None
        if self.guide is not None:
            own = self.guide.mask()
            if own is not None:
                mask = own if mask is None else np.bitwise_and(np.asarray(mask), own)
        if mask is None:
            return out, None
        mask = as_mask(mask)
        words = (logits.shape[-1] + 31) // 32
        if mask.size != words or mask.dtype not in (mx.uint32, mx.int32):
            raise InvalidRequestError(
                f"a token mask has {mask.size} {mask.dtype} words; it must have {words} "
                "uint32 words (see sampling.pack_mask)"
            )
        return out, mask

    @property
    def window(self) -> mx.array | None:
        """The penalty window (1, W) the next draw looks at (None without penalties)."""
        return self._window

    def advance(self, ids: mx.array) -> None:
        """Record the id just drawn (lazy) in the penalty window and processors' tokens."""
        self._window = self.sampler.advance(self._window, ids)
        if self._tokens is not None:
            self._tokens = mx.concatenate([self._tokens, ids.reshape(-1).astype(mx.int32)])

    def sample(self, logits: mx.array) -> tuple[mx.array, LogProbs | None]:
        """The next token id (lazy) for ``logits`` of shape (1, V)."""
        logits, mask = self.prepare(logits)
        if self.logprobs is None:
            ids, lp = self.sampler.lazy(logits, self._window, mask=mask), None
        else:
            ids, lp = self.sampler.lazy(logits, self._window, logprobs=self.logprobs, mask=mask)
        self.advance(ids)
        return ids, lp

    # -- reading tokens ------------------------------------------------------------------
    def push(self, token: int, lp: LogProbs | None = None) -> Iterator[StreamEvent]:
        """Take one sampled token (evaluated); yield the text it completes. Sets
        :attr:`finish` when the reply is over."""
        if token < 0:  # the kernel flagged the row: raise its error
            check_ids(mx.array([token]))
        if not self.generated:
            self.t_first = time.perf_counter()
        self.generated.append(token)
        if self.guide is not None:
            self.guide.push(token)
        entry = None
        if self.token_logprobs is not None and lp is not None:
            top = zip(
                lp.top_ids.reshape(-1).tolist(), lp.top_logprobs.reshape(-1).tolist(), strict=True
            )
            entry = TokenLogprob(token, float(lp.logprob.item()), list(top))
            self.token_logprobs.append(entry)
        if self._lps is not None:
            self._lps.append(entry)
        hit = self.token_stops.push(token) if self.token_stops is not None else None
        if hit is None or token not in self.own_stops:  # the model's end token is not text
            deltas = self.parser.push(token)
            self._claim()
            yield from self._attach(self.out.feed(deltas))
        if self.out.matched is not None:
            self.finish = "stop"
        elif hit is not None:
            self.finish = self.format.finish_reason(token)
        elif len(self.generated) >= self.max_tokens:
            self.finish = "length"
        elif self.should_stop is not None and self.should_stop():
            self.finish = "cancelled"

    def close(self, *, peak_memory: int = 0) -> Iterator[StreamEvent]:
        """End the reply: flush held text and yield the last event, with the completion."""
        finish = self.finish or "length"
        if self.out.matched is None:
            deltas = self.parser.finish()
            self._claim()
            yield from self._attach(self.out.feed(deltas))
            if self.out.matched is not None:
                finish = "stop"
            yield from self._attach(self.out.flush())
        yield from self._release(final=True)
        calls = self.parser.tool_calls()
        if finish == "tool_calls" and not calls:
            finish = "stop"
        t_end = time.perf_counter()
        n = len(self.generated)
        ttft = self.t_first - self.t0
        decode_s = t_end - self.t_first
        timings = Timings(
            ttft_s=ttft,
            prefill_tokens_per_s=len(self.prompt_ids) / ttft if ttft > 0 else 0.0,
            decode_s=decode_s,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=t_end - self.t0,
            peak_memory_bytes=peak_memory,
        )
        completion = Completion(
            text=self.out.text(ANSWER),
            reasoning=self.out.text(REASONING),
            tool_calls=calls,
            finish_reason=finish,
            usage=Usage(
                len(self.prompt_ids),
                n,
                self.cached_tokens,
                getattr(self.speculation, "drafted", 0),
                getattr(self.speculation, "accepted", 0),
                self.reasoning_tokens,
            ),
            timings=timings,
            tokens=self.generated,
            logprobs=self.token_logprobs,
            stop_sequence=self.out.matched,
            content_logprobs=self.content_logprobs,
        )
        yield StreamEvent(finish_reason=finish, completion=completion)

    # -- the answer's logprobs -----------------------------------------------------------
    def _claim(self) -> None:
        """Note the tokens the parser just made text of (see ``ReplyParser.claimed``):
        reasoning tokens are counted, answer tokens wait for their text."""
        n = len(self.generated)
        for off, kind in getattr(self.parser, "claimed", ()):
            if kind == REASONING:
                self.reasoning_tokens += 1
            elif kind == ANSWER and self._lps is not None:
                i = n - 1 - off  # a primer's tokens (not generated) have no logprob
                if 0 <= i < len(self._lps) and (entry := self._lps[i]) is not None:
                    size = len(self.format.token_bytes()[entry.token])
                    self._pending.append((entry, size))

    def _attach(self, events: Iterator[StreamEvent]) -> Iterator[StreamEvent]:
        """``events`` with their answer tokens' logprobs (without logprobs: as they are).
        Answer text is held until it ends where a token ends, so that each delta carries
        exactly its tokens."""
        for ev in events:
            if self._lps is None:
                yield ev
            elif ev.kind == ANSWER and ev.recipient is None:
                if self._held and self._held[0].channel != ev.channel:
                    yield from self._release(final=True)
                self._held.append(ev)
                yield from self._release(final=False)
            else:
                yield from self._release(final=True)
                yield ev

    def _release(self, *, final: bool) -> Iterator[StreamEvent]:
        """The held answer text, with the logprobs of the tokens it completes: up to the
        last token boundary that is also a character boundary, or (``final``: the text
        will not grow) all of it, with every token it has part of (later ones wait)."""
        if not self._held:
            return
        data = "".join(e.delta for e in self._held).encode("utf-8")
        ends, pos = [], 0
        for _, size in self._pending:
            pos += size
            ends.append(pos)
        if final:
            take = sum(
                1 for e, (_, size) in zip(ends, self._pending, strict=True) if e - size < len(data)
            )
            cut = len(data)
        else:
            take, cut = 0, 0
            for k in range(len(ends) - 1, -1, -1):
                if ends[k] <= len(data):
                    try:
                        data[: ends[k]].decode("utf-8")
                    except UnicodeDecodeError:
                        continue
                    take, cut = k + 1, ends[k]
                    break
            if cut == 0:
                if len(self._pending) <= 8:
                    return
                # The text never ends on a token boundary (bytes the parser replaced):
                # hand it out with its tokens rather than hold the stream.
                yield from self._release(final=True)
                return
        lps = [entry for entry, _ in self._pending[:take]]
        channel = self._held[0].channel
        self._pending = self._pending[take:]
        rest = data[cut:].decode("utf-8")
        self._held = [StreamEvent(channel, rest, kind=ANSWER)] if rest else []
        assert self.content_logprobs is not None
        self.content_logprobs.extend(lps)
        yield StreamEvent(channel, data[:cut].decode("utf-8"), kind=ANSWER, logprobs=lps)


class _Output:
    """Turns parsed deltas into events; user stop strings act on the answer only."""

    def __init__(self, stops: StopStrings | None) -> None:
        self.stops = stops
        self.matched: str | None = None
        self._texts: dict[str, list[str]] = {}

    def _event(self, d: Delta, text: str) -> StreamEvent:
        if d.recipient is None:
            self._texts.setdefault(d.kind, []).append(text)
        return StreamEvent(d.channel, text, d.recipient, kind=d.kind, call_id=d.call_id)

    def feed(self, deltas: list[Delta]) -> Iterator[StreamEvent]:
        for d in deltas:
            if self.matched is not None or not d.text:
                continue
            if self.stops is None or d.kind != ANSWER or d.recipient is not None:
                yield self._event(d, d.text)
                continue
            safe, self.matched = self.stops.push(d.text)
            if safe:
                yield self._event(d, safe)

    def flush(self) -> Iterator[StreamEvent]:
        held = self.stops.flush() if self.stops is not None and self.matched is None else ""
        if held:
            yield self._event(Delta("final", held), held)

    def text(self, kind: str) -> str:
        return "".join(self._texts.get(kind, []))
