"""One request's failure is its own: every kind of per-row failure, injected in prefill and
in decode, batched and alone, ends that request only; its neighbours decode exactly the tokens
they decode alone, and the scheduler goes on with the next requests."""

from __future__ import annotations

import mlx.core as mx  # noqa: I001  (after the package: it routes MLX's BLAS)
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.errors import InvalidRequestError
from mlx_harmony_core.sampling import Sampler

GREEDY = mhc.SamplingParams(temperature=0.0)
SEEDED = mhc.SamplingParams(temperature=0.8, top_p=0.9, seed=7)
PENALIZED = mhc.SamplingParams(temperature=0.7, seed=11, presence_penalty=0.5)
GOOD = [
    ([{"role": "user", "content": "Tell me about the sea. " * 3}], GREEDY, 30),
    ([{"role": "user", "content": "rain"}], SEEDED, 24),
    ([{"role": "user", "content": "A long story about bees. " * 9}], PENALIZED, 36),
]
BAD_PROMPT = [{"role": "user", "content": "the bad neighbour " * 4}]
AT = {"prefill": 0, "decode": 5}  # the reply token at which the failure strikes


class Boom(RuntimeError):
    pass


def _at_step(step: int, then):
    """A logits processor that passes logits through until the reply has ``step`` tokens."""
    state = {"n": 0}

    def fn(tokens, logits):
        k = state["n"]
        state["n"] += 1
        return then(logits) if k == step else logits

    return fn


def _raise(_logits):
    raise Boom("the processor broke")


def _mask_at(step: int, bad):
    def fn(generated):
        return bad() if len(generated) == step else None

    return fn


def _raise_mask():
    raise Boom("the mask source broke")


class _LateBadSampler(Sampler):
    """Sampler options that stop fitting the vocabulary at draw ``at`` (a request that
    changed after its checks)."""

    def __init__(self, params, at):
        super().__init__(params)
        self.at = at

    def next_options(self, logprobs=None):
        if self._counter == self.at:
            self.params = self.params.model_copy(update={"top_k": 10**6})
            self._options.top_k = 10**6
        return super().next_options(logprobs)


def _count_calls(obj, name, step, exc):
    """Make ``obj.name`` raise ``exc`` on its ``step``-th call."""
    orig = getattr(obj, name)
    state = {"n": 0}

    def fn(*a, **k):
        n = state["n"]
        state["n"] += 1
        if n == step:
            raise exc
        return orig(*a, **k)

    setattr(obj, name, fn)


def _bad_request(engine, kind: str, at: int):
    """A request that fails, its own way, at reply token ``at``; and the error expected."""
    kw: dict = {"max_tokens": 40, "ignore_eos": True}
    expect: type[BaseException] | tuple = Boom
    if kind == "processor":
        kw["logits_processors"] = [_at_step(at, _raise)]
    elif kind == "processor_shape":
        kw["logits_processors"] = [_at_step(at, lambda lg: lg[:, :10])]
        expect = InvalidRequestError
    elif kind == "nan":
        kw["logits_processors"] = [_at_step(at, lambda lg: lg * mx.nan)]
        expect = ValueError
    elif kind == "mask":
        kw["token_mask"] = _mask_at(at, _raise_mask)
    elif kind == "mask_shape":
        kw["token_mask"] = _mask_at(at, lambda: np.zeros(3, np.uint32))
        expect = InvalidRequestError
    elif kind == "all_masked":
        kw["token_mask"] = _mask_at(at, lambda: np.zeros((engine.vocab_size + 31) // 32, np.uint32))
        expect = ValueError
    elif kind == "grammar":
        kw["response_format"] = {"type": "json_object"}
    req = engine.request(BAD_PROMPT, SEEDED, **kw)
    if kind == "grammar":
        _count_calls(req.guide, "mask", at, Boom("the grammar broke"))
    elif kind == "parser":  # the reply parser (tool calls, channels) of this request
        _count_calls(req.parser, "push", at, Boom("the parser broke"))
    elif kind == "sampler":
        req.sampler = _LateBadSampler(SEEDED, at)
        expect = ValueError
    return req, expect


KINDS = [
    "processor",
    "processor_shape",
    "nan",
    "mask",
    "mask_shape",
    "all_masked",
    "grammar",
    "parser",
    "sampler",
]


def _good(engine):
    return [
        engine.request(p, params, max_tokens=n, ignore_eos=True, logprobs=2)
        for p, params, n in GOOD
    ]


@pytest.fixture(scope="module")
def engine():
    return mhc.load("demo", prefix_cache_entries=0)


@pytest.fixture(scope="module")
def alone(engine):
    engine.batching(max_batch=8, prefill_chunk=16)
    out = [engine.batching().submit(r).result(timeout=120) for r in _good(engine)]
    return [(c.tokens, [lp.logprob for lp in c.logprobs]) for c in out]


def _same(completion, ref):
    tokens, logprobs = ref
    assert completion.tokens == tokens
    assert completion.finish_reason == "length"
    assert np.allclose([lp.logprob for lp in completion.logprobs], logprobs, atol=1e-4)


@pytest.mark.parametrize("where", ["prefill", "decode"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_failing_row_leaves_its_batch_unchanged(engine, alone, kind, where):
    sched = engine.batching()
    good = _good(engine)
    bad, expect = _bad_request(engine, kind, AT[where])
    # The bad request joins between the good ones: it prefills beside running rows.
    handles = [sched.submit(good[0]), sched.submit(bad), sched.submit(good[1])]
    handles.append(sched.submit(good[2]))
    with pytest.raises(expect):
        handles[1].result(timeout=120)
    for h, ref in zip([handles[0], *handles[2:]], alone, strict=True):
        _same(h.result(timeout=120), ref)
    assert sched.pending == 0


@pytest.mark.parametrize("where", ["prefill", "decode"])
@pytest.mark.parametrize("kind", ["processor", "nan", "mask", "grammar", "sampler"])
def test_a_failing_request_alone_ends_and_the_next_runs(engine, alone, kind, where):
    sched = engine.batching()
    bad, expect = _bad_request(engine, kind, AT[where])
    with pytest.raises(expect):
        sched.submit(bad).result(timeout=120)
    _same(sched.submit(_good(engine)[0]).result(timeout=120), alone[0])
    assert sched.pending == 0


@pytest.mark.parametrize("kind", ["processor", "nan", "sampler"])
def test_a_failing_request_through_generate_and_the_next_runs(kind):
    engine = mhc.load("demo")
    p, params, n = GOOD[0]
    ref = engine.generate(p, params, max_tokens=n, ignore_eos=True)
    engine.reset_cache()
    bad, expect = _bad_request(engine, kind, AT["decode"])
    with pytest.raises(expect):
        for _ in engine.run(bad):
            pass
    again = engine.generate(p, params, max_tokens=n, ignore_eos=True)
    assert again.tokens == ref.tokens


def test_a_speculative_request_that_fails_alone_leaves_the_next_unchanged(engine, alone):
    sched = engine.batching()
    kw = {"max_tokens": 40, "ignore_eos": True, "speculative": "ngram"}
    kw["logits_processors"] = [_at_step(AT["decode"], _raise)]
    with pytest.raises(Boom):
        sched.submit(engine.request(BAD_PROMPT, SEEDED, **kw)).result(timeout=120)
    _same(sched.submit(_good(engine)[0]).result(timeout=120), alone[0])


def test_a_failing_sink_cancels_its_request_only(engine, alone):
    sched = engine.batching()
    seen = []

    def sink(item):
        seen.append(item)
        if len(seen) == 3:
            raise Boom("the consumer went away")

    good = _good(engine)
    handles = [sched.submit(good[0])]
    bad = sched.submit(
        engine.request(BAD_PROMPT, SEEDED, max_tokens=40, ignore_eos=True), sink=sink
    )
    handles += [sched.submit(r) for r in good[1:]]
    for h, ref in zip(handles, alone, strict=True):
        _same(h.result(timeout=120), ref)
    assert bad.cancelled and bad.done


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"params": mhc.SamplingParams(logit_bias={201088: 5})}, "logit_bias"),
        ({"params": mhc.SamplingParams(top_k=201089)}, "top_k"),
        ({"logprobs": 201089}, "logprobs"),
        ({"stop_tokens": [201088]}, "stop_tokens"),
        ({"stop_tokens": [[5, -1]]}, "stop_tokens"),
    ],
)
def test_what_does_not_fit_the_model_is_refused_before_it_runs(engine, kw, needle):
    params = kw.pop("params", None)
    with pytest.raises(InvalidRequestError, match=needle) as err:
        engine.submit(BAD_PROMPT, params, max_tokens=4, **kw)
    assert err.value.param == needle
    assert engine.batching().pending == 0


def test_a_request_built_by_hand_is_checked_at_submit(engine):
    req = engine.request(BAD_PROMPT, GREEDY, max_tokens=4)
    req.prompt_ids = [*req.prompt_ids, engine.vocab_size]
    with pytest.raises(InvalidRequestError, match="prompt has token id 201088"):
        engine.batching().submit(req)


class _BreaksOnce:
    """The demo model, whose forward pass raises once on a batched decode step."""

    def __init__(self, model):
        self.model, self.armed = model, False

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None):
        if self.armed and inputs.shape[0] > 1:
            self.armed = False
            raise RuntimeError("the shared forward pass broke")
        return self.model(inputs, cache=cache)


def test_a_broken_shared_forward_pass_fails_the_batch_and_the_next_run(engine, alone):
    broken = _BreaksOnce(engine.model)
    other = mhc.Engine(
        broken, chat_format=engine.chat_format, config=engine.config, prefix_cache_entries=0
    )
    sched = other.batching(max_batch=8)
    first = [sched.submit(r) for r in _good(other)]
    broken.armed = True
    for h in first:
        with pytest.raises(RuntimeError, match="shared forward pass"):
            h.result(timeout=120)
    again = [sched.submit(r) for r in _good(other)]
    for h, ref in zip(again, alone, strict=True):
        _same(h.result(timeout=120), ref)
    assert sched.pending == 0
