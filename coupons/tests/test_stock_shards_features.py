"""Stock shards through every door: the API, the admin, seed_coupons and audit_coupons. The
stock a client or operator sees is always the total, and the shards always hold it."""

import json
import re
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.db.models import F
from django.test import Client
from rest_framework.test import APIClient

from coupons import services
from coupons.models import ClaimHistory, Coupon, StockShard, split_stock
from coupons.tests.test_admin import claimants_of
from coupons.tests.test_api_features import CREATE, claim, error_code, post_json
from coupons.tests.test_stock_shards import shard_stock, stock_left

pytestmark = pytest.mark.django_db


def shard_numbers(coupon: Coupon) -> list[int]:
    shards = StockShard.objects.filter(coupon=coupon).order_by("number")
    return list(shards.values_list("number", flat=True))


def assert_stock_is_where_the_shards_say(coupon: Coupon, stock: int) -> None:
    """The coupon's stock left is `stock`, on its row with one shard, else split over
    exactly the shards 0..K-1 with none on the row."""
    coupon = Coupon.objects.get(pk=coupon.pk)
    assert stock_left(coupon) == stock
    if coupon.stock_shards == 1:
        assert (coupon.remaining_amount, shard_numbers(coupon)) == (stock, [])
    else:
        assert coupon.remaining_amount == 0
        assert shard_numbers(coupon) == list(range(coupon.stock_shards))
        assert shard_stock(coupon) == split_stock(stock, coupon.stock_shards)


def claims_of(coupon: Coupon) -> int:
    return ClaimHistory.objects.filter(coupon=coupon).count()


# The API


@pytest.mark.parametrize("shards", [1, 4, 64])
def test_a_coupon_created_with_stock_shards_answers_its_whole_amount(
    api_client: APIClient, shards: int
) -> None:
    response = post_json(api_client, CREATE, {"name": "HOT", "amount": 100, "stock_shards": shards})

    assert response.status_code == 201
    assert response.json()["remaining_amount"] == 100
    details = api_client.get("/api/coupons/HOT")
    assert details.json() == {
        "name": "HOT",
        "amount": 100,
        "remaining_amount": 100,
        "claimed_by": [],
    }
    coupon = Coupon.objects.get(name="HOT")
    assert coupon.stock_shards == shards
    assert_stock_is_where_the_shards_say(coupon, 100)


@pytest.mark.parametrize(
    "shards", [0, 65, "4", 4.5, True, None], ids=["0", "65", "string", "float", "true", "null"]
)
def test_stock_shards_that_are_not_1_to_64_are_refused_naming_the_field(
    api_client: APIClient, shards: Any
) -> None:
    response = post_json(api_client, CREATE, {"name": "HOT", "amount": 10, "stock_shards": shards})

    assert response.status_code == 400
    assert error_code(response) == "invalid"
    assert set(response.json()["error"]["fields"]) == {"stock_shards"}
    assert not Coupon.objects.exists()
    assert not StockShard.objects.exists()


def test_the_listing_shows_the_shards_and_sums_their_stock(api_client: APIClient) -> None:
    post_json(api_client, CREATE, {"name": "HOT", "amount": 10, "stock_shards": 4})
    for user in ["u1", "u2", "u3"]:
        assert claim(api_client, user, coupon_name="HOT").status_code == 201

    listed = api_client.get("/api/coupons").json()["results"]

    assert len(listed) == 1
    hot = listed[0]
    assert (hot["stock_shards"], hot["amount"]) == (4, 10)
    assert (hot["remaining_amount"], hot["claimed_count"]) == (7, 3)


@pytest.fixture
def drained_through_the_api(api_client: APIClient) -> list[str]:
    """A coupon of 4 units over 4 shards, claimed to empty through the API, each answer
    checked, beside one of the same shape untouched; the claimants, in claim order."""
    post_json(api_client, CREATE, {"name": "DRAINED", "amount": 4, "stock_shards": 4})
    post_json(api_client, CREATE, {"name": "STOCKED", "amount": 4, "stock_shards": 4})
    users = ["u0", "u1", "u2", "u3"]
    for user in users:
        assert claim(api_client, user, coupon_name="DRAINED").status_code == 201
        details = api_client.get("/api/coupons/DRAINED").json()
        assert details["remaining_amount"] == details["amount"] - len(details["claimed_by"])
    refused = claim(api_client, "late", coupon_name="DRAINED")
    assert (refused.status_code, error_code(refused)) == (409, "out_of_stock")
    return users


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("sold_out=true", {"DRAINED"}),
        ("sold_out=false", {"STOCKED"}),
        ("live=true", {"STOCKED"}),
        ("live=false", {"DRAINED"}),
    ],
)
def test_a_sharded_coupon_claimed_to_empty_is_listed_as_sold_out(
    api_client: APIClient, drained_through_the_api: list[str], query: str, names: set[str]
) -> None:
    response = api_client.get(f"/api/coupons?{query}")

    assert response.status_code == 200
    assert {coupon["name"] for coupon in response.json()["results"]} == names


def test_a_sharded_coupon_claimed_to_empty_details_every_claim(
    api_client: APIClient, drained_through_the_api: list[str]
) -> None:
    details = api_client.get("/api/coupons/DRAINED").json()

    assert details == {
        "name": "DRAINED",
        "amount": 4,
        "remaining_amount": 0,
        "claimed_by": drained_through_the_api,
    }
    assert shard_stock(Coupon.objects.get(name="DRAINED")) == [0, 0, 0, 0]


# The admin


def change(admin_client: Client, coupon: Coupon, amount: int, shards: int) -> Any:
    """Post the coupon's change form whole, as a browser does (no sale window)."""
    return admin_client.post(
        f"/admin/coupons/coupon/{coupon.pk}/change/",
        {"amount": str(amount), "stock_shards": str(shards)},
    )


def test_adding_a_coupon_with_shards_in_the_admin_fills_them(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/coupons/coupon/add/", {"name": "HOT", "amount": "40", "stock_shards": "8"}
    )

    assert response.status_code == 302
    coupon = Coupon.objects.get(name="HOT")
    assert (coupon.amount, coupon.stock_shards) == (40, 8)
    assert_stock_is_where_the_shards_say(coupon, 40)


def test_changing_the_shards_in_the_admin_keeps_the_stock_and_the_claims(
    admin_client: Client,
) -> None:
    coupon = services.create_coupon(name="HOT", amount=10)
    for user in ["alice", "bob", "carol"]:
        services.claim_coupon(coupon_name="HOT", user_id=user)

    for shards in [8, 3, 1]:
        response = change(admin_client, coupon, 10, shards)

        assert response.status_code == 302, shards
        coupon.refresh_from_db()
        assert (coupon.amount, coupon.stock_shards, claims_of(coupon)) == (10, shards, 3)
        assert_stock_is_where_the_shards_say(coupon, 10 - 3)


def test_changing_the_amount_of_a_sharded_coupon_in_the_admin_spreads_the_new_stock(
    admin_client: Client,
) -> None:
    coupon = services.create_coupon(name="HOT", amount=10, stock_shards=4)
    for user in ["alice", "bob"]:
        services.claim_coupon(coupon_name="HOT", user_id=user)

    response = change(admin_client, coupon, 20, 4)

    assert response.status_code == 302
    coupon.refresh_from_db()
    assert (coupon.amount, coupon.stock_shards) == (20, 4)
    assert claimants_of(coupon) == ["alice", "bob"]
    assert_stock_is_where_the_shards_say(coupon, 20 - 2)


def test_saving_a_sharded_coupon_unchanged_in_the_admin_leaves_its_shards_alone(
    admin_client: Client,
) -> None:
    coupon = services.create_coupon(name="HOT", amount=10, stock_shards=4)
    services.claim_coupon(coupon_name="HOT", user_id="alice")
    shards = list(StockShard.objects.filter(coupon=coupon).values_list("pk", "remaining_amount"))

    response = change(admin_client, coupon, 10, 4)

    assert response.status_code == 302
    # The same rows, not made anew: claims waiting for one of them are not sent round again.
    assert list(StockShard.objects.filter(coupon=coupon).values_list("pk", "remaining_amount")) == (
        shards
    )
    assert Coupon.objects.get(pk=coupon.pk).updated_at == coupon.updated_at


@pytest.fixture
def sharded_coupons() -> None:
    """OPEN: 10 units over 4 shards, 3 claimed; GONE: 2 units over 4 shards, both claimed."""
    services.create_coupon(name="OPEN", amount=10, stock_shards=4)
    services.create_coupon(name="GONE", amount=2, stock_shards=4)
    for user in ["alice", "bob", "carol"]:
        services.claim_coupon(coupon_name="OPEN", user_id=user)
    for user in ["alice", "bob"]:
        services.claim_coupon(coupon_name="GONE", user_id=user)


def test_the_changelist_shows_the_stock_summed_over_the_shards(
    admin_client: Client, sharded_coupons: None
) -> None:
    response = admin_client.get("/admin/coupons/coupon/")

    assert response.status_code == 200
    page = response.content.decode()
    remaining = dict(
        re.findall(r">(OPEN|GONE)</a>.*?<td class=\"field-remaining\">(\d+)</td>", page, re.S)
    )
    assert remaining == {"OPEN": "7", "GONE": "0"}
    rows = {coupon.name: coupon for coupon in response.context["cl"].result_list}
    assert (rows["OPEN"].claimed_count, rows["GONE"].claimed_count) == (3, 2)


def test_the_sale_panel_shows_the_stock_summed_over_the_shards(
    admin_client: Client, sharded_coupons: None
) -> None:
    coupon = Coupon.objects.get(name="OPEN")

    for page in [
        f"/admin/coupons/coupon/{coupon.pk}/change/",
        f"/admin/coupons/coupon/{coupon.pk}/activity/",
    ]:
        content = admin_client.get(page).content.decode()
        numbers = re.search(
            r'id="sale-claimed">(\d+)</strong> of (\d+) claimed.*?id="sale-remaining">(\d+)<',
            content,
            re.S,
        )
        assert numbers is not None, page
        assert numbers.groups() == ("3", "10", "7"), page


@pytest.mark.parametrize(("sale", "names"), [("on_sale", {"OPEN"}), ("sold_out", {"GONE"})])
def test_the_sale_filter_sums_the_shards(
    admin_client: Client, sharded_coupons: None, sale: str, names: set[str]
) -> None:
    response = admin_client.get(f"/admin/coupons/coupon/?sale={sale}")

    assert {coupon.name for coupon in response.context["cl"].result_list} == names


def test_revoking_a_claim_of_a_sharded_coupon_in_the_admin_returns_its_unit(
    admin_client: Client, sharded_coupons: None
) -> None:
    gone = Coupon.objects.get(name="GONE")
    alice = ClaimHistory.objects.get(coupon=gone, user_id="alice")

    response = admin_client.post(
        "/admin/coupons/claimhistory/",
        {"action": "revoke", "_selected_action": [alice.pk]},
        follow=True,
    )

    assert "Revoked 1 claims; their units are back in stock." in response.content.decode()
    assert claimants_of(gone) == ["bob"]
    assert stock_left(gone) == 1
    assert sum(shard_stock(gone)) == 1 and shard_numbers(gone) == [0, 1, 2, 3]
    services.claim_coupon(coupon_name="GONE", user_id="alice")  # The unit is claimable.
    assert stock_left(gone) == 0


# seed_coupons


@pytest.mark.parametrize("how", ["argument", "option"])
def test_seed_splits_argument_coupons_over_the_shards_asked(how: str) -> None:
    if how == "argument":
        call_command("seed_coupons", "HOT:100", "SMALL:5", "--stock-shards", "16")
    else:
        call_command("seed_coupons", "HOT:100", "SMALL:5", stock_shards=16)

    for name, amount in [("HOT", 100), ("SMALL", 5)]:
        coupon = Coupon.objects.get(name=name)
        assert coupon.stock_shards == 16
        assert_stock_is_where_the_shards_say(coupon, amount)


def test_seed_reads_stock_shards_from_csv_and_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "coupons.csv"
    csv_path.write_text("name,amount,stock_shards\nSPLIT,10,4\nPLAIN,3,\n")
    json_path = tmp_path / "coupons.json"
    json_path.write_text(json.dumps([{"name": "JSON", "amount": 7, "stock_shards": 2}]))

    call_command("seed_coupons", "--file", str(csv_path))
    call_command("seed_coupons", "--file", str(json_path))

    shards = dict(Coupon.objects.values_list("name", "stock_shards"))
    assert shards == {"SPLIT": 4, "PLAIN": 1, "JSON": 2}
    for name, amount in [("SPLIT", 10), ("PLAIN", 3), ("JSON", 7)]:
        assert_stock_is_where_the_shards_say(Coupon.objects.get(name=name), amount)


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ("0", "stock_shards: Ensure this value is greater than or equal to 1."),
        ("65", "stock_shards: Ensure this value is less than or equal to 64."),
        ("x", "stock_shards: Must be an integer."),
    ],
)
def test_seed_refuses_stock_shards_out_of_range_in_a_file(
    tmp_path: Path, shards: str, message: str
) -> None:
    csv_path = tmp_path / "coupons.csv"
    csv_path.write_text(f"name,amount,stock_shards\nOK,10,4\nBAD,10,{shards}\n")
    json_path = tmp_path / "coupons.json"
    value: Any = int(shards) if shards.isdigit() else shards
    json_path.write_text(json.dumps([{"name": "BAD", "amount": 10, "stock_shards": value}]))

    with pytest.raises(CommandError) as from_csv:
        call_command("seed_coupons", "--file", str(csv_path))
    with pytest.raises(CommandError) as from_json:
        call_command("seed_coupons", "--file", str(json_path))

    assert f"coupons.csv line 3: {message}" in str(from_csv.value)
    assert f"coupons.json item 1: {message}" in str(from_json.value)
    assert not Coupon.objects.exists()
    assert not StockShard.objects.exists()


@pytest.mark.parametrize(
    ("shards", "message"),
    [
        ("0", "stock_shards: Ensure this value is greater than or equal to 1."),
        ("65", "stock_shards: Ensure this value is less than or equal to 64."),
        ("x", "invalid int value: 'x'"),
    ],
)
def test_seed_refuses_a_stock_shards_option_out_of_range(shards: str, message: str) -> None:
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("seed_coupons", "HOT:100", "OK:1", "--stock-shards", shards)

    assert not Coupon.objects.exists()
    assert not StockShard.objects.exists()


def test_seed_refuses_the_stock_shards_option_beside_a_file(tmp_path: Path) -> None:
    path = tmp_path / "coupons.csv"
    path.write_text("name,amount\nA,1\n")

    with pytest.raises(CommandError, match="apply to NAME:AMOUNT arguments"):
        call_command("seed_coupons", "--file", str(path), "--stock-shards", "4")
    assert not Coupon.objects.exists()


# audit_coupons


@pytest.fixture
def audited_coupons() -> dict[str, Coupon]:
    """Healthy coupons with claims: on one row, over 4 shards, over 64 shards (half empty)."""
    coupons = {
        "ROW": services.create_coupon(name="ROW", amount=3),
        "SPLIT": services.create_coupon(name="SPLIT", amount=10, stock_shards=4),
        "WIDE": services.create_coupon(name="WIDE", amount=32, stock_shards=64),
    }
    for name in coupons:
        for user in ["alice", "bob"]:
            services.claim_coupon(coupon_name=name, user_id=user)
    return coupons


def test_audit_passes_on_healthy_sharded_coupons(
    audited_coupons: dict[str, Coupon], capsys: pytest.CaptureFixture[str]
) -> None:
    call_command("audit_coupons")

    assert "All 3 coupons are consistent." in capsys.readouterr().out


def audit_failures(capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run the audit, which must fail; its error and its report."""
    with pytest.raises(CommandError) as failed:
        call_command("audit_coupons")
    return str(failed.value), capsys.readouterr().err


def test_audit_names_a_coupon_whose_shard_stock_was_tampered_with(
    audited_coupons: dict[str, Coupon], capsys: pytest.CaptureFixture[str]
) -> None:
    split = audited_coupons["SPLIT"]
    StockShard.objects.filter(coupon=split, number=1).update(  # Bypasses the service.
        remaining_amount=F("remaining_amount") + 1
    )

    error, report = audit_failures(capsys)

    assert "1 of 3 coupons break the stock invariant" in error
    assert "MISMATCH SPLIT: amount 10, remaining 9, claims 2 (expected remaining 8)" in report
    assert "ROW" not in report and "WIDE" not in report


@pytest.mark.parametrize("with_stock", [True, False], ids=["with-stock", "empty"])
def test_audit_names_a_coupon_with_a_shard_row_missing(
    audited_coupons: dict[str, Coupon], capsys: pytest.CaptureFixture[str], with_stock: bool
) -> None:
    shards = StockShard.objects.filter(coupon=audited_coupons["WIDE"])
    held = (
        shards.filter(remaining_amount__gt=0) if with_stock else shards.filter(remaining_amount=0)
    )
    shards.filter(pk=held.order_by("number").values("pk")[:1]).delete()

    error, report = audit_failures(capsys)

    assert "1 of 3 coupons break the stock invariant" in error
    assert "SHARDS WIDE: stock_shards 64, shard rows 63" in report
    assert ("MISMATCH WIDE" in report) == with_stock
    assert "ROW" not in report and "SPLIT" not in report


def test_audit_names_a_coupon_whose_shard_is_numbered_beyond_its_shards(
    audited_coupons: dict[str, Coupon], capsys: pytest.CaptureFixture[str]
) -> None:
    split = audited_coupons["SPLIT"]
    StockShard.objects.filter(coupon=split, number=3).update(number=4)

    error, report = audit_failures(capsys)

    assert "1 of 3 coupons break the stock invariant" in error
    assert "SHARDS SPLIT: stock_shards 4, shard rows 4" in report


def test_audit_names_a_one_row_coupon_with_a_stray_shard(
    audited_coupons: dict[str, Coupon], capsys: pytest.CaptureFixture[str]
) -> None:
    StockShard.objects.create(coupon=audited_coupons["ROW"], number=0, remaining_amount=0)

    error, report = audit_failures(capsys)

    assert "1 of 3 coupons break the stock invariant" in error
    assert "SHARDS ROW: stock_shards 1, shard rows 1" in report
    assert "SPLIT" not in report and "WIDE" not in report
