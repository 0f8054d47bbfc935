"""Each rule beyond the contract, over HTTP against gunicorn, on PostgreSQL and SQLite.

test_api_features.py proves each rule in detail in one process; this runs every one of
them through real servers on both databases, as a shop would meet them.
"""

import datetime
import uuid
from urllib.parse import quote

from coupons.tests.live import LiveServer


def test_every_feature_holds_over_http(all_servers: list[LiveServer]) -> None:
    server, other = all_servers
    name = f"FEATURES_{uuid.uuid4().hex[:12]}"
    path = f"/api/coupons/{quote(name, safe='')}"
    now = datetime.datetime.now(datetime.UTC)
    hour = datetime.timedelta(hours=1)

    # A sale window: refused before it opens, and after it closes.
    early = server.request(
        "POST",
        "/api/coupons",
        {"name": f"{name}-early", "amount": 1, "starts_at": (now + hour).isoformat()},
    )
    late = server.request(
        "POST",
        "/api/coupons",
        {"name": f"{name}-late", "amount": 1, "ends_at": (now - hour).isoformat()},
    )
    backwards = server.request(
        "POST",
        "/api/coupons",
        {
            "name": f"{name}-x",
            "amount": 1,
            "starts_at": now.isoformat(),
            "ends_at": now.isoformat(),
        },
    )
    assert (early.status, late.status, backwards.status) == (201, 201, 400)
    for suffix, code in [("early", "sale_not_started"), ("late", "sale_ended")]:
        refused = other.request(
            "POST", "/api/coupons/claim", {"user_id": "u", "coupon_name": f"{name}-{suffix}"}
        )
        assert (refused.status, refused.body["error"]["code"]) == (409, code)

    # Retry-safe claims: the replay, from the other instance, and a key reused.
    server.create_coupon(name, 3)
    key = {"Idempotency-Key": f"order-{name}"}
    body = {"user_id": "shopper/1", "coupon_name": name}
    first = server.request("POST", "/api/coupons/claim", body, key)
    again = other.request("POST", "/api/coupons/claim", body, key)
    stolen = other.request("POST", "/api/coupons/claim", {**body, "user_id": "thief"}, key)
    bad_key = server.request("POST", "/api/coupons/claim", body, {"Idempotency-Key": "has space"})
    assert (first.status, again.status, stolen.status, bad_key.status) == (201, 201, 422, 400)
    assert again.body == first.body and again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert server.details(name)["remaining_amount"] == 2

    # Listings: coupons filtered, a coupon's claims in claim order.
    listed = other.request("GET", "/api/coupons?live=true&page_size=1000")
    assert name in {coupon["name"] for coupon in listed.body["results"]}
    assert f"{name}-early" not in {coupon["name"] for coupon in listed.body["results"]}
    assert other.request("GET", "/api/coupons?sold_out=maybe").status == 400
    claims = server.request("GET", f"{path}/claims")
    assert [claim["user_id"] for claim in claims.body["results"]] == ["shopper/1"]

    # One user's claim, looked up and revoked.
    user_path = f"{path}/claims/{quote('shopper/1', safe='')}"
    looked_up = other.request("GET", user_path)
    assert (looked_up.status, looked_up.body) == (200, first.body)
    assert server.request("DELETE", user_path).status == 204
    gone = other.request("GET", user_path)
    assert (gone.status, gone.body["error"]["code"]) == (404, "claim_not_found")
    assert server.details(name) == {
        "name": name,
        "amount": 3,
        "remaining_amount": 3,
        "claimed_by": [],
    }
    missing = server.request("DELETE", f"/api/coupons/NOPE-{name}/claims/u")
    assert (missing.status, missing.body["error"]["code"]) == (404, "coupon_not_found")
