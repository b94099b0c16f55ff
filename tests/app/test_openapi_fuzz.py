"""schemathesis against the app's own OpenAPI document: generated requests to every
operation (valid and invalid) must never produce a 5xx. Bounded: a few examples each.

The operations are driven with hypothesis directly (``operation.as_strategy()``), which
keeps the run independent of schemathesis' pytest plugin.
"""

from __future__ import annotations

from collections.abc import Callable

import schemathesis
from hypothesis import HealthCheck, given, settings

from app.main import create_app
from worker.settings import Settings

EXAMPLES_PER_OPERATION = 6


def test_no_server_errors(settings_factory: Callable[..., Settings]) -> None:
    app = create_app(settings_factory())  # no API keys: one tenant, as on loopback
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def no_5xx(case: schemathesis.Case) -> None:
            response = case.call()
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.text[:300]}")

        no_5xx()
    assert failures == []
