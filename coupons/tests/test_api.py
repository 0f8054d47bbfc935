"""The HTTP contract of SPEC §3, line by line, on PostgreSQL."""

import datetime
import json
from typing import Any
from urllib.parse import quote

import pytest
from django.core.signals import request_finished, request_started
from django.db import close_old_connections, connection
from django.test import Client, RequestFactory
from rest_framework.test import APIClient

from coupons.models import ClaimHistory, Coupon
from couponsite.wsgi import application

pytestmark = pytest.mark.django_db

CREATE = "/api/coupons"
CLAIM = "/api/coupons/claim"


def details_path(name: str) -> str:
    return f"/api/coupons/{quote(name, safe='')}"


def post_json(client: APIClient, path: str, body: Any) -> Any:
    return client.generic("POST", path, json.dumps(body), content_type="application/json")


def error_code(response: Any) -> str:
    body = response.json()
    assert set(body) == {"error"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    code: str = body["error"]["code"]
    return code


# Creating


def test_creating_a_coupon_answers_201_with_its_full_stock(api_client: APIClient) -> None:
    response = post_json(api_client, CREATE, {"name": "PROMO_SUPER", "amount": 100})

    assert response.status_code == 201
    assert response.json() == {
        "name": "PROMO_SUPER",
        "amount": 100,
        "remaining_amount": 100,
        "claimed_by": [],
    }
    coupon = Coupon.objects.get(name="PROMO_SUPER")
    assert (coupon.amount, coupon.remaining_amount) == (100, 100)


def test_creating_an_existing_name_is_a_conflict_and_changes_nothing(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 3})
    post_json(api_client, CLAIM, {"user_id": "u1", "coupon_name": "PROMO"})

    response = post_json(api_client, CREATE, {"name": "PROMO", "amount": 50})

    assert response.status_code == 409
    assert error_code(response) == "coupon_exists"
    assert api_client.get(details_path("PROMO")).json() == {
        "name": "PROMO",
        "amount": 3,
        "remaining_amount": 2,
        "claimed_by": ["u1"],
    }


def test_names_are_case_sensitive_and_kept_exactly(api_client: APIClient) -> None:
    for name in ["promo", "PROMO", " promo ", "Ünïcode 券 🎟"]:
        assert post_json(api_client, CREATE, {"name": name, "amount": 1}).status_code == 201
    assert sorted(Coupon.objects.values_list("name", flat=True)) == sorted(
        ["promo", "PROMO", " promo ", "Ünïcode 券 🎟"]
    )
    assert api_client.get(details_path(" promo ")).json()["name"] == " promo "


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "P", "amount": "5"}, "amount"),
        ({"name": "P", "amount": 5.0}, "amount"),
        ({"name": "P", "amount": 5.5}, "amount"),
        ({"name": "P", "amount": True}, "amount"),
        ({"name": "P", "amount": None}, "amount"),
        ({"name": "P", "amount": 0}, "amount"),
        ({"name": "P", "amount": -1}, "amount"),
        ({"name": "P", "amount": 2_147_483_648}, "amount"),
        ({"name": "P", "amount": 10**40}, "amount"),
        ({"name": "P"}, "amount"),
        ({"amount": 5}, "name"),
        ({"name": "", "amount": 5}, "name"),
        ({"name": "x" * 256, "amount": 5}, "name"),
        ({"name": 123, "amount": 5}, "name"),
        ({"name": ["P"], "amount": 5}, "name"),
        ({"name": None, "amount": 5}, "name"),
        ({"name": "a/b", "amount": 5}, "name"),
        ({"name": "nul\u0000byte", "amount": 5}, "name"),
        ({"name": "tab\there", "amount": 5}, "name"),
        ({"name": "new\nline", "amount": 5}, "name"),
        ({"name": "del\u007f", "amount": 5}, "name"),
        ({"name": "c1\u0085", "amount": 5}, "name"),
        ({"name": "   ", "amount": 5}, "name"),
        ({"name": "\ud800", "amount": 5}, "name"),
        ({"name": "P", "amount": 5, "remaining_amount": 1}, "remaining_amount"),
        ({"name": "P", "amount": 5, "id": 7}, "id"),
    ],
)
def test_invalid_coupon_is_refused_naming_the_field(
    api_client: APIClient, body: dict[str, Any], field: str
) -> None:
    response = post_json(api_client, CREATE, body)

    assert response.status_code == 400
    assert error_code(response) == "invalid"
    assert field in response.json()["error"]["fields"]
    assert not Coupon.objects.exists()


def test_the_extreme_amounts_are_accepted(api_client: APIClient) -> None:
    assert post_json(api_client, CREATE, {"name": "one", "amount": 1}).status_code == 201
    big = post_json(api_client, CREATE, {"name": "max", "amount": 2_147_483_647})
    assert big.status_code == 201
    assert big.json()["remaining_amount"] == 2_147_483_647


def test_a_name_of_255_characters_is_accepted(api_client: APIClient) -> None:
    name = "é" * 255
    assert post_json(api_client, CREATE, {"name": name, "amount": 1}).status_code == 201
    assert api_client.get(details_path(name)).json()["name"] == name


@pytest.mark.parametrize("path", [CREATE, CLAIM])
@pytest.mark.parametrize(
    "raw",
    [
        b"{bad json",
        b"",
        b"[]",
        b'"text"',
        b"42",
        b"null",
        b'{"name": NaN}',
        b"\xff\xfe",
        b"\xef\xbb\xbf{}",
        b'{"name": "P", "amount": 1}\x00',
        b"[" * 30_000 + b"]" * 30_000,
        b'{"a": ' * 5_000 + b"1" + b"}" * 5_000,
    ],
    ids=lambda raw: repr(raw[:20]),
)
def test_a_body_that_is_not_a_json_object_is_a_bad_request(
    api_client: APIClient, path: str, raw: bytes
) -> None:
    # Raw bytes on purpose, invalid UTF-8 among them; the stubs only expect text.
    response = api_client.generic("POST", path, raw, content_type="application/json")  # type: ignore[arg-type]

    assert response.status_code == 400
    assert error_code(response) in {"invalid_json", "invalid"}
    assert not Coupon.objects.exists()


@pytest.mark.parametrize("path", [CREATE, CLAIM])
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", ""])
def test_a_body_that_is_not_json_is_an_unsupported_media_type(
    api_client: APIClient, path: str, content_type: str
) -> None:
    response = api_client.generic(
        "POST", path, '{"name": "P", "amount": 1}', content_type=content_type
    )

    assert response.status_code == 415
    assert error_code(response) == "unsupported_media_type"
    assert not Coupon.objects.exists()


def test_json_with_a_charset_is_accepted(api_client: APIClient) -> None:
    response = api_client.generic(
        "POST",
        CREATE,
        '{"name": "P", "amount": 1}',
        content_type="application/json; charset=utf-8",
    )
    assert response.status_code == 201


@pytest.mark.parametrize(
    "raw",
    [
        # JSON's decoder would take the last of two keys, and NaN only with leniency.
        b'{"user_id": NaN, "user_id": "u", "coupon_name": "PROMO"}',
        b'{"user_id": "u", "coupon_name": -Infinity, "coupon_name": "PROMO"}',
        # json.loads() would detect UTF-16 in bytes; the parser reads UTF-8.
        '{"user_id": "u", "coupon_name": "PROMO"}'.encode("utf-16"),
    ],
    ids=["nan-overwritten", "infinity-overwritten", "utf-16"],
)
def test_a_claim_body_the_parser_refuses_is_refused_though_it_would_decode_leniently(
    api_client: APIClient, raw: bytes
) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 5})

    response = api_client.generic("POST", CLAIM, raw, content_type="application/json")  # type: ignore[arg-type]

    assert response.status_code == 400
    assert error_code(response) == "invalid_json"
    assert not ClaimHistory.objects.exists()


def claim_sent_as(api_client: APIClient, content_type: str) -> Any:
    """A well-formed claim on a coupon with stock, sent under this Content-Type."""
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 5})
    return api_client.generic(
        "POST", CLAIM, '{"user_id": "u", "coupon_name": "PROMO"}', content_type=content_type
    )


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_a_well_formed_claim_sent_as_another_media_type_is_refused(
    api_client: APIClient, content_type: str
) -> None:
    response = claim_sent_as(api_client, content_type)

    assert response.status_code == 415
    assert error_code(response) == "unsupported_media_type"
    assert not ClaimHistory.objects.exists()


@pytest.mark.parametrize(
    "content_type", ["application/json; charset=utf-8", "application/JSON", "application/json "]
)
def test_a_claim_sent_as_json_in_other_words_is_made(
    api_client: APIClient, content_type: str
) -> None:
    response = claim_sent_as(api_client, content_type)

    assert response.status_code == 201
    assert response.json()["user_id"] == "u"
    assert ClaimHistory.objects.get().user_id == "u"


@pytest.mark.parametrize("path", [CREATE, CLAIM])
def test_an_oversized_body_is_refused(api_client: APIClient, path: str) -> None:
    body = json.dumps({"name": "x" * 200_000, "amount": 1})

    response = api_client.generic("POST", path, body, content_type="application/json")

    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"
    assert not Coupon.objects.exists()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", CREATE),
        ("DELETE", CREATE),
        ("PUT", CLAIM),
        ("DELETE", CLAIM),
        ("POST", "/api/coupons/PROMO"),
        ("PUT", "/api/coupons/PROMO"),
        ("PATCH", "/api/coupons/PROMO"),
        ("DELETE", "/api/coupons/PROMO"),
    ],
)
def test_a_method_the_path_does_not_take_is_refused(
    api_client: APIClient, method: str, path: str
) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 1})

    response = api_client.generic(method, path, "{}", content_type="application/json")

    assert response.status_code == 405
    assert error_code(response) == "method_not_allowed"
    assert Coupon.objects.get().remaining_amount == 1


@pytest.mark.parametrize("path", ["/api/coupons/", "/api/coupons/claim/", "/api/coupons/P/"])
def test_a_trailing_slash_is_tolerated(api_client: APIClient, path: str) -> None:
    post_json(api_client, CREATE, {"name": "P", "amount": 5})
    if path.endswith("claim/"):
        response = post_json(api_client, path, {"user_id": "u", "coupon_name": "P"})
        assert response.status_code == 201
    elif path == "/api/coupons/":
        response = post_json(api_client, path, {"name": "Q", "amount": 5})
        assert response.status_code == 201
    else:
        assert api_client.get(path).status_code == 200


# Claiming


def test_a_claim_takes_one_unit_for_the_user(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 2})

    response = post_json(api_client, CLAIM, {"user_id": "user_12345", "coupon_name": "PROMO"})

    assert response.status_code == 201
    assert response.json()["user_id"] == "user_12345"
    assert response.json()["coupon_name"] == "PROMO"
    coupon = Coupon.objects.get(name="PROMO")
    assert coupon.remaining_amount == 1
    assert list(coupon.claims.values_list("user_id", flat=True)) == ["user_12345"]
    # The answer's time is the recorded claim's, to the microsecond, in UTC.
    claimed_at = datetime.datetime.fromisoformat(response.json()["claimed_at"])
    assert claimed_at == coupon.claims.get().claimed_at
    assert claimed_at.utcoffset() == datetime.timedelta(0)


def test_claiming_an_unknown_coupon_is_not_found(api_client: APIClient) -> None:
    response = post_json(api_client, CLAIM, {"user_id": "u", "coupon_name": "NOPE"})

    assert response.status_code == 404
    assert error_code(response) == "coupon_not_found"
    assert not ClaimHistory.objects.exists()


def test_second_claim_by_same_user_is_rejected(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 5})
    post_json(api_client, CLAIM, {"user_id": "u", "coupon_name": "PROMO"})

    response = post_json(api_client, CLAIM, {"user_id": "u", "coupon_name": "PROMO"})

    assert response.status_code == 409
    assert error_code(response) == "already_claimed"
    assert Coupon.objects.get().remaining_amount == 4


def test_claim_on_sold_out_coupon_is_out_of_stock(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 1})
    post_json(api_client, CLAIM, {"user_id": "first", "coupon_name": "PROMO"})

    response = post_json(api_client, CLAIM, {"user_id": "second", "coupon_name": "PROMO"})

    assert response.status_code == 409
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "error": {"code": "out_of_stock", "message": "This coupon has no stock left."}
    }
    assert ClaimHistory.objects.count() == 1


def test_a_holder_of_a_sold_out_coupon_hears_already_claimed(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 1})
    post_json(api_client, CLAIM, {"user_id": "holder", "coupon_name": "PROMO"})

    response = post_json(api_client, CLAIM, {"user_id": "holder", "coupon_name": "PROMO"})

    assert response.status_code == 409
    assert error_code(response) == "already_claimed"


def test_the_same_user_may_claim_other_coupons(api_client: APIClient) -> None:
    for name in ["A", "B"]:
        post_json(api_client, CREATE, {"name": name, "amount": 1})
        response = post_json(api_client, CLAIM, {"user_id": "u", "coupon_name": name})
        assert response.status_code == 201
    assert ClaimHistory.objects.filter(user_id="u").count() == 2


def test_user_ids_are_case_sensitive(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 5})
    for user_id in ["user", "USER", "user "]:
        response = post_json(api_client, CLAIM, {"user_id": user_id, "coupon_name": "PROMO"})
        assert response.status_code == 201


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"user_id": "u"}, "coupon_name"),
        ({"coupon_name": "PROMO"}, "user_id"),
        ({"user_id": 12345, "coupon_name": "PROMO"}, "user_id"),
        ({"user_id": "u", "coupon_name": 7}, "coupon_name"),
        ({"user_id": True, "coupon_name": "PROMO"}, "user_id"),
        ({"user_id": "", "coupon_name": "PROMO"}, "user_id"),
        ({"user_id": "u" * 256, "coupon_name": "PROMO"}, "user_id"),
        ({"user_id": "nul\u0000", "coupon_name": "PROMO"}, "user_id"),
        ({"user_id": "u", "coupon_name": "PRO\u0000MO"}, "coupon_name"),
        ({"user_id": "u", "coupon_name": "PRO/MO"}, "coupon_name"),
        ({"user_id": "u" * 256, "coupon_name": "x" * 256}, "coupon_name"),
        ({"user_id": "u", "coupon_name": "PROMO", "amount": 1}, "amount"),
        ({"user_id": "u", "coupon_name": "PROMO", "remaining_amount": 9}, "remaining_amount"),
    ],
)
def test_invalid_claim_is_refused_and_changes_nothing(
    api_client: APIClient, body: dict[str, Any], field: str
) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 5})

    response = post_json(api_client, CLAIM, body)

    assert response.status_code == 400
    assert error_code(response) == "invalid"
    assert field in response.json()["error"]["fields"]
    assert Coupon.objects.get().remaining_amount == 5
    assert not ClaimHistory.objects.exists()


def test_a_user_id_of_255_characters_with_unicode_is_accepted(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 1})
    user_id = "ü" * 254 + "🎟"
    response = post_json(api_client, CLAIM, {"user_id": user_id, "coupon_name": "PROMO"})
    assert response.status_code == 201
    assert api_client.get(details_path("PROMO")).json()["claimed_by"] == [user_id]


# Reading


def test_details_list_claimants_in_claim_order(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "PROMO_SUPER", "amount": 100})
    users = ["user_3", "user_1", "user_2", "user_0"]
    for user_id in users:
        post_json(api_client, CLAIM, {"user_id": user_id, "coupon_name": "PROMO_SUPER"})

    response = api_client.get(details_path("PROMO_SUPER"))

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {
        "name": "PROMO_SUPER",
        "amount": 100,
        "remaining_amount": 96,
        "claimed_by": users,
    }


def test_details_list_thousands_of_claimants_in_claim_order(api_client: APIClient) -> None:
    # Stored so that neither the table's own order nor the (coupon, user_id) index gives
    # claim order: only reading by claim id does, whichever plan PostgreSQL picks.
    coupon = Coupon.objects.create(name="BIG", amount=5000, remaining_amount=0)
    users = [f"u{(index * 7919) % 10007:05}" for index in range(5000)]
    ClaimHistory.objects.bulk_create(
        ClaimHistory(id=index + 1, coupon=coupon, user_id=user_id)
        for index, user_id in sorted(enumerate(users), key=lambda claim: claim[1])
    )
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {ClaimHistory._meta.db_table}")

    response = api_client.get(details_path("BIG"))

    assert response.json()["claimed_by"] == users


def test_head_gets_the_headers_of_get_and_no_body() -> None:
    # Through the WSGI application as gunicorn calls it: Django's test client would
    # strip the body itself and hide a body left in.
    Coupon.objects.create(name="PROMO", amount=3, remaining_amount=3)

    def serve(method: str) -> tuple[str, dict[str, str], bytes]:
        environ = RequestFactory().generic(method, details_path("PROMO")).environ
        answer: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            answer.update(status=status, headers=dict(headers))

        # As the test client does: keep the test's connection, and its transaction, open.
        for signal in (request_started, request_finished):
            signal.disconnect(close_old_connections)
        try:
            body = b"".join(application(environ, start_response))
        finally:
            for signal in (request_started, request_finished):
                signal.connect(close_old_connections)
        return answer["status"], answer["headers"], body

    get_status, get_headers, get_body = serve("GET")
    head_status, head_headers, head_body = serve("HEAD")

    assert head_status == get_status == "200 OK"
    assert head_body == b""
    assert head_headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))


def test_details_of_a_unicode_name_are_found_percent_encoded(api_client: APIClient) -> None:
    name = 'Sale "50%" ?#&= 券 🎟'
    post_json(api_client, CREATE, {"name": name, "amount": 2})
    post_json(api_client, CLAIM, {"user_id": "ü", "coupon_name": name})

    response = api_client.get(details_path(name))

    assert response.status_code == 200
    assert response.json() == {
        "name": name,
        "amount": 2,
        "remaining_amount": 1,
        "claimed_by": ["ü"],
    }


@pytest.mark.parametrize(
    "path",
    [
        "/api/coupons/NOPE",
        "/api/coupons/NOPE/",
        "/api/coupons/nul%00byte",
        "/api/coupons/new%0Aline",
        "/api/coupons/" + "x" * 300,
        "/api/coupons/promo",
        "/api/coupons/%FF",
        "/api/coupons/%C0%80",
        "/api/coupons/%ZZ",
    ],
)
def test_details_of_an_unknown_coupon_are_not_found(api_client: APIClient, path: str) -> None:
    post_json(api_client, CREATE, {"name": "PROMO", "amount": 1})

    response = api_client.get(path)

    assert response.status_code == 404
    assert error_code(response) == "coupon_not_found"


def test_a_coupon_named_claim_can_be_read_like_any_other(api_client: APIClient) -> None:
    assert error_code(api_client.get("/api/coupons/claim")) == "coupon_not_found"
    post_json(api_client, CREATE, {"name": "claim", "amount": 2})
    post_json(api_client, CLAIM, {"user_id": "u", "coupon_name": "claim"})

    for path in ["/api/coupons/claim", "/api/coupons/claim/"]:
        response = api_client.get(path)
        assert response.status_code == 200
        assert response.json() == {
            "name": "claim",
            "amount": 2,
            "remaining_amount": 1,
            "claimed_by": ["u"],
        }


@pytest.mark.parametrize(
    "path", ["/api/nothing", "/api/coupons/a/b/c", "/", "/api/coupons/a%2Fb/x"]
)
def test_an_unknown_path_is_a_json_404(api_client: APIClient, path: str) -> None:
    response = api_client.get(path)

    assert response.status_code == 404
    assert error_code(response) == "not_found"


def test_an_oversized_form_outside_the_api_is_a_json_413(client: Client) -> None:
    response = client.post("/admin/login/", {"username": "x" * 200_000, "password": "p"})

    assert response.status_code == 413
    assert error_code(response) == "payload_too_large"


def test_a_crash_is_a_json_500_without_a_stack_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def crash(*args: Any) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr("coupons.api.details_document", crash)
    client = APIClient(raise_request_exception=False)

    response = client.get("/api/coupons/PROMO")

    assert response.status_code == 500
    assert error_code(response) == "internal_error"
    assert b"secret internals" not in response.content


def test_an_html_accept_header_still_gets_json(api_client: APIClient) -> None:
    response = api_client.get("/api/coupons/NOPE", HTTP_ACCEPT="text/html")

    assert response.status_code == 404
    assert error_code(response) == "coupon_not_found"


def test_a_request_for_another_host_is_a_json_400(api_client: APIClient) -> None:
    response = api_client.get("/api/coupons/NOPE", HTTP_HOST="attacker.example")

    assert response.status_code == 400
    assert error_code(response) == "bad_request"
