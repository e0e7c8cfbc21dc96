"""Exact speculative decoding: guess the next k tokens cheaply, verify them in one forward pass.

Drafts here are deterministic (an n-gram found earlier in the prompt or the reply, or a draft
model's greedy tokens), so the speculative-sampling rule (accept d with probability
min(1, p(d)/q(d)), else draw from the residual) becomes "draw from the target's distribution
and compare": q is a point mass, so d is kept with probability p(d), and a drawn token other
than d is distributed exactly as the residual p(t | t != d). The draw is the fused sampler's
own (every control applied, the same seeded key per position as plain decoding), so greedy
and seeded outputs are the plain decoder's tokens, only sooner.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

DRAFTERS = ("ngram", "draft")
NUM_DRAFT = 4  # tokens guessed per step at first (adapted to the acceptance rate)
MAX_DRAFT = 16


class NgramDrafter:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the reply's
    last ``n`` tokens (the longest ``n`` from ``max_ngram`` down to ``min_ngram`` that
    occurs), in the prompt and the reply so far. No second model; strong when the reply
    quotes, copies or edits its input."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def start(self, prompt: Sequence[int]) -> None:
        pass

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        n_tokens = len(tokens)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = list(tokens[-n:])
            # The latest earlier occurrence: scan backwards, skipping the tail itself.
            for start in range(n_tokens - n - 1, -1, -1):
                if tokens[start] == tail[0] and list(tokens[start : start + n]) == tail:
                    follow = list(tokens[start + n : start + n + k])
                    if follow:
                        return follow
        return []


class ModelDrafter:
    """A smaller model with the target's vocabulary drafts greedily on its own cache, kept in
    step with the accepted tokens (rewound where drafts were rejected)."""

    name = "draft"

    def __init__(self, model: Any, cache_options: dict[str, Any] | None = None) -> None:
        self.model = model
        self.cache_options = dict(cache_options or {})
        self.cache: list[Any] | None = None
        self.fed: list[int] = []  # tokens in the draft cache

    def start(self, prompt: Sequence[int]) -> None:
        from .kv_cache import make_cache

        self.cache = make_cache(self.model, **self.cache_options)
        self.fed = list(prompt[:-1])  # prefilled with the target's prompt, in chunks
        for i in range(0, len(self.fed), 512):
            self.model(mx.array(self.fed[i : i + 512], dtype=mx.int32)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        assert self.cache is not None
        common = 0
        limit = min(len(self.fed), len(tokens) - 1)
        while common < limit and self.fed[common] == tokens[common]:
            common += 1
        if common < len(self.fed):
            drop = len(self.fed) - common
            if any(c.trim(drop) != drop for c in self.cache):
                self.start(tokens)  # cannot rewind that far: start over on a fresh cache
                common = len(self.fed)
        new = list(tokens[common:])
        out: list[int] = []
        x = mx.array(new, dtype=mx.int32)[None]
        for _ in range(k):
            logits = self.model(x, cache=self.cache)[:, -1, :]
            token = int(mx.argmax(logits, axis=-1).item())
            out.append(token)
            x = mx.array([[token]], dtype=mx.int32)
        # The last draft was never fed: the cache holds the context and drafts but the last.
        self.fed = [*tokens, *out[:-1]]
        return out


class DraftBatch:
    """The rows of a batch that draft with one draft model, drafting together: one batched
    forward pass per draft token for all of them, on one batch cache where each row
    rewinds by its own amount. Rows join with the cache their drafter prefilled and leave
    when they stop drafting."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.cache: list[Any] | None = None
        self.members: list[ModelDrafter] = []

    def _leave_all_but(self, drafters: Sequence[ModelDrafter]) -> None:
        keep = [i for i, m in enumerate(self.members) if any(m is d for d in drafters)]
        if len(keep) == len(self.members):
            return
        for i, m in enumerate(self.members):
            if i not in keep:
                m.cache, m.fed = None, []  # its rows are in the batch cache: start over
        self.members = [self.members[i] for i in keep]
        if not keep:
            self.cache = None
        else:
            for layer in self.cache or []:
                layer.filter(keep)

    def _join(self, d: ModelDrafter, tokens: Sequence[int]) -> bool:
        from .kv_cache import make_batch_cache

        if d.cache is None:
            d.start(tokens)
        assert d.cache is not None
        if self.cache is None:
            self.cache = make_batch_cache(d.cache)
            if self.cache is None:  # caches that cannot batch: this drafter drafts alone
                return False
        for layer, c in zip(self.cache, d.cache, strict=True):
            layer.insert(c)
        d.cache = None
        self.members.append(d)
        return True

    def propose(
        self, drafters: Sequence[ModelDrafter], tokens: Sequence[Sequence[int]], ks: Sequence[int]
    ) -> list[list[int]]:
        """Each drafter's greedy drafts (``ks[i]`` of them) after ``tokens[i]``."""
        self._leave_all_but(drafters)
        if not drafters:
            return []
        for d, t in zip(drafters, tokens, strict=True):
            if not any(m is d for m in self.members) and not self._join(d, t):
                return [d.propose(t, k) for d, t, k in zip(drafters, tokens, ks, strict=True)]
        assert self.cache is not None
        at = {id(m): i for i, m in enumerate(self.members)}
        rows = [at[id(d)] for d in drafters]
        seqs: list[list[int]] = [[] for _ in self.members]
        for d, t in zip(drafters, tokens, strict=True):
            seqs[at[id(d)]] = list(t)
        # Catch up: each row rewinds to what it shares with its tokens, then feeds the rest.
        back, new = [], []
        for m, seq in zip(self.members, seqs, strict=True):
            common, limit = 0, min(len(m.fed), len(seq) - 1)
            while common < limit and m.fed[common] == seq[common]:
                common += 1
            back.append(len(m.fed) - common)
            new.append(seq[common:])
        for layer in self.cache:
            if list(layer.rewind(back)) != back:  # a window cannot rewind that far
                members = list(self.members)
                self.members, self.cache = [], None
                for m in members:
                    m.cache, m.fed = None, []
                return self.propose(drafters, tokens, ks)
        width = max(len(n) for n in new)
        x = mx.array([n + [0] * (width - len(n)) for n in new], dtype=mx.int32)
        logits = self.model(x, cache=self.cache)
        last = mx.array([len(n) - 1 for n in new], dtype=mx.int32)
        logits = mx.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        pads = [width - len(n) for n in new]
        if any(pads):
            for layer in self.cache:
                layer.rewind(pads)
        k = max(ks)
        out: list[list[int]] = [[] for _ in self.members]
        for step in range(k):
            ids = mx.argmax(logits, axis=-1)
            for i, t in enumerate(ids.tolist()):
                out[i].append(t)
            if step + 1 < k:
                logits = self.model(ids[:, None].astype(mx.int32), cache=self.cache)[:, -1, :]
        # The last draft was never fed: each cache holds the context and drafts but the last.
        for m, seq, o in zip(self.members, seqs, out, strict=True):
            m.fed = [*seq, *o[:-1]]
        return [out[r][:kk] for r, kk in zip(rows, ks, strict=True)]


class Speculation:
    """One request's speculation: its drafter, how many tokens to draft, and the counts.

    ``k`` follows this request's acceptance rate (see :meth:`observe`); whether its batch
    speculates at all is the batch's :class:`Pacer`'s call.
    """

    def __init__(self, drafter: Any, num_draft: int = NUM_DRAFT) -> None:
        self.drafter = drafter
        self.k_max = num_draft
        self.k = num_draft
        self.drafted = 0
        self.accepted = 0
        self._rate = 0.5  # acceptance per drafted token (EMA)

    def start(self, prompt: Sequence[int]) -> None:
        self.drafter.start(prompt)

    def propose(self, tokens: Sequence[int]) -> list[int]:
        return self.drafter.propose(tokens, self.k)

    def observe(self, drafted: int, accepted: int) -> None:
        """One verify step of this request: ``drafted`` guesses, ``accepted`` of them kept
        (the caller counts :attr:`drafted` / :attr:`accepted` as it goes)."""
        if drafted <= 0:
            return
        self._rate = 0.8 * self._rate + 0.2 * (accepted / drafted)
        # Draft about as far as the guesses usually hold, within [1, k_max].
        expected = self._rate / max(1e-3, 1 - self._rate)
        self.k = max(1, min(self.k_max, round(expected) + 1))


class Pacer:
    """Whether a batch speculates: it compares the measured seconds per emitted token of
    verify steps and of plain steps. The first step verifies, then a stretch of plain steps
    is measured; when verifying costs more per token, speculation pauses (16 plain steps,
    then 32, ...), and after three such tries in a row it stays off until the batch
    empties, so it is never much slower than plain decoding."""

    MEASURE = 8  # plain steps in a measured stretch
    RETRY = 16  # plain steps before a new speculative row tries again

    def __init__(self) -> None:
        self._spec_s: float | None = None  # seconds per emitted token, verifying (EMA)
        self._plain_s: float | None = None  # seconds per emitted token, plain steps (EMA)
        self._pause = 0
        self._backoff = 16
        self._fails = 0  # tries in a row that did not pay

    def plain_steps(self) -> int:
        """Plain steps to run now (0: verify): the measured stretch after the first verify
        step, and the pause when speculation has not been paying."""
        if self._plain_s is None and self._spec_s is not None:
            return self.MEASURE
        n, self._pause = self._pause, 0
        return n

    def joined(self) -> None:
        """A speculative request joined the batch: its drafts deserve new tries (the
        caller cuts a running plain stretch to :attr:`RETRY` steps)."""
        self._fails, self._backoff = 0, 16
        self._pause = min(self._pause, self.RETRY)

    def record(self, drafted: int, emitted: int, seconds: float) -> None:
        """A finished verify step (``drafted`` > 0) or plain stretch (``drafted`` 0) that
        emitted ``emitted`` tokens over all rows in ``seconds``."""
        per = seconds / max(1, emitted)
        if drafted == 0:
            self._plain_s = _ema(self._plain_s, per)
            return
        self._spec_s = _ema(self._spec_s, per)
        if self._plain_s is None:
            return
        if self._spec_s > 1.02 * self._plain_s:
            self._fails += 1
            # Three tries that did not pay: off (a draft model must also catch up on
            # every token it skipped, each time it tries again).
            self._pause = self._backoff if self._fails < 3 else 2**31
            self._backoff = min(256, self._backoff * 2)
            self._spec_s = None
        elif self._spec_s < self._plain_s:
            self._backoff, self._fails = 16, 0


def _ema(old: float | None, new: float) -> float:
    return new if old is None else 0.7 * old + 0.3 * new


def make_speculation(
    speculative: str | None = None,
    *,
    draft_model: Any = None,
    num_draft: int | None = None,
    vocab_size: int | None = None,
) -> Speculation | None:
    """The :class:`Speculation` for a request (``None``: plain decoding)."""
    if speculative is None:
        if draft_model is not None or num_draft is not None:
            raise InvalidRequestError(
                "draft_model / num_draft need speculative='ngram' or 'draft'",
                param="speculative",
            )
        return None
    if speculative not in DRAFTERS:
        raise InvalidRequestError(
            f"speculative must be one of {list(DRAFTERS)}, got {speculative!r}",
            param="speculative",
        )
    k = NUM_DRAFT if num_draft is None else num_draft
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_DRAFT:
        raise InvalidRequestError(
            f"num_draft must be an integer in [1, {MAX_DRAFT}], got {num_draft!r}",
            param="num_draft",
        )
    if speculative == "ngram":
        if draft_model is not None:
            raise InvalidRequestError(
                "draft_model goes with speculative='draft'", param="draft_model"
            )
        return Speculation(NgramDrafter(), k)
    if draft_model is None:
        raise InvalidRequestError("speculative='draft' needs a draft_model", param="draft_model")
    model = getattr(draft_model, "model", draft_model)  # an Engine or a model
    draft_vocab = getattr(draft_model, "vocab_size", None)
    if vocab_size is not None and draft_vocab is not None and draft_vocab != vocab_size:
        raise InvalidRequestError(
            f"the draft model's vocabulary ({draft_vocab} tokens) is not the target's "
            f"({vocab_size}): a draft model must share the target's tokenizer",
            param="draft_model",
        )
    return Speculation(ModelDrafter(model), k)
