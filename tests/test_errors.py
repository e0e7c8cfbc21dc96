"""Typed errors: each failure is raised as the type that names it."""

import pytest

import mlx_harmony_core as mhc


# -- errors -------------------------------------------------------------------------------------
def test_errors_by_type(encoding):
    from mlx_harmony_core.testing import ScriptedModel

    engine = mhc.Engine(ScriptedModel([], 0), encoding=encoding, context_length=10)
    with pytest.raises(mhc.ContextLengthError):
        engine.generate("a long prompt " * 20)
    with pytest.raises(mhc.InvalidRequestError):
        engine.generate([{"role": "robot", "content": "x"}])
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'.*SamplingParams"):
        engine.generate("x", temprature=0.5)
    assert issubclass(mhc.ModelLoadError, ValueError)
