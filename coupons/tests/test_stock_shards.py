"""Stock shards, called through the service: each claim locks one shard, with real threads and
connections on PostgreSQL holding the others."""

import contextlib
import datetime
import threading
from collections.abc import Iterator

import psycopg
import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from coupons import services
from coupons.errors import AlreadyClaimed, OutOfStock, SaleEnded, SaleNotStarted
from coupons.models import Coupon, StockShard, split_stock
from coupons.tests.test_services import a_claim_waits_for_a_lock, claimants, in_threads

pytestmark = pytest.mark.django_db(transaction=True)


def shard_stock(coupon: Coupon) -> list[int]:
    """The stock of each shard of the coupon, by number."""
    shards = StockShard.objects.filter(coupon=coupon).order_by("number")
    return list(shards.values_list("remaining_amount", flat=True))


def stock_left(coupon: Coupon) -> int:
    return Coupon.objects.with_stock().get(pk=coupon.pk).stock_left


@contextlib.contextmanager
def shards_held(coupon: Coupon, *numbers: int) -> Iterator[psycopg.Connection]:
    """Hold these shards locked from another connection, as claims in progress would,
    until the block ends (then commit what it did with them)."""
    with psycopg.connect(**connection.get_connection_params()) as other:
        other.execute(
            "SELECT id FROM coupons_stockshard WHERE coupon_id = %s AND number = ANY(%s)"
            " FOR NO KEY UPDATE",
            [coupon.pk, list(numbers)],
        )
        yield other
        other.commit()


def claim_in_a_thread(user_id: str, name: str = "PROMO") -> tuple[threading.Thread, list[object]]:
    """Start a claim in a thread of its own; its outcome (the claim, or what it raised)
    lands in the list."""
    outcome: list[object] = []

    def claim() -> None:
        try:
            outcome.append(services.claim_coupon(coupon_name=name, user_id=user_id))
        except Exception as refused:  # noqa: BLE001 - the outcome is the test's to judge
            outcome.append(refused)
        finally:
            connection.close()

    thread = threading.Thread(target=claim)
    thread.start()
    return thread, outcome


def claims_while(held: contextlib.AbstractContextManager[object], user_id: str = "u") -> bool:
    """Whether a claim made while `held` is entered succeeds without waiting for it to end."""
    with held:
        thread, outcome = claim_in_a_thread(user_id)
        thread.join(10)
        finished_while_held = not thread.is_alive()
    thread.join(10)
    return finished_while_held and not isinstance(outcome[0], Exception)


@contextlib.contextmanager
def coupon_row_held(coupon: Coupon) -> Iterator[None]:
    """Hold the coupon's row locked from another connection, as a claim of a one-row coupon
    or an operator's change would."""
    with psycopg.connect(**connection.get_connection_params()) as other:
        other.execute("SELECT id FROM coupons_coupon WHERE id = %s FOR NO KEY UPDATE", [coupon.pk])
        yield


def test_the_stock_is_split_as_evenly_as_it_goes() -> None:
    assert split_stock(10, 4) == [3, 3, 2, 2]
    assert split_stock(3, 8) == [1, 1, 1, 0, 0, 0, 0, 0]
    assert split_stock(64, 64) == [1] * 64


def test_a_coupon_with_shards_keeps_its_stock_in_them() -> None:
    coupon = services.create_coupon(name="PROMO", amount=10, stock_shards=4)

    assert shard_stock(coupon) == [3, 3, 2, 2]
    assert Coupon.objects.get(pk=coupon.pk).remaining_amount == 0
    assert (coupon.stock_left, stock_left(coupon), coupon.claimed_count) == (10, 10, 0)


def test_claims_take_every_unit_of_every_shard_then_find_it_sold_out() -> None:
    coupon = services.create_coupon(name="PROMO", amount=6, stock_shards=4)

    for index in range(6):
        services.claim_coupon(coupon_name="PROMO", user_id=f"u{index}")

    assert shard_stock(coupon) == [0, 0, 0, 0]
    with pytest.raises(OutOfStock):
        services.claim_coupon(coupon_name="PROMO", user_id="late")
    services.sold_out_memory.clear()
    with pytest.raises(AlreadyClaimed):  # Holding it comes before the stock, as with one row.
        services.claim_coupon(coupon_name="PROMO", user_id="u3")
    assert (stock_left(coupon), len(claimants(coupon))) == (0, 6)


def test_a_claim_passes_a_shard_another_claim_holds() -> None:
    coupon = services.create_coupon(name="PROMO", amount=10, stock_shards=2)

    assert claims_while(shards_held(coupon, 0))
    assert shard_stock(coupon) == [5, 4]


def test_a_claim_leaves_the_coupon_row_to_other_claims() -> None:
    # A claim of a coupon with shards locks no more than its shard: the coupon's row, held
    # as a claim of a one-row coupon would hold it, does not stop it.
    coupon = services.create_coupon(name="PROMO", amount=10, stock_shards=2)

    assert claims_while(coupon_row_held(coupon))
    assert stock_left(coupon) == 9


def test_a_claim_waits_for_a_shard_when_every_shard_with_stock_is_busy() -> None:
    coupon = services.create_coupon(name="PROMO", amount=2, stock_shards=2)

    with shards_held(coupon, 0, 1) as other:
        thread, outcome = claim_in_a_thread("u")
        assert a_claim_waits_for_a_lock("FOR NO KEY UPDATE OF")
        # The holder takes the last unit of shard 0 and leaves: a claim waiting for it
        # goes on to shard 1.
        other.execute(
            "UPDATE coupons_stockshard SET remaining_amount = 0"
            " WHERE coupon_id = %s AND number = 0",
            [coupon.pk],
        )
    thread.join(10)

    assert not thread.is_alive()
    assert not isinstance(outcome[0], Exception), outcome
    assert shard_stock(coupon) == [0, 0]
    assert claimants(coupon) == ["u"]


def claim_while_an_operator_sets_the_window(
    coupon: Coupon, ends_at: datetime.datetime | None
) -> object:
    """Claim the coupon (as "late") while an operator's change of its sale window, to end at
    `ends_at`, holds every shard; let the change commit, and return the claim's outcome."""
    changed, commit = threading.Event(), threading.Event()

    def operator() -> None:
        try:
            with transaction.atomic():
                services.change_sale_window(coupon_id=coupon.pk, starts_at=None, ends_at=ends_at)
                changed.set()
                commit.wait(10)
        finally:
            connection.close()

    changing = threading.Thread(target=operator)
    changing.start()
    assert changed.wait(10)
    thread, outcome = claim_in_a_thread("late")
    # Every shard is the operator's: the claim waits for one, having read the window as it
    # stood before the change committed.
    assert a_claim_waits_for_a_lock("FOR NO KEY UPDATE OF")
    commit.set()
    changing.join(10)
    thread.join(10)
    return outcome[0]


def test_a_claim_waiting_for_a_shard_sees_the_window_an_operator_closed_meanwhile() -> None:
    coupon = services.create_coupon(name="PROMO", amount=10, stock_shards=2)
    services.claim_coupon(coupon_name="PROMO", user_id="early")  # Its route is remembered.

    outcome = claim_while_an_operator_sets_the_window(
        coupon, ends_at=timezone.now() - datetime.timedelta(seconds=1)
    )

    assert isinstance(outcome, SaleEnded), outcome
    assert claimants(coupon) == ["early"]
    assert stock_left(coupon) == 9


def test_a_claim_waiting_for_a_shard_sees_the_window_an_operator_reopened_meanwhile() -> None:
    coupon = services.create_coupon(name="PROMO", amount=10, stock_shards=2)
    services.claim_coupon(coupon_name="PROMO", user_id="early")  # Its route is remembered.
    # Closed by another process, behind this one's back: the route stays remembered.
    Coupon.objects.filter(pk=coupon.pk).update(
        ends_at=timezone.now() - datetime.timedelta(seconds=1), updated_at=timezone.now()
    )

    outcome = claim_while_an_operator_sets_the_window(coupon, ends_at=None)

    assert not isinstance(outcome, Exception), outcome
    assert claimants(coupon) == ["early", "late"]
    assert stock_left(coupon) == 8


def test_concurrent_claims_on_sharded_stock_never_exceed_it() -> None:
    coupon = services.create_coupon(name="PROMO", amount=5, stock_shards=8)

    outcomes = in_threads(
        40, lambda index: services.claim_coupon(coupon_name="PROMO", user_id=f"u{index}")
    )

    assert outcomes.count(None) == 5
    assert all(isinstance(outcome, OutOfStock) for outcome in outcomes if outcome), outcomes
    assert (stock_left(coupon), len(claimants(coupon))) == (0, 5)


def test_concurrent_claims_by_one_user_on_different_shards_give_one_unit() -> None:
    coupon = services.create_coupon(name="PROMO", amount=16, stock_shards=16)

    outcomes = in_threads(
        10, lambda index: services.claim_coupon(coupon_name="PROMO", user_id="same")
    )

    # Each takes a shard of its own; the unique index on (coupon, user) refuses all but one.
    assert outcomes.count(None) == 1
    assert all(isinstance(outcome, AlreadyClaimed) for outcome in outcomes if outcome)
    assert (stock_left(coupon), claimants(coupon)) == (15, ["same"])


def test_changing_the_shards_keeps_every_unit_and_claim() -> None:
    coupon = services.create_coupon(name="PROMO", amount=10)
    for user_id in ["a", "b", "c"]:
        services.claim_coupon(coupon_name="PROMO", user_id=user_id)

    services.change_stock_shards(coupon_id=coupon.pk, stock_shards=8)
    assert shard_stock(coupon) == [1] * 7 + [0]
    assert Coupon.objects.get(pk=coupon.pk).remaining_amount == 0
    services.claim_coupon(coupon_name="PROMO", user_id="d")

    services.change_stock_shards(coupon_id=coupon.pk, stock_shards=3)
    assert shard_stock(coupon) == [2, 2, 2]
    with pytest.raises(AlreadyClaimed):
        services.claim_coupon(coupon_name="PROMO", user_id="a")

    back = services.change_stock_shards(coupon_id=coupon.pk, stock_shards=1)
    assert (back.remaining_amount, back.stock_left) == (6, 6)
    assert shard_stock(coupon) == []
    services.claim_coupon(coupon_name="PROMO", user_id="e")
    assert (stock_left(coupon), claimants(coupon)) == (5, ["a", "b", "c", "d", "e"])


def test_amounts_and_revocations_of_a_sharded_coupon_move_its_shards() -> None:
    coupon = services.create_coupon(name="PROMO", amount=4, stock_shards=4)
    claims = [services.claim_coupon(coupon_name="PROMO", user_id=f"u{i}") for i in range(4)]
    with pytest.raises(OutOfStock):
        services.claim_coupon(coupon_name="PROMO", user_id="late")

    assert services.revoke_claim(claim_id=claims[0].pk)
    assert sorted(shard_stock(coupon)) == [0, 0, 0, 1]
    # The revocation is seen at once, though the coupon was remembered sold out.
    services.claim_coupon(coupon_name="PROMO", user_id="late")

    changed = services.change_coupon_amount(coupon_id=coupon.pk, amount=10)
    assert (changed.stock_left, shard_stock(coupon)) == (6, [2, 2, 1, 1])


def test_claims_racing_changes_of_the_shards_sell_every_unit_once() -> None:
    coupon = services.create_coupon(name="PROMO", amount=20, stock_shards=4)
    shapes = [16, 1, 2, 64, 3]

    def act(index: int) -> None:
        if index < len(shapes):
            services.change_stock_shards(coupon_id=coupon.pk, stock_shards=shapes[index])
        else:
            with contextlib.suppress(OutOfStock):
                services.claim_coupon(coupon_name="PROMO", user_id=f"u{index}")

    outcomes = in_threads(len(shapes) + 30, act)

    assert outcomes == [None] * (len(shapes) + 30)
    # 30 shoppers for 20 units: none was told "sold out" while a unit was left anywhere.
    assert (stock_left(coupon), len(set(claimants(coupon)))) == (0, 20)


def test_a_sold_out_sharded_coupon_is_refused_from_memory() -> None:
    services.create_coupon(name="PROMO", amount=2, stock_shards=2)
    services.claim_coupon(coupon_name="PROMO", user_id="a")
    services.claim_coupon(coupon_name="PROMO", user_id="b")
    with pytest.raises(OutOfStock):
        services.claim_coupon(coupon_name="PROMO", user_id="c")

    with CaptureQueriesContext(connection) as queries, pytest.raises(OutOfStock):
        services.claim_coupon(coupon_name="PROMO", user_id="d")
    with CaptureQueriesContext(connection) as more, pytest.raises(AlreadyClaimed):
        services.claim_coupon(coupon_name="PROMO", user_id="a")

    assert (len(queries), len(more)) == (0, 0)


def test_a_timed_sale_sold_out_on_its_shards_still_tells_its_holders_they_hold_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opening = timezone.now() + datetime.timedelta(hours=1)
    services.create_coupon(name="PROMO", amount=2, stock_shards=2, starts_at=opening)
    with pytest.raises(SaleNotStarted):  # Remembered: not on sale yet, nobody holds it.
        services.claim_coupon(coupon_name="PROMO", user_id="a")

    # The sale opens and sells out on its shards, which leave the coupon's row as it was.
    later = opening + datetime.timedelta(seconds=1)
    monkeypatch.setattr(timezone, "now", lambda: later)
    services.claim_coupon(coupon_name="PROMO", user_id="a")
    services.claim_coupon(coupon_name="PROMO", user_id="b")
    with pytest.raises(OutOfStock):
        services.claim_coupon(coupon_name="PROMO", user_id="c")

    with pytest.raises(AlreadyClaimed):
        services.claim_coupon(coupon_name="PROMO", user_id="a")
