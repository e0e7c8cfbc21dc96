"""The sampler's hooks: the packed token mask (never violated) and mlx-lm's logits
processors."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_harmony_core as mhc
from mlx_harmony_core.params import SamplingParams
from mlx_harmony_core.sampling import pack_mask
from support.reference import process, reference_probs
from support.stats import assert_distribution


# -- token mask ---------------------------------------------------------------------------------
def test_pack_mask_layout():
    allowed = np.random.default_rng(0).random((3, 70)) < 0.5
    packed = pack_mask(allowed)
    assert packed.shape == (3, 3) and packed.dtype == np.uint32
    bits = (packed[:, np.arange(70) // 32] >> (np.arange(70) % 32).astype(np.uint32)) & 1
    assert (bits.astype(bool) == allowed).all()


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "mlx-ops"])
@pytest.mark.parametrize(
    "controls",
    [
        dict(temperature=0.0),
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=3),
        dict(temperature=1.2, top_p=0.8),
        dict(temperature=1.0, min_p=0.1, logit_bias={0: 5.0, 3: 2.0}),
        dict(temperature=0.9, xtc_probability=0.5, xtc_threshold=0.05),
        dict(temperature=1.0, repetition_penalty=1.5, presence_penalty=0.5),
    ],
)
def test_random_masks_against_the_reference(kernel, controls):
    rng = np.random.default_rng(hash(str(controls)) % 2**32)
    vocab = 40
    for _ in range(3):
        logits = rng.normal(scale=2.0, size=vocab).astype(np.float32)
        allowed = rng.random(vocab) < 0.4
        allowed[rng.integers(vocab)] = True
        history = [1, 2, 2, 5] if "repetition_penalty" in controls else None
        p = {k: v for k, v in controls.items()}
        expected_x = process(
            logits,
            bias=p.get("logit_bias"),
            history=history,
            **{k: v for k, v in p.items() if k in ("repetition_penalty", "presence_penalty")},
        )
        expected_x[~allowed] = -np.inf
        keys = ("temperature", "top_k", "top_p", "min_p", "xtc_probability", "xtc_threshold")
        expected = reference_probs(expected_x, **{k: v for k, v in p.items() if k in keys})
        rows = 20000
        x = mx.broadcast_to(mx.array(logits), (rows, vocab))
        mask = np.broadcast_to(pack_mask(allowed), (rows, 2))
        sampler = mhc.Sampler(SamplingParams(seed=3, **controls), kernel=kernel)
        ids = np.array(sampler(x, history, mask=mask))
        assert allowed[ids].all(), "a masked token was drawn"
        assert_distribution(ids, expected)


@pytest.mark.parametrize("kernel", [True, False], ids=["kernel", "mlx-ops"])
def test_mask_bad_inputs_and_all_masked(kernel):
    s = mhc.Sampler(SamplingParams(temperature=1.0, seed=1), kernel=kernel)
    x = mx.zeros((2, 40))
    with pytest.raises(ValueError, match="token mask must have shape"):
        s(x, mask=np.zeros((2, 1), np.uint32))
    with pytest.raises(ValueError, match="masked"):
        s(x, mask=np.zeros((2, 2), np.uint32))


def test_engine_token_mask_is_never_violated(demo_engine):
    allowed = np.zeros(demo_engine.vocab_size, bool)
    allowed[[1000, 2000, 3000]] = True
    seen = []

    def mask(generated):
        seen.append(len(generated))
        return pack_mask(allowed)

    c = demo_engine.generate(
        [1, 2, 3],
        SamplingParams(temperature=1.0, seed=0),
        max_tokens=12,
        token_mask=mask,
        ignore_eos=True,
    )
    assert set(c.tokens) <= {1000, 2000, 3000} and seen == list(range(12))


# -- logits processors --------------------------------------------------------------------------
def test_logits_processors_match_mlx_lm(demo_engine):
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors

    prompt = mx.array(demo_engine.render("Say something"))

    def make():
        return make_logits_processors({5: 3.0}, repetition_penalty=1.4, repetition_context_size=16)

    theirs = []
    for tok, _ in generate_step(
        prompt,
        demo_engine.model,
        max_tokens=24,
        logits_processors=make(),
        sampler=lambda x: mx.argmax(x, -1),
    ):
        theirs.append(int(tok))
    demo_engine.reset_cache()
    ours = demo_engine.generate(
        prompt.tolist(),
        SamplingParams(temperature=0.0),
        max_tokens=24,
        ignore_eos=True,
        logits_processors=make(),
    ).tokens
    assert ours == theirs
