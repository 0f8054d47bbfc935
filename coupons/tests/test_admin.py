"""The operators' admin: a view over the same tables, writing only through the services."""

import csv
import datetime
import io
import re
from typing import Any

import pytest
from django.contrib.admin import site
from django.contrib.admin.models import DELETION, LogEntry
from django.contrib.auth.models import User
from django.test import Client
from django.utils import timezone

from coupons import services
from coupons.admin import CouponAdmin
from coupons.errors import OutOfStock, SaleEnded
from coupons.models import ClaimHistory, Coupon

pytestmark = pytest.mark.django_db


@pytest.fixture
def sold_out_coupon() -> Coupon:
    coupon = services.create_coupon(name="SOLD", amount=2)
    services.claim_coupon(coupon_name="SOLD", user_id="alice")
    services.claim_coupon(coupon_name="SOLD", user_id="bob")
    services.create_coupon(name="FRESH", amount=3)
    coupon.refresh_from_db()
    return coupon


def test_coupon_list_shows_stock_claims_and_sold_out_state(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    response = admin_client.get("/admin/coupons/coupon/")

    assert response.status_code == 200
    rows = {coupon.name: coupon for coupon in response.context["cl"].result_list}
    assert set(rows) == {"SOLD", "FRESH"}
    page = response.content.decode()
    for heading in ["Amount", "Remaining amount", "Claimed", "Sold", "Sale", "Created"]:
        assert heading in page
    shares = dict(re.findall(r">(SOLD|FRESH)</a>.*?field-share_sold\">([\d.]+ %)<", page, re.S))
    assert shares == {"SOLD": "100.0 %", "FRESH": "0.0 %"}  # The share sold.
    assert '<meter min="0" max="2" value="2"' in page  # The bar of claims against amount.
    assert "sold out" in page and "on sale" in page  # Words, not an alarming icon.
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page)  # To the second, with its zone.


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("sale=sold_out", {"SOLD"}),
        ("sale=on_sale", {"FRESH"}),
        ("sale=not_started", {"LATER"}),
        ("sale=ended", {"OVER"}),
        ("q=FRE", {"FRESH"}),
    ],
)
def test_coupon_list_filters_and_searches(
    admin_client: Client, sold_out_coupon: Coupon, query: str, names: set[str]
) -> None:
    now = timezone.now()
    services.create_coupon(name="LATER", amount=1, starts_at=now + datetime.timedelta(days=1))
    services.create_coupon(name="OVER", amount=1, ends_at=now - datetime.timedelta(days=1))

    response = admin_client.get(f"/admin/coupons/coupon/?{query}")

    assert {coupon.name for coupon in response.context["cl"].result_list} == names


def test_the_add_coupon_page_asks_for_a_name_an_amount_its_shards_and_a_sale_window(
    admin_client: Client,
) -> None:
    response = admin_client.get("/admin/coupons/coupon/add/")

    assert response.status_code == 200
    assert set(response.context["adminform"].form.fields) == {
        "name",
        "amount",
        "stock_shards",
        "starts_at",
        "ends_at",
    }


def window(starts: str, ends: str) -> dict[str, str]:
    """The admin's split date and time inputs for a sale window, in UTC."""
    (start_date, start_time), (end_date, end_time) = starts.split(), ends.split()
    return {
        "starts_at_0": start_date,
        "starts_at_1": start_time,
        "ends_at_0": end_date,
        "ends_at_1": end_time,
    }


def test_a_sale_window_set_in_the_admin_is_kept(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/coupons/coupon/add/",
        {
            "name": "TIMED",
            "amount": "5",
            "stock_shards": "1",
            **window("2030-01-01 10:00:00", "2030-01-01 11:00:00"),
        },
    )

    assert response.status_code == 302
    coupon = Coupon.objects.get(name="TIMED")
    assert (coupon.starts_at, coupon.ends_at) == (
        datetime.datetime(2030, 1, 1, 10, tzinfo=datetime.UTC),
        datetime.datetime(2030, 1, 1, 11, tzinfo=datetime.UTC),
    )


def test_a_window_that_ends_before_it_starts_is_refused_in_the_admin(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    response = admin_client.post(
        f"/admin/coupons/coupon/{sold_out_coupon.pk}/change/",
        {
            "amount": "2",
            "stock_shards": "1",
            **window("2030-01-01 11:00:00", "2030-01-01 10:00:00"),
        },
    )

    assert response.status_code == 200
    assert "ends_at must be after starts_at." in response.content.decode()
    sold_out_coupon.refresh_from_db()
    assert (sold_out_coupon.starts_at, sold_out_coupon.ends_at) == (None, None)


@pytest.mark.django_db(transaction=True)  # The memory forgets as the change commits.
def test_changing_the_window_in_the_admin_goes_through_the_service(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    with pytest.raises(OutOfStock):  # Remembered sold out, with no window.
        services.claim_coupon(coupon_name="SOLD", user_id="early")

    response = admin_client.post(
        f"/admin/coupons/coupon/{sold_out_coupon.pk}/change/",
        {
            "amount": "3",
            "stock_shards": "1",
            **window("2020-01-01 00:00:00", "2020-01-02 00:00:00"),
        },
    )

    assert response.status_code == 302
    sold_out_coupon.refresh_from_db()
    assert (sold_out_coupon.amount, sold_out_coupon.remaining_amount) == (3, 1)
    assert sold_out_coupon.ends_at is not None and sold_out_coupon.ends_at.year == 2020
    # The service made this process forget the coupon: its new window answers.
    with pytest.raises(SaleEnded):
        services.claim_coupon(coupon_name="SOLD", user_id="late")


def test_adding_a_coupon_in_the_admin_gives_it_its_whole_stock(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/coupons/coupon/add/",
        {"name": "NEW", "amount": "40", "stock_shards": "1"},
        follow=True,
    )

    assert response.redirect_chain[-1][1] == 302
    assert "was added successfully" in response.content.decode()  # The admin's messages work.
    coupon = Coupon.objects.get(name="NEW")
    assert (coupon.amount, coupon.remaining_amount) == (40, 40)


def test_raising_the_amount_in_the_admin_keeps_the_invariant(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    response = admin_client.post(
        f"/admin/coupons/coupon/{sold_out_coupon.pk}/change/", {"amount": "5", "stock_shards": "1"}
    )

    assert response.status_code == 302
    sold_out_coupon.refresh_from_db()
    assert (sold_out_coupon.amount, sold_out_coupon.remaining_amount) == (5, 3)
    assert sold_out_coupon.name == "SOLD"


def test_lowering_the_amount_below_the_claims_is_refused_in_the_admin(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    response = admin_client.post(
        f"/admin/coupons/coupon/{sold_out_coupon.pk}/change/", {"amount": "1", "stock_shards": "1"}
    )

    assert response.status_code == 200
    assert "cannot be lower than the 2 claims already made." in response.content.decode()
    sold_out_coupon.refresh_from_db()
    assert (sold_out_coupon.amount, sold_out_coupon.remaining_amount) == (2, 0)


def test_the_name_cannot_be_changed_once_created(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    admin_client.post(
        f"/admin/coupons/coupon/{sold_out_coupon.pk}/change/",
        {"name": "RENAMED", "amount": "2", "stock_shards": "1"},
    )

    sold_out_coupon.refresh_from_db()
    assert sold_out_coupon.name == "SOLD"


def test_claims_ledger_is_searchable_by_user_and_filterable_by_coupon(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    services.claim_coupon(coupon_name="FRESH", user_id="alice")

    by_user = admin_client.get("/admin/coupons/claimhistory/?q=alice")
    by_coupon = admin_client.get(
        f"/admin/coupons/claimhistory/?coupon__id__exact={sold_out_coupon.pk}"
    )

    assert [(c.coupon.name, c.user_id) for c in by_user.context["cl"].result_list] == [
        ("FRESH", "alice"),
        ("SOLD", "alice"),
    ]
    assert {c.user_id for c in by_coupon.context["cl"].result_list} == {"alice", "bob"}


def test_claims_cannot_be_added_or_edited_in_the_admin(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    claim = ClaimHistory.objects.get(user_id="alice")

    assert admin_client.get("/admin/coupons/claimhistory/add/").status_code == 403
    response = admin_client.post(
        f"/admin/coupons/claimhistory/{claim.pk}/change/", {"user_id": "mallory"}
    )
    assert response.status_code == 403
    claim.refresh_from_db()
    assert claim.user_id == "alice"


def test_deleting_claims_in_the_admin_revokes_them_and_restores_stock(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    claims = list(ClaimHistory.objects.values_list("pk", flat=True))

    response = admin_client.post(
        "/admin/coupons/claimhistory/",
        {"action": "delete_selected", "_selected_action": claims, "post": "yes"},
    )

    assert response.status_code == 302
    sold_out_coupon.refresh_from_db()
    assert sold_out_coupon.remaining_amount == 2
    assert not ClaimHistory.objects.exists()


def test_the_admin_gets_sessions_csrf_checks_and_messages(admin_client: Client) -> None:
    response = admin_client.get("/admin/coupons/coupon/add/")

    request = response.wsgi_request
    assert request.session.session_key
    assert request.user.is_superuser
    assert hasattr(request, "_messages")
    assert "csrftoken" in response.cookies
    # A form posted without its CSRF token is refused.
    strict_client = Client(enforce_csrf_checks=True)
    strict_client.force_login(request.user)
    refused = strict_client.post(
        "/admin/coupons/coupon/add/", {"name": "X", "amount": 1, "stock_shards": "1"}
    )
    assert refused.status_code == 403
    assert not Coupon.objects.filter(name="X").exists()


def test_the_api_needs_no_csrf_token_and_sets_no_cookie() -> None:
    client = Client(enforce_csrf_checks=True)
    services.create_coupon(name="PLAIN", amount=1)

    response = client.post(
        "/api/coupons/claim",
        {"user_id": "alice", "coupon_name": "PLAIN"},
        content_type="application/json",
    )

    assert response.status_code == 201
    assert not response.cookies


@pytest.mark.parametrize(
    ("name", "amount", "field", "message"),
    [
        ("A/B", "5", "name", "Must not contain &#x27;/&#x27;."),
        ("tab\there", "5", "name", "Must not contain control characters."),
        ("nul\x00byte", "5", "name", "Null characters are not allowed."),
        ("   ", "5", "name", "Must contain a character other than whitespace."),
        ("x" * 256, "5", "name", "Ensure this value has at most 255 characters"),
        ("ZERO", "0", "amount", "Ensure this value is greater than or equal to 1."),
        (
            "HUGE",
            "2147483648",
            "amount",
            "Ensure this value is less than or equal to 2147483647.",
        ),
    ],
    ids=["slash", "control", "nul", "only-spaces", "too-long", "zero", "too-big"],
)
def test_the_admin_refuses_what_the_api_refuses(
    admin_client: Client, name: str, amount: str, field: str, message: str
) -> None:
    response = admin_client.post(
        "/admin/coupons/coupon/add/", {"name": name, "amount": amount, "stock_shards": "1"}
    )

    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {field}
    assert message in response.content.decode()
    assert not Coupon.objects.exists()


def test_the_admin_stores_a_padded_name_exactly_as_given(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/coupons/coupon/add/", {"name": "  padded  ", "amount": 1, "stock_shards": "1"}
    )

    assert response.status_code == 302
    assert list(Coupon.objects.values_list("name", flat=True)) == ["  padded  "]


def test_deleting_coupons_in_the_admin_deletes_their_claims(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    fresh = Coupon.objects.get(name="FRESH")
    admin_client.post(f"/admin/coupons/coupon/{fresh.pk}/delete/", {"post": "yes"})
    response = admin_client.post(
        "/admin/coupons/coupon/",
        {"action": "delete_selected", "_selected_action": [sold_out_coupon.pk], "post": "yes"},
    )

    assert response.status_code == 302
    assert not Coupon.objects.exists()
    assert not ClaimHistory.objects.exists()


def test_a_coupons_page_shows_its_sale_and_a_chart_of_its_claims(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    response = admin_client.get(f"/admin/coupons/coupon/{sold_out_coupon.pk}/change/")

    page = response.content.decode()
    assert response.status_code == 200
    assert "Sale: sold out" in page
    assert re.search(r'id="sale-claimed">2</strong> of 2 claimed\s+\(100.0 %\)', page)
    assert f"coupon__id__exact={sold_out_coupon.pk}" in page  # Its claims, and their export.
    claims_drawn = sum(int(claims) for claims in re.findall(r'data-claims="(\d+)"', page))
    assert claims_drawn == 2
    assert "Claims per second" in page  # Claimed just now: the sale is watched per second.


def test_the_chart_counts_claims_per_minute_once_the_sale_is_quiet(
    admin_client: Client, django_assert_max_num_queries: Any
) -> None:
    coupon = services.create_coupon(name="BIG", amount=1_000)
    long_ago = (timezone.now() - datetime.timedelta(hours=2)).replace(second=0, microsecond=0)
    ClaimHistory.objects.bulk_create(
        ClaimHistory(
            coupon=coupon, user_id=f"u{n}", claimed_at=long_ago + datetime.timedelta(seconds=n)
        )
        for n in range(600)
    )

    # The numbers and the chart, as the page refreshes them: counted by the database.
    with django_assert_max_num_queries(8):
        response = admin_client.get(f"/admin/coupons/coupon/{coupon.pk}/activity/")

    page = response.content.decode()
    assert "Claims per minute, at most 60" in page
    assert sorted(int(claims) for claims in re.findall(r'data-claims="(\d+)"', page)) == [60] * 10
    assert 'data-poll-seconds="15"' in page  # Quiet, with stock left: asked less often.


def test_the_claims_export_streams_the_ledger_as_filtered(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    services.claim_coupon(coupon_name="FRESH", user_id="carol")

    response = admin_client.get(
        f"/admin/coupons/claimhistory/export/?coupon__id__exact={sold_out_coupon.pk}"
    )

    assert response.status_code == 200
    assert response.streaming
    assert response["Content-Type"] == "text/csv; charset=utf-8"
    streamed = b"".join(response.streaming_content)  # type: ignore[attr-defined]
    assert streamed.startswith("\ufeff".encode())  # So that spreadsheets read UTF-8.
    rows = list(csv.reader(io.StringIO(streamed.decode("utf-8-sig"))))
    assert rows[0] == ["coupon", "user_id", "claimed_at"]
    assert sorted(row[:2] for row in rows[1:]) == [["SOLD", "alice"], ["SOLD", "bob"]]


def test_revoking_claims_as_an_action_restores_stock_and_is_logged(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    alice = ClaimHistory.objects.get(user_id="alice")

    response = admin_client.post(
        "/admin/coupons/claimhistory/",
        {"action": "revoke", "_selected_action": [alice.pk]},
        follow=True,
    )

    assert "Revoked 1 claims; their units are back in stock." in response.content.decode()
    sold_out_coupon.refresh_from_db()
    assert (sold_out_coupon.remaining_amount, claimants_of(sold_out_coupon)) == (1, ["bob"])
    entry = LogEntry.objects.get()
    assert (entry.action_flag, entry.object_repr) == (DELETION, str(alice))
    assert entry.user_id == User.objects.get(username="admin").pk  # Who, and when.
    assert timezone.now() - entry.action_time < datetime.timedelta(minutes=1)
    assert entry.change_message == "Revoked: its unit went back to the coupon's stock."
    services.claim_coupon(coupon_name="SOLD", user_id="alice")  # Free to claim again.


def claimants_of(coupon: Coupon) -> list[str]:
    return list(coupon.claims.order_by("id").values_list("user_id", flat=True))


def test_the_ledger_offers_its_export_with_its_filters(
    admin_client: Client, sold_out_coupon: Coupon
) -> None:
    response = admin_client.get("/admin/coupons/claimhistory/?q=alice")

    assert 'href="export/?q=alice"' in response.content.decode()


def test_a_share_nearly_sold_is_not_rounded_up_to_all() -> None:
    coupon = Coupon(amount=10_000, remaining_amount=4)

    assert CouponAdmin(Coupon, site).share_sold(coupon) == "99.9 %"


def test_the_export_defuses_what_a_spreadsheet_would_run_and_refuses_unknown_filters(
    admin_client: Client,
) -> None:
    services.create_coupon(name="=SUM(A1)", amount=2)
    services.claim_coupon(coupon_name="=SUM(A1)", user_id='=HYPERLINK("http://x","y")')
    services.claim_coupon(coupon_name="=SUM(A1)", user_id="-1")

    exported = admin_client.get("/admin/coupons/claimhistory/export/")
    unknown = admin_client.get("/admin/coupons/claimhistory/export/?nope=1")

    content = b"".join(exported.streaming_content).decode("utf-8-sig")  # type: ignore[attr-defined]
    rows = sorted(row[:2] for row in csv.reader(io.StringIO(content)))[:-1]
    assert rows == [["'=SUM(A1)", "'-1"], ["'=SUM(A1)", '\'=HYPERLINK("http://x","y")']]
    assert (unknown.status_code, unknown["Location"]) == (302, "/admin/coupons/claimhistory/?e=1")


def test_a_coupons_page_follows_a_sale_that_has_not_started(admin_client: Client) -> None:
    later = timezone.now() + datetime.timedelta(hours=1)
    coupon = services.create_coupon(name="SOON", amount=5, starts_at=later)

    page = admin_client.get(f"/admin/coupons/coupon/{coupon.pk}/change/").content.decode()

    assert "Sale: not started" in page
    assert 'data-poll-seconds="15"' in page  # It will sell: the page keeps asking.


def test_a_sale_quiet_for_a_few_minutes_still_shows_its_claims(admin_client: Client) -> None:
    coupon = services.create_coupon(name="QUIET", amount=5)
    services.claim_coupon(coupon_name="QUIET", user_id="u")
    ClaimHistory.objects.update(claimed_at=timezone.now() - datetime.timedelta(minutes=3))

    page = admin_client.get(f"/admin/coupons/coupon/{coupon.pk}/activity/").content.decode()

    assert "Claims per minute" in page
    assert re.findall(r'data-claims="(\d+)"', page) == ["1"]
    assert "No claims yet." not in page
