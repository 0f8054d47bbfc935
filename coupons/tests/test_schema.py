"""The OpenAPI schema, generated from the code, and the pages that show it."""

import re
from typing import Any

import pytest
from django.test import Client
from django.urls import resolve
from drf_spectacular.validation import validate_schema

from coupons import errors

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    response = Client().get("/api/schema", {"format": "json"})
    assert response.status_code == 200
    document: dict[str, Any] = response.json()
    return document


def test_the_schema_is_valid_openapi(schema: dict[str, Any]) -> None:
    validate_schema(schema)  # type: ignore[no-untyped-call]  # Raises unless OpenAPI 3.


def test_the_schema_lists_every_route_of_the_api(schema: dict[str, Any]) -> None:
    operations = {(path, method) for path, methods in schema["paths"].items() for method in methods}

    assert operations == {
        ("/api/coupons", "get"),
        ("/api/coupons", "post"),
        ("/api/coupons/claim", "post"),
        ("/api/coupons/claim", "get"),
        ("/api/coupons/{name}", "get"),
        ("/api/coupons/{name}/claims", "get"),
        ("/api/coupons/{name}/claims/{user_id}", "get"),
        ("/api/coupons/{name}/claims/{user_id}", "delete"),
    }


def documented_codes(operation: dict[str, Any], status: int) -> set[str]:
    description = operation["responses"][str(status)]["description"]
    return set(re.findall(r"`([a-z_]+)`", description))


def test_every_refusal_of_a_claim_is_documented_with_its_status(schema: dict[str, Any]) -> None:
    claim = schema["paths"]["/api/coupons/claim"]["post"]

    assert documented_codes(claim, 404) == {errors.CouponNotFound.code}
    assert documented_codes(claim, 409) == {
        errors.SaleNotStarted.code,
        errors.SaleEnded.code,
        errors.AlreadyClaimed.code,
        errors.OutOfStock.code,
    }
    assert documented_codes(claim, 422) == {errors.IdempotencyKeyReused.code}
    assert {"invalid", "invalid_json"} <= documented_codes(claim, 400)
    assert "Idempotency-Key" in {parameter["name"] for parameter in claim["parameters"]}


def test_the_details_keep_exactly_the_contracts_four_keys(schema: dict[str, Any]) -> None:
    details = schema["paths"]["/api/coupons/{name}"]["get"]["responses"]["200"]
    reference = details["content"]["application/json"]["schema"]["$ref"].split("/")[-1]

    assert set(schema["components"]["schemas"][reference]["properties"]) == {
        "name",
        "amount",
        "remaining_amount",
        "claimed_by",
    }


def test_the_documentation_page_loads_its_scripts_from_this_server() -> None:
    response = Client().get("/api/docs")

    html = response.content.decode()
    assert response.status_code == 200
    assert "/static/drf_spectacular_sidecar/" in html
    assert not re.search(r"""(src|href)=["']https?://""", html), "a script or style from a CDN"


def test_every_call_documents_the_refusals_of_keys_and_rates_as_access_enforces_them(
    schema: dict[str, Any],
) -> None:
    for path, methods in schema["paths"].items():
        match = resolve(path.replace("{name}", "PROMO").replace("{user_id}", "u1"))
        for method, operation in methods.items():
            action = match.func.actions[method]  # type: ignore[attr-defined]
            client_may = action in match.func.cls.client_actions  # type: ignore[attr-defined]
            documented = set(operation["responses"])
            assert {"401", "429"} <= documented, (method, path)
            # 403 for its scope exactly where coupons/access.py refuses a client key.
            assert ("403" in documented) is not client_may, (method, path, action)
