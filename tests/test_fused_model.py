"""Models on the fused CPU primitives give the logits of MLX's own ops (within float32
rounding): prefill and decode steps over our caches, the GPT-OSS demo model (sinks, sliding
windows, YaRN RoPE) and the real SmolLM2 (Llama)."""

import mlx.core as mx
import numpy as np

import mlx_harmony_core as mhc
from mlx_harmony_core.cpu import fused
from mlx_harmony_core.kv_cache import make_cache


def _steps(model, prompt: list[int], steps: int) -> list[np.ndarray]:
    cache = make_cache(model)
    out = [model(mx.array(prompt)[None], cache=cache)[:, -1]]
    tok = prompt[-1]
    for _ in range(steps):
        logits = model(mx.array([[tok]]), cache=cache)[:, -1]
        out.append(logits)
        tok = int(mx.argmax(logits).item())
    mx.eval(out)
    return [np.array(o.astype(mx.float32)) for o in out]


def _compare(model, prompt, steps, rtol) -> None:
    ours = _steps(model, prompt, steps)
    with fused.fused(False):
        ref = _steps(model, prompt, steps)
    for a, b in zip(ours, ref, strict=True):
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=0, atol=rtol * scale)


class _Counting:
    """``_core`` with its fused ops counted (the layers really take the fused path)."""

    def __init__(self, core) -> None:
        self.core, self.calls = core, {}

    def __getattr__(self, name):
        fn = getattr(self.core, name)

        def counted(*args, **kwargs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return counted


def test_demo_model_fused_matches_mlx(demo_engine, monkeypatch):
    model = demo_engine.model
    counting = _Counting(fused._core)
    monkeypatch.setattr(fused, "_core", counting)
    assert isinstance(model.model.norm, fused.FusedRMSNorm)
    # Past the demo's sliding window so the rotating caches wrap.
    prompt = [int(t) for t in np.random.default_rng(0).integers(10, 1000, 150)]
    _compare(model, prompt, 6, rtol=1e-4 if model.model.norm.weight.dtype == mx.float32 else 2e-2)
    assert {"rms_norm", "rope", "scaled_dot_product_attention"} <= set(counting.calls)


def test_smollm2_fused_matches_mlx(smollm2_path):
    engine = mhc.load(smollm2_path)
    prompt = [int(t) for t in np.random.default_rng(1).integers(10, 40000, 60)]
    _compare(engine.model, prompt, 6, rtol=1e-4)


def test_switch_off_by_env(monkeypatch):
    monkeypatch.setenv(fused.ENV, "mlx")
    assert not fused.fused_enabled()
    monkeypatch.delenv(fused.ENV)
    assert fused.fused_enabled()
