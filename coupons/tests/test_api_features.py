"""The API beyond the contract: sale windows, retry-safe claims, listings, a user's claim
looked up and revoked. On PostgreSQL; the concurrency of each is in test_concurrency.py."""

import datetime
import json
from typing import Any
from urllib.parse import quote

import pytest
from django.db import connection
from rest_framework.test import APIClient

from coupons import services
from coupons.models import ClaimHistory, Coupon

pytestmark = pytest.mark.django_db

CREATE = "/api/coupons"
CLAIM = "/api/coupons/claim"
NOW = datetime.datetime.now(datetime.UTC)


def post_json(client: APIClient, path: str, body: Any, **headers: str) -> Any:
    return client.generic(
        "POST", path, json.dumps(body), content_type="application/json", headers=headers
    )


def iso(moment: datetime.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def error_code(response: Any) -> str:
    code: str = response.json()["error"]["code"]
    return code


def claim(client: APIClient, user_id: str, coupon_name: str = "PROMO", **headers: str) -> Any:
    return post_json(client, CLAIM, {"user_id": user_id, "coupon_name": coupon_name}, **headers)


# Sale windows


def test_a_coupon_is_created_with_a_sale_window_and_answers_the_four_keys(
    api_client: APIClient,
) -> None:
    starts, ends = NOW + datetime.timedelta(hours=1), NOW + datetime.timedelta(hours=2)

    response = post_json(
        api_client,
        CREATE,
        {"name": "TIMED", "amount": 5, "starts_at": iso(starts), "ends_at": iso(ends)},
    )

    assert response.status_code == 201
    assert response.json() == {
        "name": "TIMED",
        "amount": 5,
        "remaining_amount": 5,
        "claimed_by": [],
    }
    coupon = Coupon.objects.get()
    assert (coupon.starts_at, coupon.ends_at) == (starts, ends)


@pytest.mark.parametrize(
    ("window", "field"),
    [
        ({"starts_at": "2030-01-01T10:00:00Z", "ends_at": "2030-01-01T10:00:00Z"}, "ends_at"),
        ({"starts_at": "2030-01-01T11:00:00Z", "ends_at": "2030-01-01T10:00:00+00:00"}, "ends_at"),
        ({"starts_at": "2030-01-01T10:00:00"}, "starts_at"),
        ({"ends_at": "tomorrow"}, "ends_at"),
        ({"ends_at": 1893456000}, "ends_at"),
    ],
    ids=["empty", "backwards", "no-time-zone", "not-a-time", "a-number"],
)
def test_a_sale_window_that_is_not_one_is_refused_naming_the_field(
    api_client: APIClient, window: dict[str, Any], field: str
) -> None:
    response = post_json(api_client, CREATE, {"name": "TIMED", "amount": 5, **window})

    assert response.status_code == 400
    assert error_code(response) == "invalid"
    assert field in response.json()["error"]["fields"]
    assert not Coupon.objects.exists()


def timed_coupon(starts: datetime.timedelta | None, ends: datetime.timedelta | None) -> Coupon:
    return services.create_coupon(
        name="PROMO",
        amount=1,
        starts_at=NOW + starts if starts is not None else None,
        ends_at=NOW + ends if ends is not None else None,
    )


def test_a_claim_before_the_sale_starts_is_refused(api_client: APIClient) -> None:
    timed_coupon(starts=datetime.timedelta(hours=1), ends=None)

    response = claim(api_client, "early")

    assert response.status_code == 409
    assert error_code(response) == "sale_not_started"
    assert not ClaimHistory.objects.exists()


def test_a_claim_after_the_sale_ended_is_refused(api_client: APIClient) -> None:
    timed_coupon(starts=None, ends=-datetime.timedelta(seconds=1))

    response = claim(api_client, "late")

    assert response.status_code == 409
    assert error_code(response) == "sale_ended"


def test_a_claim_inside_the_window_is_made(api_client: APIClient) -> None:
    timed_coupon(starts=-datetime.timedelta(hours=1), ends=datetime.timedelta(hours=1))

    assert claim(api_client, "on-time").status_code == 201


def test_the_window_is_checked_after_the_name_and_before_holders_and_stock(
    api_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed_coupon(starts=None, ends=datetime.timedelta(hours=1))
    assert claim(api_client, "holder").status_code == 201  # Sold out now.
    later = NOW + datetime.timedelta(hours=2)
    monkeypatch.setattr("coupons.services.timezone.now", lambda: later)

    assert error_code(claim(api_client, "holder", coupon_name="NOPE")) == "coupon_not_found"
    assert error_code(claim(api_client, "holder")) == "sale_ended"
    assert error_code(claim(api_client, "someone")) == "sale_ended"


def test_the_sold_out_memory_answers_the_window_first(
    api_client: APIClient, monkeypatch: pytest.MonkeyPatch, django_assert_num_queries: Any
) -> None:
    timed_coupon(starts=None, ends=datetime.timedelta(hours=1))
    claim(api_client, "holder")
    assert error_code(claim(api_client, "loser")) == "out_of_stock"  # Now remembered.

    with django_assert_num_queries(0):
        assert error_code(claim(api_client, "holder")) == "already_claimed"
        assert error_code(claim(api_client, "other")) == "out_of_stock"
        later = NOW + datetime.timedelta(hours=2)
        monkeypatch.setattr("coupons.services.timezone.now", lambda: later)
        assert error_code(claim(api_client, "holder")) == "sale_ended"
        assert error_code(claim(api_client, "other")) == "sale_ended"


def test_claims_before_the_sale_are_answered_from_memory_until_it_opens(
    api_client: APIClient, monkeypatch: pytest.MonkeyPatch, django_assert_num_queries: Any
) -> None:
    timed_coupon(starts=datetime.timedelta(hours=1), ends=None)
    assert error_code(claim(api_client, "first")) == "sale_not_started"  # Now remembered.

    with django_assert_num_queries(0):
        assert error_code(claim(api_client, "eager")) == "sale_not_started"
    opened = NOW + datetime.timedelta(hours=2)
    monkeypatch.setattr("coupons.services.timezone.now", lambda: opened)

    assert claim(api_client, "on-time").status_code == 201


# Retry-safe claims


@pytest.mark.parametrize("key", ["", "has space", "ünïcode", "tab\tkey", "k" * 256], ids=repr)
def test_an_idempotency_key_that_is_not_one_is_refused(api_client: APIClient, key: str) -> None:
    services.create_coupon(name="PROMO", amount=5)

    response = api_client.generic(
        "POST",
        CLAIM,
        json.dumps({"user_id": "u", "coupon_name": "PROMO"}),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=key,
    )

    assert response.status_code == 400
    assert "Idempotency-Key" in response.json()["error"]["fields"]
    assert not ClaimHistory.objects.exists()


def test_a_retried_claim_is_answered_with_the_original_without_taking_stock(
    api_client: APIClient,
) -> None:
    services.create_coupon(name="PROMO", amount=5)
    first = claim(api_client, "u", **{"Idempotency-Key": "order-1"})

    again = claim(api_client, "u", **{"Idempotency-Key": "order-1"})

    assert (first.status_code, again.status_code) == (201, 201)
    assert again.json() == first.json()
    assert "Idempotent-Replayed" not in first
    assert again["Idempotent-Replayed"] == "true"
    assert Coupon.objects.get().remaining_amount == 4


def test_a_retry_is_answered_even_once_the_coupon_is_sold_out_or_its_sale_over(
    api_client: APIClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed_coupon(starts=None, ends=datetime.timedelta(hours=1))
    first = claim(api_client, "u", **{"Idempotency-Key": "order-1"})
    claim(api_client, "v")
    later = NOW + datetime.timedelta(hours=2)
    monkeypatch.setattr("coupons.services.timezone.now", lambda: later)

    again = claim(api_client, "u", **{"Idempotency-Key": "order-1"})

    assert again.status_code == 201
    assert again.json() == first.json()


@pytest.mark.parametrize(
    ("user_id", "coupon_name"), [("other", "PROMO"), ("u", "OTHER")], ids=["user", "coupon"]
)
def test_a_key_reused_for_another_user_or_coupon_is_refused(
    api_client: APIClient, user_id: str, coupon_name: str
) -> None:
    services.create_coupon(name="PROMO", amount=5)
    services.create_coupon(name="OTHER", amount=5)
    claim(api_client, "u", **{"Idempotency-Key": "order-1"})

    response = claim(api_client, user_id, coupon_name, **{"Idempotency-Key": "order-1"})

    assert response.status_code == 422
    assert error_code(response) == "idempotency_key_reused"
    assert ClaimHistory.objects.count() == 1


@pytest.mark.parametrize("first_key", [None, "order-1"], ids=["no-key", "another-key"])
def test_a_holder_asking_under_another_key_hears_already_claimed(
    api_client: APIClient, first_key: str | None
) -> None:
    services.create_coupon(name="PROMO", amount=5)
    claim(api_client, "u", **({"Idempotency-Key": first_key} if first_key else {}))

    response = claim(api_client, "u", **{"Idempotency-Key": "order-2"})

    assert response.status_code == 409
    assert error_code(response) == "already_claimed"


def test_a_revoked_claims_key_claims_anew(api_client: APIClient) -> None:
    services.create_coupon(name="PROMO", amount=5)
    claim(api_client, "u", **{"Idempotency-Key": "order-1"})
    api_client.delete("/api/coupons/PROMO/claims/u")

    again = claim(api_client, "u", **{"Idempotency-Key": "order-1"})

    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again
    assert Coupon.objects.get().remaining_amount == 4


# Listing coupons


def test_coupons_are_listed_newest_first_in_full(api_client: APIClient) -> None:
    for name in ["first", "second", "third"]:
        services.create_coupon(name=name, amount=2)
    claim(api_client, "u", coupon_name="second")

    page = api_client.get("/api/coupons?page_size=2").json()
    rest = api_client.get(page["next"]).json()

    assert [coupon["name"] for coupon in page["results"] + rest["results"]] == [
        "third",
        "second",
        "first",
    ]
    assert rest["next"] is None
    second = page["results"][1]
    assert set(second) == {
        "name",
        "amount",
        "remaining_amount",
        "claimed_count",
        "stock_shards",
        "starts_at",
        "ends_at",
        "created_at",
    }
    assert (second["remaining_amount"], second["claimed_count"]) == (1, 1)
    assert second["stock_shards"] == 1
    assert second["starts_at"] is None


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("sold_out=true", {"gone"}),
        ("sold_out=false", {"live", "early", "over"}),
        ("live=true", {"live"}),
        ("live=false", {"gone", "early", "over"}),
        ("live=true&sold_out=true", set()),
    ],
)
def test_coupons_are_filtered_by_stock_and_liveness(
    api_client: APIClient, query: str, names: set[str]
) -> None:
    hour = datetime.timedelta(hours=1)
    services.create_coupon(name="live", amount=1, starts_at=NOW - hour, ends_at=NOW + hour)
    services.create_coupon(name="gone", amount=1)
    claim(api_client, "u", coupon_name="gone")
    services.create_coupon(name="early", amount=1, starts_at=NOW + hour)
    services.create_coupon(name="over", amount=1, ends_at=NOW - hour)

    response = api_client.get(f"/api/coupons?{query}")

    assert response.status_code == 200
    assert {coupon["name"] for coupon in response.json()["results"]} == names


def test_a_filter_that_is_not_a_boolean_is_refused(api_client: APIClient) -> None:
    response = api_client.get("/api/coupons?live=perhaps")

    assert response.status_code == 400
    assert "live" in response.json()["error"]["fields"]


# A user's claim, looked up, listed and revoked


def test_a_users_claim_is_looked_up(api_client: APIClient) -> None:
    services.create_coupon(name="PROMO", amount=5)
    made = claim(api_client, "user/with slash").json()

    response = api_client.get(f"/api/coupons/PROMO/claims/{quote('user/with slash', safe='')}")

    assert response.status_code == 200
    assert response.json() == made
    assert set(made) == {"coupon_name", "user_id", "claimed_at"}


def test_a_user_id_ending_in_a_slash_is_its_own_user(api_client: APIClient) -> None:
    services.create_coupon(name="PROMO", amount=5)
    claim(api_client, "bob")
    claim(api_client, "bob/")

    looked_up = api_client.get("/api/coupons/PROMO/claims/bob%2F")
    revoked = api_client.delete("/api/coupons/PROMO/claims/bob%2F")

    assert looked_up.json()["user_id"] == "bob/"
    assert revoked.status_code == 204
    assert list(ClaimHistory.objects.values_list("user_id", flat=True)) == ["bob"]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/api/coupons/PROMO/claims/nobody", "claim_not_found"),
        ("/api/coupons/PROMO/claims/nul%00", "claim_not_found"),
        ("/api/coupons/NOPE/claims/u", "coupon_not_found"),
        ("/api/coupons/NOPE/claims", "coupon_not_found"),
    ],
)
def test_a_claim_or_coupon_that_is_not_there_is_not_found(
    api_client: APIClient, path: str, code: str
) -> None:
    services.create_coupon(name="PROMO", amount=5)
    claim(api_client, "u")

    for method in ["GET", "DELETE"]:
        if path.endswith("/claims") and method == "DELETE":
            continue
        response = api_client.generic(method, path)
        assert response.status_code == 404, method
        assert error_code(response) == code


def test_a_coupons_claims_are_listed_in_claim_order(api_client: APIClient) -> None:
    services.create_coupon(name="PROMO", amount=5)
    users = ["c", "a", "b"]
    for user_id in users:
        claim(api_client, user_id)

    page = api_client.get("/api/coupons/PROMO/claims?page_size=2").json()
    rest = api_client.get(page["next"]).json()

    assert [made["user_id"] for made in page["results"] + rest["results"]] == users
    assert set(page["results"][0]) == {"coupon_name", "user_id", "claimed_at"}


def test_revoking_a_claim_returns_its_unit_and_frees_the_user(api_client: APIClient) -> None:
    services.create_coupon(name="PROMO", amount=1)
    claim(api_client, "u")

    revoked = api_client.delete("/api/coupons/PROMO/claims/u")
    again = api_client.delete("/api/coupons/PROMO/claims/u")

    assert revoked.status_code == 204
    assert revoked.content == b""
    assert (again.status_code, error_code(again)) == (404, "claim_not_found")
    assert api_client.get("/api/coupons/PROMO").json()["remaining_amount"] == 1
    assert claim(api_client, "u").status_code == 201


def test_the_claims_listing_reads_the_claim_order_index_even_in_a_generic_plan() -> None:
    # A statement psycopg prepares may run on PostgreSQL's generic plan, which knows no
    # parameter's value: only "id > 0" written in the SQL lets it use the partial index.
    coupon = services.create_coupon(name="PROMO", amount=5)
    listing = ClaimHistory.objects.filter(coupon=coupon).in_claim_order()
    sql, params = listing.query.sql_with_params()
    numbered = sql
    for number in range(1, len(params) + 1):
        numbered = numbered.replace("%s", f"${number}", 1)
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"PREPARE listing AS {numbered}")
        # EXECUTE takes no bound parameter; the only one here is the coupon's id.
        arguments = ", ".join(str(int(value)) for value in params)
        cursor.execute(f"EXPLAIN EXECUTE listing({arguments})")
        plan = "\n".join(line for (line,) in cursor.fetchall())
        cursor.execute("DEALLOCATE listing")

    assert "claim_coupon_order_idx" in plan, plan
