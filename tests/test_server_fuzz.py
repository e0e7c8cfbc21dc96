"""A schema-driven fuzz of the server: schemathesis generates requests from /openapi.json
(bounded in examples and time) and no answer may be a 5xx."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402

import mlx_harmony_core as mhc  # noqa: E402
from mlx_harmony_core.server import ServerOptions  # noqa: E402
from mlx_harmony_core.testing import ScriptedModel, ServerThread  # noqa: E402


def test_no_5xx_under_schema_fuzz(encoding):
    # A scripted model keeps each generation instant; every request path is the real one.
    engine = mhc.Engine(ScriptedModel(replies=[[]]), encoding=encoding, context_length=4096)
    with ServerThread(engine, ServerOptions(model_name="fuzz", default_max_tokens=4)) as url:
        schema = schemathesis.openapi.from_url(url + "/openapi.json")
        failures, calls = [], []
        for op in schema.get_all_operations():
            operation = op.ok()

            @settings(
                max_examples=100,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            @given(case=operation.as_strategy())
            def check(case):
                response = case.call(base_url=url, timeout=30)
                calls.append(response.status_code)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.text[:300]))

            check()
        assert not failures, failures[:5]
        assert len(calls) >= 150 and any(c == 200 for c in calls), sorted(set(calls))
