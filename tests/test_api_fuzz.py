"""A schemathesis run against the OpenAPI schema that `gencli serve` serves: requests generated from
the schema (and against it), a bounded number per route; none may get a 5xx, and no response body
may carry a stack trace.

(Driven through Hypothesis directly, operation by operation: schemathesis' pytest plugin reads a
private attribute that pytest 9 no longer has.)"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from services import start_api

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("queue_env")]

EXAMPLES = 10  # per operation and mode: about 400 requests over the schema's routes


def no_stack_trace(ctx, response, case):
    assert "Traceback" not in response.text and 'File "' not in response.text, response.text[:500]


def test_no_generated_request_gets_a_server_error_or_a_stack_trace(env):
    server = start_api(env, name="api-fuzz")
    try:
        schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 20
        calls = []
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for op, mode in [(op, mode) for op in operations for mode in modes]:
            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def run(case):
                response = case.call_and_validate(base_url=server.url, checks=[not_a_server_error, no_stack_trace],
                                                  timeout=30)
                calls.append((op.label, mode, response.status_code))

            try:
                run()
            except Unsatisfiable:  # a route with nothing to get wrong (no parameters, no body)
                if mode is not GenerationMode.NEGATIVE:
                    raise
        assert len(calls) >= EXAMPLES * len(operations)  # the run made requests (a few hundred)
        # A 5xx or a stack trace has failed the run already, inside the checks. What only the whole run
        # shows: it reached the routes themselves (some requests were answered 2xx), and every body that
        # breaks the schema was refused with a 4xx, none taken as if it were valid.
        assert any(200 <= status < 300 for _, _, status in calls)
        broken = [(label, status) for label, mode, status in calls
                  if mode is GenerationMode.NEGATIVE and label.startswith("POST ")]
        assert broken and all(400 <= status < 500 for _, status in broken), broken
    finally:
        server.stop()
