"""The API against its own OpenAPI schema: schemathesis reads /api/schema from gunicorn on
PostgreSQL and sends every operation requests drawn from it, valid ones and invalid ones.

Every answer must be documented for its operation (status, content type, body and headers)
and none may be a server error; every request the schema calls invalid must be refused, and
every request it calls valid may be refused only for the state it meets (no such coupon or
claim, a name taken, sold out...) or for what no schema can say: a sale window that ends
before it starts.
"""

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.schemas import BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from coupons.tests import live

# Requests drawn per operation, valid and invalid ones, besides the schema's own examples and
# the boundary values schemathesis derives from it: several hundred in all, some seconds.
EXAMPLES_PER_OPERATION = 50
# Per request: far beyond what one takes even on a busy machine, yet a hung one fails.
REQUEST_TIMEOUT_SECONDS = 20

CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    unsupported_method,
]

# What JSON Schema cannot relate: a sale window's end after its start (and a moment in range
# once moved to UTC). A valid request is refused with 400 only for these fields.
WINDOW_FIELDS = {"starts_at", "ends_at"}


@pytest.fixture(scope="module")
def api_server() -> Iterator[live.LiveServer]:
    """gunicorn on a PostgreSQL database of its own, holding the schema's examples: the coupon
    PROMO_SUPER and its claim by user_12345, so that their look-ups find something."""
    with live.postgres_database("coupons_fuzzing") as database_url:
        environment = live.environment_for(database_url)
        live.migrate(environment)
        with live.gunicorn(environment, workers=2) as server:
            server.create_coupon("PROMO_SUPER", 100)
            claim = server.request(
                "POST",
                "/api/coupons/claim",
                {"user_id": "user_12345", "coupon_name": "PROMO_SUPER"},
            )
            assert claim.status == 201, claim
            yield server


@pytest.fixture(scope="module")
def api_schema(api_server: live.LiveServer) -> BaseSchema:
    """The schema the server publishes, read over HTTP, as a client would."""
    config = SchemathesisConfig()
    # The API keys are off by default: no credentials to draw.
    config.projects.override.generation.update(with_security_parameters=False)
    url = f"http://{api_server.host}:{api_server.port}/api/schema?format=json"
    return schemathesis.openapi.from_url(url, config=config, timeout=REQUEST_TIMEOUT_SECONDS)


@pytest.fixture(autouse=True)
def node_id_schemathesis_expects(request: pytest.FixtureRequest) -> None:
    """Give the test the `_nodeid` attribute schemathesis 4.32 reads (and rewrites, to name
    each operation), which pytest 9.2's nodes no longer have."""
    request.node._nodeid = request.node.nodeid


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=timedelta(seconds=REQUEST_TIMEOUT_SECONDS),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_every_answer_is_the_one_the_schema_documents(case: Case[Any]) -> None:
    response = case.call_and_validate(checks=CHECKS, timeout=REQUEST_TIMEOUT_SECONDS)

    if case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE:
        body = response.json() if response.content else None
        refusal = unwarranted_refusal(case, response.status_code, body)
        assert refusal is None, (
            f"a request valid by the schema was refused ({refusal}): "
            f"{case.as_curl_command()} answered {response.status_code} {response.text}"
        )


def unwarranted_refusal(case: Case[Any], status: int, body: Any) -> str | None:
    """Why a request valid by the schema should not have had this answer; None if it may."""
    if status in {413, 415}:
        return f"status {status}"
    if status == 400:
        fields = set(body["error"].get("fields", {"body": []}))
        return None if fields <= WINDOW_FIELDS else f"invalid {sorted(fields)}"
    if status == 404 and body["error"]["code"] == "not_found":
        # Only a cursor the listing did not give may be unknown; a valid path is routed.
        return None if "cursor" in (case.query or {}) else "a valid path was not routed"
    return None
