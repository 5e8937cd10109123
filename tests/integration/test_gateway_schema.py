"""Schemathesis against the running gateway's OpenAPI spec: every operation, bounded
examples, every built-in check (no 5xx, documented status codes, content types,
response schemas, schema-valid requests accepted, invalid ones refused). Valid
generated events really go through the broker and the worker."""

from __future__ import annotations

from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase

EXAMPLES = 25  # per operation; keeps the whole run to seconds on two cores


def run_operation(operation: Any, url: str, headers: dict[str, str]) -> list[int]:
    """Call ``operation`` with generated cases; return the status codes seen."""
    calls: list[int] = []

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=list(HealthCheck), database=None)
    @hypothesis.given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        response = case.call_and_validate(base_url=url, headers=headers, timeout=60)
        calls.append(response.status_code)

    check()
    return calls


def test_gateway_conforms_to_its_openapi_spec(gateway, capsys):
    schema = schemathesis.openapi.from_url(gateway.url + "/openapi.json")
    failures: list[str] = []
    summary: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        try:
            calls = run_operation(operation, gateway.url, {"X-API-Key": gateway.api_key})
        except (Exception, BaseExceptionGroup) as err:  # collect, so one report names every failing operation
            failures.append(f"{operation.label}: {err}")
            continue
        statuses = ", ".join(f"{s}x{calls.count(s)}" for s in sorted(set(calls)))
        summary.append(f"{operation.label}: {len(calls)} calls ({statuses})")
    with capsys.disabled():
        print("\nschemathesis:\n  " + "\n  ".join(summary))
    if failures:
        pytest.fail("\n\n".join(failures))
    assert len(summary) == 9  # every operation, DELETE /v1/items/{id} included
