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
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

DRAFTERS = ("ngram", "draft")
NUM_DRAFT = 4  # a draft model's tokens guessed per step at most (adapted to its acceptance)
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
        return self.lookup(tokens, k)[0]

    def lookup(self, tokens: Sequence[int], k: int) -> tuple[list[int], int]:
        """The drafts and the length of the n-gram that found them (0: none found). A
        longer match is a far better guess (SmolLM2 copying: 12% of 1-gram drafts held,
        63% of 2-gram ones, 74% of 3-gram ones)."""
        n_tokens = len(tokens)
        for n in range(min(self.max_ngram, n_tokens - 1), self.min_ngram - 1, -1):
            tail = list(tokens[-n:])
            # The latest earlier occurrence: scan backwards, skipping the tail itself.
            for start in range(n_tokens - n - 1, -1, -1):
                if tokens[start] == tail[0] and list(tokens[start : start + n]) == tail:
                    follow = list(tokens[start + n : start + n + k])
                    if follow:
                        return follow, n
        return [], 0


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


# A row drafts its t-th token only while the chance that all t drafts hold is at least
# this: a drafted position costs the output head and its draw even when the row rides along.
MIN_CHANCE = 0.1
# Chance that a draft holds, given the drafts before it held, before anything is measured:
# by the n-gram's length for prompt lookup (measured on SmolLM2 copying texts of ~100
# tokens: 0.20 / 0.41 / 0.91; on short copies followed by free text 0.12 / 0.63 / 0.74),
# and for a draft model. A row's own measurements take over within a few steps.
NGRAM_PRIOR = (0.2, 0.4, 0.9)
MODEL_PRIOR = 0.5
# A measured chance never reaches 1: a copy ends without warning, and a wide step whose
# drafts all miss wastes its width.
MAX_RATE = 0.95
# Prompt lookup's drafts per step at most when a request does not say (its drafts cost
# nothing to find; how many are verified follows their chances and the pass's cost; vLLM
# and llama.cpp's lookup decoding draft up to ~10).
NGRAM_DRAFT = 10


class Speculation:
    """One request's speculation: its drafter and how often its drafts hold.

    Each draft holds with some chance given the drafts before it held; the chance is
    tracked per kind of guess (prompt lookup: by the length of the n-gram that found it;
    a draft model: one kind). :meth:`chances` turns it into the chance that the first t
    drafts all hold, which the batch's :class:`Pacer` weighs against what a wider verify
    step costs. ``k`` is the most this request drafts in one step.
    """

    def __init__(self, drafter: Any, num_draft: int = NUM_DRAFT) -> None:
        self.drafter = drafter
        self.k_max = num_draft
        self.k = num_draft
        self.drafted = 0
        self.accepted = 0
        self._rates: dict[int, float] = {}  # by kind of guess (EMA)
        self.retry_at = 0  # a draft model that did not pay tries again at this batch step
        self.backoff = 0  # plain steps before its next try (0: not backing off)

    def start(self, prompt: Sequence[int]) -> None:
        self.drafter.start(prompt)

    def propose(self, tokens: Sequence[int]) -> list[int]:
        return self.drafter.propose(tokens, self.k)

    def lookup(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """A cheap drafter's drafts (up to ``k_max``) and their kind (prompt lookup: the
        n-gram's length; a drafter without kinds: 0)."""
        lookup = getattr(self.drafter, "lookup", None)
        if lookup is None:
            return list(self.drafter.propose(tokens, self.k_max)), 0
        return lookup(tokens, self.k_max)

    def rate(self, kind: int = 0) -> float:
        """The chance that a draft of ``kind`` holds, given the drafts before it held."""
        rate = self._rates.get(kind)
        if rate is not None:
            return rate
        if isinstance(self.drafter, NgramDrafter):
            return NGRAM_PRIOR[min(max(kind, 1), len(NGRAM_PRIOR)) - 1]
        return MODEL_PRIOR

    def chances(self, k: int, kind: int = 0) -> list[float]:
        """The chance that the first t drafts all hold, for t = 1..k, cut where it falls
        below :data:`MIN_CHANCE` (those drafts are not worth their positions)."""
        rate, out, c = self.rate(kind), [], 1.0
        for _ in range(k):
            c *= rate
            if c < MIN_CHANCE:
                break
            out.append(c)
        return out

    def observe(self, drafted: int, accepted: int, kind: int = 0) -> None:
        """One verify step of this request: ``drafted`` guesses of ``kind``, ``accepted``
        of them kept (the caller counts :attr:`drafted` / :attr:`accepted` as it goes)."""
        if drafted <= 0:
            return
        # The guesses tried are those kept and the first miss; a fast average (a copy
        # starts and ends abruptly).
        tried = accepted + (accepted < drafted)
        rate = 0.5 * self.rate(kind) + 0.5 * (accepted / tried)
        self._rates[kind] = min(MAX_RATE, rate)


def best_width(
    chances: Sequence[Sequence[float]],
    per_token: float,
    per_draft: float = 0.0,
    measured: Mapping[int, float] | None = None,
) -> tuple[int, float]:
    """The verify step's width W (tokens per row; 1: a plain step) that emits the most
    tokens per unit of cost, and that gain over a plain step.

    ``chances[i][t-1]`` is the chance that row i's first t drafts all hold (rows without
    drafts: empty); a step of width W emits, per row, 1 + the sum of its chances up to
    W - 1, and its pass costs ``measured[W]`` plain steps where given, else
    ``1 + per_token * (W - 1)`` (``per_token``: each further token per row), plus
    ``per_draft * (W - 1)`` (each draft a draft model runs for its rows; 0 for prompt
    lookup). Passes need not cost linearly: a quantized matmul may switch kernels as
    rows grow.
    """
    if per_token < 0 or per_draft < 0:
        raise ValueError("step costs must be >= 0")
    rows = len(chances)
    if rows == 0:
        return 1, 1.0
    measured = measured or {}
    best, gain = 1, 1.0
    for w in range(2, 2 + max((len(c) for c in chances), default=0)):
        emitted = rows + sum(sum(c[: w - 1]) for c in chances)
        cost = measured.get(w, 1 + per_token * (w - 1)) + per_draft * (w - 1)
        g = emitted / rows / cost
        if g > gain:
            best, gain = w, g
    return best, gain


class Pacer:
    """What a batch's steps cost, measured, and whether a step verifies.

    Plain steps and verify passes are priced apart: a plain step (pipelined, and on some
    models a different code path: one token per row) by its rows, a verify pass by the
    tokens that go through it (rows x width). Each is kept where measured (EMA) and priced
    between its measured neighbours elsewhere (:meth:`plain_seconds`,
    :meth:`verify_seconds`). So a batch that shrinks as its rows finish weighs a verify
    step against a plain step of as many rows, and a quantized matmul that switches kernels
    past a few rows is priced as measured. A draft model's batched draft step is kept
    relative to a plain step (``per_draft``).

    :meth:`best` picks the width of the next verify step from the rows' chances (see
    :func:`best_width`); below :attr:`MARGIN` the batch decodes a plain stretch of
    :meth:`plain_steps` steps. Until a plain step is measured, costs are priors (a verify
    pass of 8 SmolLM2 rows: +0.28 of a plain step per token per row, CPU). ``steps`` is
    the batch's clock (plain and verify steps) for rows that rest.
    """

    MEASURE = 4  # plain steps in a measured stretch
    LOOK = 32  # plain steps between looks at every token (a glance after each read ends
    # a stretch sooner when drafts look worth it: a look costs a pipeline drain)
    RETRY = 4  # plain steps before a row that joined a plain stretch looks
    IDLE = 512  # plain steps between looks when no row can draft again
    MARGIN = 1.03  # a verify step must promise this much over a plain one
    PER_TOKEN = 0.28  # prior: a verify pass's cost per further token per row, in plain steps
    PER_DRAFT = 0.25  # prior: a draft model's batched step, in plain steps

    def __init__(self) -> None:
        self.plain_s: float | None = None  # seconds of the last plain steps measured (EMA)
        self.per_token = self.PER_TOKEN  # a further token per row, in plain steps (EMA)
        self.per_draft = self.PER_DRAFT
        self.draft_measured = False  # a draft model's step has been measured
        self.plain_by_rows: dict[int, float] = {}  # a plain step's seconds by rows (EMA)
        self.verify_by_tokens: dict[int, float] = {}  # a verify pass's seconds by tokens
        self.steps = 0  # plain steps and verify steps run (the batch's clock)
        self.verified = 0  # verify steps run

    def plain_seconds(self, rows: int) -> float | None:
        """A plain step's seconds for ``rows`` rows: measured, or linear between the
        nearest measured row counts; past them, never dearer than the nearest one (more
        rows) or than its share (fewer rows), so a guess leans to plain steps. None
        before a plain step is measured."""
        known = self.plain_by_rows
        if rows in known:
            return known[rows]
        if not known:
            return None
        below = [r for r in known if r < rows]
        above = [r for r in known if r > rows]
        if below and above:
            return _between(known, max(below), min(above), rows)
        if below:
            return known[max(below)]
        near = min(above)
        return known[near] * rows / near

    def verify_seconds(self, rows: int, width: int) -> float | None:
        """A verify pass's seconds for ``rows`` x ``width`` tokens: measured, or linear
        between the nearest measured token counts, or past them at the slope of the two
        nearest (one measured: the prior ``per_token`` of a plain step per token per
        row). None before a plain step is measured."""
        plain = self.plain_seconds(rows)
        if plain is None:
            return None
        tokens, known = rows * width, self.verify_by_tokens
        if tokens in known:
            return known[tokens]
        below = [t for t in known if t < tokens]
        above = [t for t in known if t > tokens]
        if below and above:
            return _between(known, max(below), min(above), tokens)
        near = sorted(below or above, key=lambda t: abs(t - tokens))[:2]
        prior = plain * self.per_token / rows  # seconds per further token
        if not near:
            return plain + prior * (tokens - rows)
        if len(near) == 2:
            t0, t1 = sorted(near)
            slope = max(prior, (known[t1] - known[t0]) / (t1 - t0))
        else:
            slope = prior
        return max(plain, known[near[0]] + slope * (tokens - near[0]))

    def costs(self, rows: int, widest: int) -> dict[int, float]:
        """A verify pass's cost by width (2..``widest``) for ``rows`` rows, in plain steps
        of as many rows; empty before a plain step is measured (then priors price it)."""
        plain = self.plain_seconds(rows) if rows > 0 else None
        if plain is None:
            return {}
        out = {}
        for w in range(2, widest + 1):
            s = self.verify_seconds(rows, w)
            if s is not None:
                out[w] = max(1.0, s / plain)
        return out

    def best(self, chances: Sequence[Sequence[float]], drafting: bool = False) -> tuple[int, float]:
        """The best width for rows with these ``chances`` and its gain over a plain step
        (see :func:`best_width`; ``drafting``: some rows draft with a draft model)."""
        per_draft = self.per_draft if drafting else 0.0
        widest = 1 + max((len(c) for c in chances), default=0)
        measured = self.costs(len(chances), widest)
        return best_width(chances, self.per_token, per_draft, measured)

    def could_pay(self) -> bool:
        """Whether a draft model as fast as measured could pay even if every draft held."""
        return (self.per_token + self.per_draft) * self.MARGIN < 1

    def needs_plain(self) -> bool:
        """Whether a plain step must be measured before the next verify step (a verify
        step ran, and its cost means nothing until a plain step's is known)."""
        return self.plain_s is None and self.verified > 0

    def plain_steps(self) -> int:
        """Plain steps to run before the next look: a measured stretch until a plain step
        was measured, then :attr:`LOOK`."""
        return self.MEASURE if self.plain_s is None else self.LOOK

    def record_plain(self, steps: int, seconds: float, rows: float = 1) -> None:
        """A plain stretch of ``steps`` steps of ``rows`` rows (on average) ran in
        ``seconds``."""
        if steps <= 0:
            return
        self.steps += steps
        self.plain_s = _ema(self.plain_s, seconds / steps)
        self._costs(max(1, round(rows)), 1, seconds / steps, 0, 0.0)

    def record_verify(
        self, width: int, seconds: float, drafts: int = 0, draft_s: float = 0.0, rows: int = 1
    ) -> None:
        """A verify step of ``rows`` rows x ``width`` tokens whose pass and draws took
        ``seconds``, after ``drafts`` batched draft-model steps that took ``draft_s``."""
        self.steps += 1
        self.verified += 1
        self._costs(rows, width, seconds, drafts, draft_s)

    def _costs(self, rows: int, width: int, seconds: float, drafts: int, draft_s: float) -> None:
        """Learn from one measured step (``width`` 1: a plain step)."""
        if width <= 1:
            self.plain_by_rows[rows] = _ema(self.plain_by_rows.get(rows), seconds)
            return
        tokens = rows * width
        self.verify_by_tokens[tokens] = _ema(self.verify_by_tokens.get(tokens), seconds)
        plain = self.plain_seconds(rows)
        if plain is None:
            return
        cost = max(1.0, self.verify_by_tokens[tokens] / plain)
        self.per_token = _ema(self.per_token, max(0.02, (cost - 1) / (width - 1)))
        if drafts > 0:  # the first measurement replaces the prior: one try settles could_pay
            measured = min(10.0, draft_s / drafts / plain)
            self.per_draft = _ema(self.per_draft if self.draft_measured else None, measured)
            self.draft_measured = True


def _between(known: Mapping[int, float], lo: int, hi: int, at: int) -> float:
    return known[lo] + (known[hi] - known[lo]) * (at - lo) / (hi - lo)


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
    default = NGRAM_DRAFT if speculative == "ngram" else NUM_DRAFT
    k = default if num_draft is None else num_draft
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
