"""The operators' commands: seed_coupons and audit_coupons."""

import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from coupons import services
from coupons.models import Coupon

pytestmark = pytest.mark.django_db


def stock() -> dict[str, tuple[int, int]]:
    return {c.name: (c.amount, c.remaining_amount) for c in Coupon.objects.all()}


def test_seed_creates_coupons_from_arguments_and_is_safe_to_rerun(
    capsys: pytest.CaptureFixture[str],
) -> None:
    call_command("seed_coupons", "PROMO_SUPER:100", "TIME:10:30:5", verbosity=2)
    first = capsys.readouterr().out
    call_command("seed_coupons", "PROMO_SUPER:999", "NEW:1")
    second = capsys.readouterr().out

    assert stock() == {"PROMO_SUPER": (100, 100), "TIME:10:30": (5, 5), "NEW": (1, 1)}
    assert "created PROMO_SUPER (amount 100)" in first and "2 created, 0 skipped" in first
    assert "1 created, 1 skipped (already exist). Skipped: PROMO_SUPER" in second


def test_seed_says_nothing_at_verbosity_zero(capsys: pytest.CaptureFixture[str]) -> None:
    call_command("seed_coupons", "PROMO_SUPER:100", verbosity=0)

    assert capsys.readouterr() == ("", "")
    assert stock() == {"PROMO_SUPER": (100, 100)}


def test_seed_reads_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "coupons.json"
    path.write_text(json.dumps([{"name": "A", "amount": 1}, {"name": "B券", "amount": 2}]))

    call_command("seed_coupons", "--file", str(path))

    assert stock() == {"A": (1, 1), "B券": (2, 2)}


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"], ids=["plain", "byte-order-mark"])
def test_seed_reads_a_csv_file(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "coupons.csv"
    path.write_text('name,amount\nA,1\n"Sale, big",20\n', encoding=encoding)

    call_command("seed_coupons", "--file", str(path))

    assert stock() == {"A": (1, 1), "Sale, big": (20, 20)}


def test_seed_names_every_invalid_coupon_in_plain_words(tmp_path: Path) -> None:
    path = tmp_path / "coupons.csv"
    path.write_text("name,amount\nOK,1\nZERO,0\nA/B,5\n")

    with pytest.raises(CommandError) as refused:
        call_command("seed_coupons", "--file", str(path))

    message = str(refused.value)
    assert "coupons.csv line 3: amount: Ensure this value is greater than or equal to 1." in message
    assert "coupons.csv line 4: name: Must not contain '/'." in message
    assert "ErrorDetail" not in message
    assert not Coupon.objects.exists()


def test_seed_refuses_a_name_given_twice(tmp_path: Path) -> None:
    path = tmp_path / "coupons.json"
    path.write_text(json.dumps([{"name": "A", "amount": 1}, {"name": "A", "amount": 2}]))

    with pytest.raises(CommandError, match="item 2: 'A' is already given at coupons.json item 1"):
        call_command("seed_coupons", "--file", str(path))
    assert not Coupon.objects.exists()


@pytest.mark.parametrize(("content", "suffix"), [("name,amount\n", ".csv"), ("[]", ".json")])
def test_seed_says_when_a_file_holds_no_coupons(tmp_path: Path, content: str, suffix: str) -> None:
    path = tmp_path / f"empty{suffix}"
    path.write_text(content)

    with pytest.raises(CommandError, match=f"empty{suffix} holds no coupons"):
        call_command("seed_coupons", "--file", str(path))


@pytest.mark.parametrize(
    ("content", "suffix"),
    [
        ('[{"name": "OK", "amount": 1}, {"name": "BAD", "amount": "5"}]', ".json"),
        ('[{"name": "OK", "amount": 1}, {"name": "a/b", "amount": 5}]', ".json"),
        ('[{"name": "OK", "amount": 1, "remaining_amount": 0}]', ".json"),
        ('{"name": "OK"}', ".json"),
        ("not json", ".json"),
        ("name,amount\nOK,1\nBAD,many\n", ".csv"),
        ("name,amount\nOK,0\n", ".csv"),
    ],
)
def test_seed_refuses_an_invalid_file_and_creates_nothing(
    tmp_path: Path, content: str, suffix: str
) -> None:
    path = tmp_path / f"coupons{suffix}"
    path.write_text(content)

    with pytest.raises(CommandError):
        call_command("seed_coupons", "--file", str(path))
    assert not Coupon.objects.exists()


@pytest.mark.parametrize("argument", ["NOAMOUNT", "X:", "X:-1", "X:ten", ":5"])
def test_seed_refuses_a_malformed_argument(argument: str) -> None:
    with pytest.raises(CommandError):
        call_command("seed_coupons", argument)
    assert not Coupon.objects.exists()


def test_seed_without_coupons_says_how_to_give_them() -> None:
    with pytest.raises(CommandError, match="NAME:AMOUNT"):
        call_command("seed_coupons")


def test_audit_passes_when_every_counter_matches_its_claims(
    capsys: pytest.CaptureFixture[str],
) -> None:
    services.create_coupon(name="A", amount=3)
    services.create_coupon(name="B", amount=1)
    services.claim_coupon(coupon_name="A", user_id="u")
    services.claim_coupon(coupon_name="B", user_id="u")

    call_command("audit_coupons")

    assert "All 2 coupons are consistent." in capsys.readouterr().out


def test_audit_fails_and_names_a_coupon_whose_counter_drifted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    services.create_coupon(name="GOOD", amount=3)
    services.create_coupon(name="DRIFTED", amount=3)
    services.claim_coupon(coupon_name="DRIFTED", user_id="u")
    Coupon.objects.filter(name="DRIFTED").update(remaining_amount=3)  # Bypasses the service.

    with pytest.raises(CommandError, match="1 of 2 coupons break the stock invariant; 0 have"):
        call_command("audit_coupons")
    report = capsys.readouterr().err
    assert "DRIFTED" in report and "expected remaining 2" in report
    assert "GOOD" not in report


def test_seed_lists_every_malformed_argument_with_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "coupons.csv"
    path.write_text("name,amount\nZERO,0\n")

    with pytest.raises(CommandError) as refused:
        call_command("seed_coupons", "A:²", "OK:1", "B:", "--file", str(path))

    message = str(refused.value)
    assert "argument 1: 'A:²' is not NAME:AMOUNT" in message
    assert "argument 3: 'B:' is not NAME:AMOUNT" in message
    assert "coupons.csv line 2: amount:" in message
    assert not Coupon.objects.exists()


def test_seed_names_csv_lines_as_the_file_numbers_them(tmp_path: Path) -> None:
    # A blank line, a quoted cell over two lines, a digit int() refuses, a cell too many.
    path = tmp_path / "coupons.csv"
    path.write_text('name,amount\n\n"two\nlines",²\nOK,1\nEXTRA,2,surplus\n')

    with pytest.raises(CommandError) as refused:
        call_command("seed_coupons", "--file", str(path))

    message = str(refused.value)
    assert "coupons.csv line 4: name: Must not contain control characters.; amount:" in message
    assert "coupons.csv line 6: cells beyond the header: Unknown field." in message
    assert "line 5" not in message
    assert not Coupon.objects.exists()


def test_audit_fails_and_names_a_coupon_whose_name_the_rules_refuse(
    capsys: pytest.CaptureFixture[str],
) -> None:
    services.create_coupon(name="GOOD", amount=3)
    Coupon.objects.create(name="   ", amount=1, remaining_amount=1)  # Bypasses the rules.

    with pytest.raises(CommandError, match="0 of 2 coupons break .*; 1 have a name"):
        call_command("audit_coupons")
    assert "NAME '   ': Must contain a character other than whitespace." in capsys.readouterr().err


def windows() -> dict[str, tuple[str | None, str | None]]:
    return {
        c.name: (
            c.starts_at.isoformat() if c.starts_at else None,
            c.ends_at.isoformat() if c.ends_at else None,
        )
        for c in Coupon.objects.all()
    }


def test_seed_gives_argument_coupons_a_sale_window() -> None:
    call_command("seed_coupons", "A:1", "B:2", starts_at="2030-01-01T09:00:00+01:00", ends_at=None)

    nine_in_paris = ("2030-01-01T08:00:00+00:00", None)
    assert windows() == {"A": nine_in_paris, "B": nine_in_paris}


def test_seed_reads_sale_windows_from_csv_and_json(tmp_path: Path) -> None:
    csv_path = tmp_path / "coupons.csv"
    csv_path.write_text(
        "name,amount,starts_at,ends_at\nOPEN,1,,\nTIMED,1,2030-01-01T10:00:00Z,2030-01-02T10:00:00Z\n"
    )
    json_path = tmp_path / "coupons.json"
    json_path.write_text(
        json.dumps([{"name": "LATER", "amount": 1, "ends_at": "2031-05-01T00:00:00Z"}])
    )

    call_command("seed_coupons", "--file", str(csv_path))
    call_command("seed_coupons", "--file", str(json_path))

    assert windows() == {
        "OPEN": (None, None),
        "TIMED": ("2030-01-01T10:00:00+00:00", "2030-01-02T10:00:00+00:00"),
        "LATER": (None, "2031-05-01T00:00:00+00:00"),
    }


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ("2030-01-01T10:00:00,", "starts_at: Must include a time zone"),
        ("2030-01-02T10:00:00Z,2030-01-01T10:00:00Z", "ends_at: ends_at must be after starts_at."),
        ("soon,", "starts_at: Datetime has wrong format."),
    ],
    ids=["no-time-zone", "backwards", "not-a-time"],
)
def test_seed_refuses_a_window_the_api_refuses(tmp_path: Path, cells: str, message: str) -> None:
    path = tmp_path / "coupons.csv"
    path.write_text(f"name,amount,starts_at,ends_at\nTIMED,1,{cells}\n")

    with pytest.raises(CommandError, match=message):
        call_command("seed_coupons", "--file", str(path))
    assert not Coupon.objects.exists()


def test_seed_refuses_argument_windows_beside_a_file(tmp_path: Path) -> None:
    path = tmp_path / "coupons.csv"
    path.write_text("name,amount\nA,1\n")

    with pytest.raises(CommandError, match="apply to NAME:AMOUNT arguments"):
        call_command("seed_coupons", "--file", str(path), starts_at="2030-01-01T00:00:00Z")


def test_seed_creates_thousands_of_coupons_in_bulk_skipping_those_that_exist(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], django_assert_max_num_queries: Any
) -> None:
    services.create_coupon(name="C00042", amount=7)
    path = tmp_path / "coupons.csv"
    path.write_text("name,amount\n" + "".join(f"C{n:05},{n + 1}\n" for n in range(2_500)))

    with django_assert_max_num_queries(20):  # Bulk inserts, not a statement per coupon.
        call_command("seed_coupons", "--file", str(path))

    output = capsys.readouterr()
    assert "2499 created, 1 skipped (already exist). Skipped: C00042" in output.out
    assert output.err == ""  # No progress bar when stderr is not a terminal.
    assert Coupon.objects.count() == 2_500
    assert stock()["C02499"] == (2_500, 2_500)
    assert stock()["C00042"] == (7, 7)


def test_seed_shows_its_progress_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("sys.stderr.isatty", lambda: True)

    call_command("seed_coupons", "A:1", "B:2")

    progress = capsys.readouterr().err
    assert "checking" in progress and "creating" in progress and "2/2" in progress
