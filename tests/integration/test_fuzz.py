"""The JSON API fuzzed with schemathesis against the published OpenAPI document: never a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.integration.test_walking_stack import http

pytestmark = pytest.mark.integration


def test_no_server_errors(stack):
    # Driven through the Python API: schemathesis's pytest plugin does not load under pytest 9.
    schema = schemathesis.openapi.from_url(stack.http_url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/embeddings", "/v1/completions", "/v1/chat/completions"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # Small generations keep the fuzz quick on CPU; every other field is the fuzzer's.
            if isinstance(case.body, dict) and isinstance(case.body.get("max_tokens"), int):
                case.body["max_tokens"] = min(case.body["max_tokens"], 4)
            case.call_and_validate(
                base_url=stack.http_url,
                headers={"Authorization": f"Bearer {stack.api_key}"},
                checks=[not_a_server_error],
                timeout=120,
            )

        check()


def test_stack_still_answers_after_fuzzing(stack):
    assert http(stack, "GET", "/readyz")[0] == 200
