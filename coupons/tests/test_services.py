"""The write paths, called directly: rules, database constraints, and real threads on PostgreSQL."""

import contextlib
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import DatabaseError, IntegrityError, OperationalError, connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from coupons import services
from coupons.errors import (
    AlreadyClaimed,
    AmountBelowClaimed,
    CouponExists,
    CouponNotFound,
    IdempotencyKeyReused,
    OutOfStock,
)
from coupons.models import ClaimHistory, Coupon


def claimants(coupon: Coupon) -> list[str]:
    return list(coupon.claims.order_by("id").values_list("user_id", flat=True))


@pytest.mark.django_db
class TestRules:
    def test_create_coupon_starts_with_the_whole_stock(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=7)
        assert (coupon.amount, coupon.remaining_amount, coupon.claimed_count) == (7, 7, 0)

    def test_create_coupon_twice_raises_coupon_exists(self) -> None:
        services.create_coupon(name="PROMO", amount=7)
        with pytest.raises(CouponExists):
            services.create_coupon(name="PROMO", amount=9)
        assert Coupon.objects.get().amount == 7

    def test_claim_checks_come_in_the_contract_order(self) -> None:
        services.create_coupon(name="PROMO", amount=1)
        with pytest.raises(CouponNotFound):
            services.claim_coupon(coupon_name="OTHER", user_id="u")
        services.claim_coupon(coupon_name="PROMO", user_id="u")
        with pytest.raises(AlreadyClaimed):
            services.claim_coupon(coupon_name="PROMO", user_id="u")
        with pytest.raises(OutOfStock):
            services.claim_coupon(coupon_name="PROMO", user_id="v")

    def test_raising_the_amount_adds_stock_and_keeps_claims(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=2)
        services.claim_coupon(coupon_name="PROMO", user_id="a")
        services.claim_coupon(coupon_name="PROMO", user_id="b")

        changed = services.change_coupon_amount(coupon_id=coupon.pk, amount=5)

        assert (changed.amount, changed.remaining_amount) == (5, 3)
        services.claim_coupon(coupon_name="PROMO", user_id="c")
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (2, ["a", "b", "c"])

    def test_lowering_the_amount_below_the_claims_is_refused(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        for user_id in ["a", "b", "c"]:
            services.claim_coupon(coupon_name="PROMO", user_id=user_id)

        with pytest.raises(AmountBelowClaimed):
            services.change_coupon_amount(coupon_id=coupon.pk, amount=2)
        lowered = services.change_coupon_amount(coupon_id=coupon.pk, amount=3)

        assert (lowered.amount, lowered.remaining_amount) == (3, 0)

    def test_revoking_a_claim_returns_its_unit_once(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=1)
        claim = services.claim_coupon(coupon_name="PROMO", user_id="a")

        assert services.revoke_claim(claim_id=claim.pk) is True
        assert services.revoke_claim(claim_id=claim.pk) is False

        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (1, [])
        services.claim_coupon(coupon_name="PROMO", user_id="a")


@pytest.mark.django_db
class TestDatabaseConstraints:
    """The invariants hold in the database even if application code were wrong."""

    def test_a_second_claim_row_for_the_same_user_is_refused(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        ClaimHistory.objects.create(coupon=coupon, user_id="u")
        with pytest.raises(IntegrityError), transaction.atomic():
            ClaimHistory.objects.create(coupon=coupon, user_id="u")

    @pytest.mark.parametrize("remaining_amount", [-1, 6])
    def test_the_stock_cannot_leave_zero_to_amount(self, remaining_amount: int) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        with pytest.raises(IntegrityError), transaction.atomic():
            Coupon.objects.filter(pk=coupon.pk).update(remaining_amount=remaining_amount)


@pytest.mark.django_db
def test_holder_checks_read_the_unique_index_even_on_a_young_table() -> None:
    # Without statistics on the claims table (a young one, say just deployed), PostgreSQL
    # would plan "coupon_id = … AND user_id = …" on the claimed_by index, if that index could
    # serve it, and then read every claim of the coupon on every claim. A temporary copy of
    # the table with its indexes is always that young: autovacuum never analyzes it.
    coupon = services.create_coupon(name="PROMO", amount=50)
    with CaptureQueriesContext(connection) as captured:
        # The lock-free look, and the lock statement: each asks whether the user holds it.
        services.claim_coupon(coupon_name="PROMO", user_id="u3")
    claims = ClaimHistory._meta.db_table
    plans = []
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TEMPORARY TABLE young (LIKE {claims} INCLUDING DEFAULTS INCLUDING INDEXES)"
        )
        cursor.execute(
            "INSERT INTO young (id, coupon_id, user_id, claimed_at)"
            " SELECT n, %s, 'u' || n, now() FROM generate_series(1, 20) n",
            [coupon.pk],
        )
        holder_checks = [
            query["sql"]
            for query in captured
            if query["sql"].startswith("SELECT") and claims in query["sql"]
        ]
        for sql in holder_checks:
            cursor.execute(f"EXPLAIN {sql.replace(claims, 'young')}")
            plans.append("\n".join(line for (line,) in cursor.fetchall()))
    assert len(plans) == 2
    for plan in plans:
        assert "young_coupon_id_user_id_key" in plan, plan
        assert "young_coupon_id_id_idx" not in plan, plan


def a_claim_waits_for_a_lock(statement: str = "FOR NO KEY UPDATE", within_s: float = 10) -> bool:
    """Wait until a claim's statement containing `statement` waits for a lock (the coupon's
    row, or another transaction's claim row in the unique index); False if none did."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            # Inside a transaction the statistics views keep their first reading.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE %s",
                [f"%{statement}%"],
            )
            (waiting,) = cursor.fetchone()
        if waiting:
            return True
        time.sleep(0.01)
    return False


def backend_pid() -> int:
    """The PostgreSQL backend of this thread's connection."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    return int(pid)


def statements_sent_by_a_claim_on_sale() -> list[str]:
    """The SQL a claim on a coupon on sale sends, in order, read from libpq's protocol trace."""
    services.create_coupon(name="PROMO", amount=5)
    services.claim_coupon(coupon_name="PROMO", user_id="first")
    pgconn = connection.connection.pgconn
    with tempfile.TemporaryFile() as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        finally:
            pgconn.untrace()
        trace.seek(0)
        # One message a line, but a statement's text keeps its own line breaks.
        messages = re.split(r"\n(?=[FB]\t)", trace.read().decode())
    # A simple query (F, length, "Query", ' "BEGIN"') or a statement parsed for its
    # parameters (F, length, "Parse", ' "<name>" "<SQL>" <parameter count> <types>').
    statements = []
    for message in messages:
        direction, _, kind, *rest = message.split("\t")
        if direction == "F" and kind == "Query":
            text = re.fullmatch(r' "(.*)"\s*', rest[0], re.S)
        elif direction == "F" and kind == "Parse":
            text = re.fullmatch(r' "[^"]*" "(.*)"[ \d]*\s*', rest[0], re.S)
        else:
            continue
        assert text, message
        statements.append(" ".join(text[1].split()))
    return statements


@contextlib.contextmanager
def row_locked_elsewhere(coupon_id: int) -> Iterator[None]:
    """Hold a coupon's row lock from another connection for the duration of the block."""
    with psycopg.connect(**connection.get_connection_params()) as other:
        other.execute(
            f"SELECT 1 FROM {Coupon._meta.db_table} WHERE id = %s FOR UPDATE", [coupon_id]
        )
        try:
            yield
        finally:
            other.rollback()


def row_is_locked(coupon_id: int) -> bool:
    """Whether another transaction holds a lock on the coupon's row that a claim would wait for."""
    with psycopg.connect(**connection.get_connection_params()) as other:
        try:
            other.execute(
                f"SELECT 1 FROM {Coupon._meta.db_table} WHERE id = %s FOR NO KEY UPDATE NOWAIT",
                [coupon_id],
            )
        except psycopg.errors.LockNotAvailable:
            return True
        return False


@contextlib.contextmanager
def unit_taken_while_the_claim_waits(
    coupon: Coupon, taker: str, idempotency_key: str | None = None, *, end_the_sale: bool = False
) -> Iterator[None]:
    """Another transaction takes a unit of the coupon for taker, holding its row lock, and
    commits once a claim's lock statement inside the block waits for that lock."""
    coupon_table, claim_table = Coupon._meta.db_table, ClaimHistory._meta.db_table
    waited: list[bool] = []
    with psycopg.connect(**connection.get_connection_params()) as other:
        other.execute(f"SELECT 1 FROM {coupon_table} WHERE id = %s FOR UPDATE", [coupon.pk])
        other.execute(
            f"INSERT INTO {claim_table} (coupon_id, user_id, idempotency_key, claimed_at)"
            " VALUES (%s, %s, %s, now())",
            [coupon.pk, taker, idempotency_key],
        )
        other.execute(
            f"UPDATE {coupon_table} SET remaining_amount = remaining_amount - 1,"
            " updated_at = now() WHERE id = %s",
            [coupon.pk],
        )
        if end_the_sale:
            other.execute(
                f"UPDATE {coupon_table} SET ends_at = now() - interval '1 second' WHERE id = %s",
                [coupon.pk],
            )

        def commit_once_the_claim_waits() -> None:
            waited.append(a_claim_waits_for_a_lock())
            connection.close()
            other.commit()

        committer = threading.Thread(target=commit_once_the_claim_waits)
        committer.start()
        try:
            yield
        finally:
            committer.join()
    assert waited == [True], "the claim never waited for the row lock"


# A claim by user "refused" fails as its transaction commits.
REFUSE_AT_COMMIT = """
    CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF NEW.user_id = 'refused' THEN RAISE EXCEPTION 'refused at commit'; END IF;
        RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON coupons_claimhistory
        DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
"""


@pytest.mark.django_db(transaction=True)
class TestClaimTransaction:
    """The claim's transaction on PostgreSQL: the row lock taken by select_for_update(), held
    through the checks and the writes, released at the commit."""

    def test_a_claim_on_sale_locks_the_coupon_row_first_in_its_transaction(self) -> None:
        coupon_table, claim_table = Coupon._meta.db_table, ClaimHistory._meta.db_table

        statements = statements_sent_by_a_claim_on_sale()

        assert len(statements) == 4, statements
        begin, lock, write, commit = statements
        assert (begin, commit) == ("BEGIN", "COMMIT")
        assert lock.startswith("SELECT") and f'FROM "{coupon_table}"' in lock, lock
        assert lock.endswith("FOR NO KEY UPDATE"), lock
        # The claim's INSERT and the stock's UPDATE, in one statement (claim_write.py).
        assert f'UPDATE "{coupon_table}" SET remaining_amount = remaining_amount - 1' in write
        assert f'INSERT INTO "{claim_table}"' in write

    def test_the_row_stays_locked_from_the_lock_statement_to_the_commit(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        checked, go_on = threading.Event(), threading.Event()
        take_unit = ClaimHistory.objects.take_unit

        def pause_after_the_checks(**fields: Any) -> tuple[ClaimHistory, Any]:
            checked.set()
            go_on.wait(10)
            return take_unit(**fields)

        monkeypatch.setattr(ClaimHistory.objects, "take_unit", pause_after_the_checks)
        claimer = threading.Thread(
            target=lambda: services.claim_coupon(coupon_name="PROMO", user_id="second")
        )
        claimer.start()
        try:
            assert checked.wait(10), "the claim never reached its write"
            locked_during_the_claim = row_is_locked(coupon.pk)
        finally:
            go_on.set()
            claimer.join()

        assert locked_during_the_claim
        assert not row_is_locked(coupon.pk)
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "second"])

    def test_a_claim_queues_for_the_row_lock_at_its_lock_statement(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        outcome: list[BaseException | None] = []

        with row_locked_elsewhere(coupon.pk):
            claimer = threading.Thread(
                target=lambda: outcome.extend(
                    in_threads(
                        1, lambda _: services.claim_coupon(coupon_name="PROMO", user_id="second")
                    )
                )
            )
            claimer.start()
            waited_at_the_lock_statement = a_claim_waits_for_a_lock("FOR NO KEY UPDATE")
        claimer.join()

        assert waited_at_the_lock_statement
        assert outcome == [None]
        coupon.refresh_from_db()
        assert claimants(coupon) == ["first", "second"]

    def test_a_coupon_deleted_during_its_sale_is_not_found_under_the_lock(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        assert services.on_sale_memory.get("PROMO") == (coupon.pk, 1)
        coupon.delete()

        with pytest.raises(CouponNotFound):
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        assert services.on_sale_memory.get("PROMO") is None

    def test_a_coupon_made_again_under_the_name_of_one_on_sale_is_the_one_claimed(self) -> None:
        services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        Coupon.objects.filter(name="PROMO").delete()
        again = services.create_coupon(name="PROMO", amount=1)

        claim = services.claim_coupon(coupon_name="PROMO", user_id="first")

        assert claim.coupon_id == again.pk
        again.refresh_from_db()
        assert (again.remaining_amount, claimants(again)) == (0, ["first"])

    def test_a_remembered_id_given_to_another_coupon_claims_nothing_of_it(self) -> None:
        # After a sequence reset (manage.py flush, say) a new coupon can get the id this
        # process remembers for a name: the name is checked on the row.
        coupon_id = services.create_coupon(name="PROMO", amount=5).pk
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        Coupon.objects.filter(pk=coupon_id).delete()
        other = Coupon.objects.create(pk=coupon_id, name="OTHER", amount=5, remaining_amount=5)

        with pytest.raises(CouponNotFound):
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        other.refresh_from_db()
        assert (other.remaining_amount, claimants(other)) == (5, [])

    def test_the_on_sale_memory_keeps_the_latest_coupons_only(self) -> None:
        memory = services.OnSaleMemory()
        for index in range(memory.max_coupons + 1):
            memory.add(f"coupon-{index}", index, 1)
        memory.add("coupon-2", 2, 1)  # Known already: nothing is dropped.

        assert memory.get("coupon-0") is None
        assert (memory.get("coupon-1"), memory.get("coupon-2")) == ((1, 1), (2, 1))
        assert memory.get(f"coupon-{memory.max_coupons}") == (memory.max_coupons, 1)

    def test_a_holder_whose_claim_committed_while_the_lock_was_awaited_hears_already_claimed(
        self,
    ) -> None:
        # The lock statement's snapshot predates its wait for the lock, and cannot see the
        # holder's claim; the contract still answers a holder before a sold-out coupon.
        coupon = services.create_coupon(name="PROMO", amount=2)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with (
            unit_taken_while_the_claim_waits(coupon, taker="u"),
            pytest.raises(AlreadyClaimed),
        ):
            services.claim_coupon(coupon_name="PROMO", user_id="u")
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (0, ["first", "u"])

    def test_a_repeat_committed_while_the_lock_was_awaited_meets_the_unique_index(self) -> None:
        # Stock is left, and the lock statement's EXISTS cannot see the user's claim that
        # committed during its wait: the write meets the unique index and rolls back whole.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with unit_taken_while_the_claim_waits(coupon, taker="u"), pytest.raises(AlreadyClaimed):
            services.claim_coupon(coupon_name="PROMO", user_id="u")
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "u"])

    @pytest.mark.parametrize("stock", [5, 2], ids=["stock-left", "last-unit"])
    def test_a_retry_whose_first_request_committed_while_it_waited_gets_that_claim(
        self, stock: int
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=stock)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with unit_taken_while_the_claim_waits(coupon, taker="u", idempotency_key="order-1"):
            claim = services.claim_coupon_idempotently(
                coupon_name="PROMO", user_id="u", idempotency_key="order-1"
            )
        assert claim.replayed and claim.user_id == "u"
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (stock - 2, ["first", "u"])

    def test_a_retry_queued_behind_its_first_try_gets_the_claim_though_the_sale_ended(
        self,
    ) -> None:
        # The first try commits its claim, and the sale closes, while the retry waits for
        # the lock: the key is checked under the lock before the window.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with unit_taken_while_the_claim_waits(
            coupon, taker="u", idempotency_key="order-1", end_the_sale=True
        ):
            claim = services.claim_coupon_idempotently(
                coupon_name="PROMO", user_id="u", idempotency_key="order-1"
            )
        assert claim.replayed and claim.user_id == "u"
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "u"])

    def test_a_key_taken_by_another_user_while_the_lock_was_awaited_is_refused(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with (
            unit_taken_while_the_claim_waits(coupon, taker="v", idempotency_key="order-1"),
            pytest.raises(IdempotencyKeyReused),
        ):
            services.claim_coupon_idempotently(
                coupon_name="PROMO", user_id="u", idempotency_key="order-1"
            )
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "v"])

    def test_a_coupon_sold_out_while_the_lock_was_awaited_is_remembered_as_it_stands(
        self,
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=2)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with unit_taken_while_the_claim_waits(coupon, taker="v"), pytest.raises(OutOfStock):
            services.claim_coupon(coupon_name="PROMO", user_id="u")

        # Answered from the sold-out memory, which knows the last unit's taker.
        with CaptureQueriesContext(connection) as captured:
            with pytest.raises(AlreadyClaimed):
                services.claim_coupon(coupon_name="PROMO", user_id="v")
            with pytest.raises(OutOfStock):
                services.claim_coupon(coupon_name="PROMO", user_id="w")
        assert list(captured) == []
        assert services.on_sale_memory.get("PROMO") is None

    def test_a_lock_timeout_is_a_database_error_and_the_connection_claims_on(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        try:
            with row_locked_elsewhere(coupon.pk):
                with connection.cursor() as cursor:
                    cursor.execute("SET lock_timeout = '100ms'")
                with pytest.raises(OperationalError, match="lock timeout"):
                    services.claim_coupon(coupon_name="PROMO", user_id="second")
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")

        assert services.claim_coupon(coupon_name="PROMO", user_id="second").user_id == "second"
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "second"])

    def test_a_lock_timeout_on_any_claim_of_a_connection_leaves_the_next_one_working(
        self,
    ) -> None:
        # Whichever run of the lock statement fails, the one that prepares it included
        # (after PREPARE_THRESHOLD runs): psycopg must not count as prepared a statement the
        # server did not keep.
        coupon = services.create_coupon(name="PROMO", amount=100)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        for earlier_claims in range(8):
            connection.close()
            for number in range(earlier_claims):
                services.claim_coupon(coupon_name="PROMO", user_id=f"{earlier_claims}-{number}")
            with row_locked_elsewhere(coupon.pk):
                with connection.cursor() as cursor:
                    cursor.execute("SET lock_timeout = '100ms'")
                with pytest.raises(OperationalError, match="lock timeout"):
                    services.claim_coupon(coupon_name="PROMO", user_id=f"{earlier_claims}-late")
            services.claim_coupon(coupon_name="PROMO", user_id=f"{earlier_claims}-after")

        coupon.refresh_from_db()
        assert coupon.remaining_amount == 100 - 1 - sum(range(8)) - 8
        assert not any(user.endswith("-late") for user in claimants(coupon))

    def test_an_error_at_the_commit_rolls_the_claim_back_and_the_next_claim_works(self) -> None:
        # A deferred trigger fails only as the transaction commits.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with connection.cursor() as cursor:
            cursor.execute(REFUSE_AT_COMMIT)
        try:
            with pytest.raises(DatabaseError):
                services.claim_coupon(coupon_name="PROMO", user_id="refused")
            services.claim_coupon(coupon_name="PROMO", user_id="after")
        finally:
            with connection.cursor() as cursor:
                cursor.execute("DROP FUNCTION refuse_at_commit() CASCADE")

        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "after"])

    def test_a_claim_after_its_connection_was_killed_fails_once_then_reconnects(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        backend = backend_pid()
        with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s, 5000)", [backend])

        with pytest.raises(OperationalError):
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        # No request boundary in between (close_old_connections) to replace the connection.
        services.claim_coupon(coupon_name="PROMO", user_id="third")

        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "third"])

    def test_a_connection_killed_before_the_commit_leaves_no_half_claim(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        backend = backend_pid()
        take_unit = ClaimHistory.objects.take_unit

        def killed_after_the_write(**fields: Any) -> tuple[ClaimHistory, Any]:
            claim = take_unit(**fields)
            with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
                other.execute("SELECT pg_terminate_backend(%s, 5000)", [backend])
            return claim

        monkeypatch.setattr(ClaimHistory.objects, "take_unit", killed_after_the_write)
        with pytest.raises(OperationalError):
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        monkeypatch.undo()
        services.claim_coupon(coupon_name="PROMO", user_id="third")

        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "third"])

    def test_a_claim_inside_a_callers_transaction_is_refused(self) -> None:
        services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")

        with transaction.atomic(), pytest.raises(RuntimeError, match="durable"):
            services.claim_coupon(coupon_name="PROMO", user_id="second")

    def test_a_claim_row_written_without_the_lock_still_meets_the_unique_index(self) -> None:
        # Were some code to write a claim without the coupon's lock, the claim's checks
        # could not see it coming; the unique index refuses the second claim, and the
        # whole transaction, unit included, is rolled back.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        written = threading.Event()
        answers: list[object] = []

        def stray_writer() -> None:
            with transaction.atomic():
                ClaimHistory.objects.create(coupon=coupon, user_id="u")
                written.set()
                # Commit only once the claim below waits on the unique index.
                assert a_claim_waits_for_a_lock("INSERT INTO"), "no wait on the unique index"

        def claimer() -> None:
            written.wait(10)
            try:
                services.claim_coupon(coupon_name="PROMO", user_id="u")
            except AlreadyClaimed as refused:
                answers.append(refused)
            # The connection is fit for the next claim.
            answers.append(services.claim_coupon(coupon_name="PROMO", user_id="after").user_id)

        outcomes = in_threads(2, lambda index: [stray_writer, claimer][index]())

        assert outcomes == [None, None]
        assert [type(answer) for answer in answers] == [AlreadyClaimed, str]
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (3, ["first", "u", "after"])

    def test_a_repeat_refused_by_the_unique_index_is_already_claimed_even_once_revoked(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # The unique index refused a user's repeat, and an operator revoked the claim that
        # held the coupon before the service could look: still already_claimed, as it was
        # when the index refused it, not a 500.
        coupon = services.create_coupon(name="PROMO", amount=5)
        held = services.claim_coupon(coupon_name="PROMO", user_id="u")
        with pytest.raises(IntegrityError) as refused, transaction.atomic():
            ClaimHistory.objects.create(coupon=coupon, user_id="u")
        services.revoke_claim(claim_id=held.pk)

        def refused_by_the_unique_index(**fields: Any) -> None:
            raise refused.value

        monkeypatch.setattr(ClaimHistory.objects, "take_unit", refused_by_the_unique_index)
        with pytest.raises(AlreadyClaimed):
            services.claim_coupon(coupon_name="PROMO", user_id="u")
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (5, [])


def in_threads(count: int, action: Callable[[int], object]) -> list[BaseException | None]:
    """Run action(index) in count threads started together; return what each raised."""
    barrier = threading.Barrier(count)
    outcomes: list[BaseException | None] = [None] * count

    def run(index: int) -> None:
        try:
            barrier.wait()
            action(index)
        except BaseException as error:  # noqa: BLE001 - the outcome is the test's to judge
            outcomes[index] = error
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.django_db(transaction=True)
class TestConcurrentServiceCalls:
    """Threads, each with its own PostgreSQL connection, racing through the service."""

    def test_concurrent_claims_never_exceed_the_stock(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)

        outcomes = in_threads(
            40, lambda index: services.claim_coupon(coupon_name="PROMO", user_id=f"u{index}")
        )

        assert outcomes.count(None) == 5
        assert all(isinstance(outcome, OutOfStock) for outcome in outcomes if outcome)
        coupon.refresh_from_db()
        assert coupon.remaining_amount == 0
        assert len(claimants(coupon)) == 5

    def test_concurrent_claims_by_one_user_give_one_unit(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=10)
        # Each repeat finds the first claim under the lock, or meets the unique index if
        # that claim committed after its lock statement's snapshot: already_claimed both.
        outcomes = in_threads(
            10, lambda index: services.claim_coupon(coupon_name="PROMO", user_id="same")
        )

        assert outcomes.count(None) == 1
        assert all(isinstance(outcome, AlreadyClaimed) for outcome in outcomes if outcome)
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (9, ["same"])

    def test_amount_changes_and_revocations_racing_claims_keep_the_invariant(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=10)
        early = [services.claim_coupon(coupon_name="PROMO", user_id=f"early{i}") for i in range(5)]

        def act(index: int) -> None:
            if index < 5:
                services.revoke_claim(claim_id=early[index].pk)
            elif index < 10:
                with contextlib.suppress(AmountBelowClaimed):
                    services.change_coupon_amount(coupon_id=coupon.pk, amount=10 + index)
            else:
                with contextlib.suppress(OutOfStock):
                    services.claim_coupon(coupon_name="PROMO", user_id=f"late{index}")

        outcomes = in_threads(40, act)

        assert outcomes == [None] * 40
        coupon.refresh_from_db()
        assert coupon.remaining_amount == coupon.amount - coupon.claims.count()
        assert 0 <= coupon.remaining_amount <= coupon.amount

    def test_a_rival_claim_landing_after_the_lock_free_look_ends_as_already_claimed(
        self,
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=1)
        look_before_queueing = services._look_before_queueing
        rivals: list[BaseException | None] = []

        def rival_commits_after_the_look(coupon_name: str, user_id: str) -> tuple[int, int]:
            # The same user's other request takes the last unit between this one's
            # lock-free look and its lock.
            coupon_id = look_before_queueing(coupon_name, user_id)
            if not rivals:
                rivals.append(None)
                services.on_sale_memory.clear()  # The rival looks too.
                rivals[:] = in_threads(
                    1, lambda _: services.claim_coupon(coupon_name="PROMO", user_id="u")
                )
            return coupon_id

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(services, "_look_before_queueing", rival_commits_after_the_look)
            with pytest.raises(AlreadyClaimed):
                services.claim_coupon(coupon_name="PROMO", user_id="u")

        assert rivals == [None]
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (0, ["u"])


@pytest.mark.django_db(transaction=True)  # The memory forgets as changes commit.
class TestSoldOutMemory:
    """Claims on a sold-out coupon are answered from memory, and never wrongly let through."""

    @pytest.fixture
    def sold_out(self) -> Coupon:
        coupon = services.create_coupon(name="PROMO", amount=1)
        services.claim_coupon(coupon_name="PROMO", user_id="holder")
        with pytest.raises(OutOfStock):  # This answer from the database is remembered.
            services.claim_coupon(coupon_name="PROMO", user_id="first-loser")
        return coupon

    def test_a_sold_out_coupon_is_answered_without_the_database(
        self, sold_out: Coupon, django_assert_num_queries: Any
    ) -> None:
        with django_assert_num_queries(0):
            with pytest.raises(OutOfStock):
                services.claim_coupon(coupon_name="PROMO", user_id="late")
            with pytest.raises(AlreadyClaimed):
                services.claim_coupon(coupon_name="PROMO", user_id="holder")

    def test_a_raise_of_stock_in_this_process_is_seen_at_once(self, sold_out: Coupon) -> None:
        services.change_coupon_amount(coupon_id=sold_out.pk, amount=2)

        services.claim_coupon(coupon_name="PROMO", user_id="late")

    def test_a_revocation_in_this_process_is_seen_at_once(self, sold_out: Coupon) -> None:
        services.revoke_claim(claim_id=sold_out.claims.get().pk)

        services.claim_coupon(coupon_name="PROMO", user_id="holder")

    def test_a_change_made_elsewhere_is_seen_once_the_memory_expires(
        self, sold_out: Coupon, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # As another process would: the row changes behind this process's back.
        Coupon.objects.filter(pk=sold_out.pk).update(
            amount=2, remaining_amount=1, updated_at=timezone.now()
        )
        with pytest.raises(OutOfStock):
            services.claim_coupon(coupon_name="PROMO", user_id="late")

        later = time.monotonic() + settings.SOLD_OUT_MEMORY_SECONDS + 0.1
        monkeypatch.setattr(time, "monotonic", lambda: later)

        services.claim_coupon(coupon_name="PROMO", user_id="late")

    def test_a_deleted_coupon_is_not_found_at_once(self, sold_out: Coupon) -> None:
        services.delete_coupon(coupon_id=sold_out.pk)

        with pytest.raises(CouponNotFound):
            services.claim_coupon(coupon_name="PROMO", user_id="late")

    def test_a_coupon_made_again_under_the_same_name_is_a_new_coupon_at_once(
        self, sold_out: Coupon
    ) -> None:
        # Deleted as another process would, behind this one's back; made again here.
        Coupon.objects.filter(pk=sold_out.pk).delete()
        services.create_coupon(name="PROMO", amount=1)

        services.claim_coupon(coupon_name="PROMO", user_id="holder")

    def test_a_change_inside_a_callers_transaction_is_forgotten_as_it_commits(
        self, sold_out: Coupon
    ) -> None:
        # As the admin calls the services: inside its own transaction.
        with transaction.atomic():
            services.change_coupon_amount(coupon_id=sold_out.pk, amount=2)
            with pytest.raises(OutOfStock):  # Not committed: still sold out.
                services.sold_out_memory.answer("PROMO", "late", timezone.now())

        services.claim_coupon(coupon_name="PROMO", user_id="late")

    def test_an_unchanged_coupon_is_checked_again_without_reloading_its_holders(
        self, sold_out: Coupon, monkeypatch: pytest.MonkeyPatch, django_assert_num_queries: Any
    ) -> None:
        later = time.monotonic() + settings.SOLD_OUT_MEMORY_SECONDS + 0.1
        monkeypatch.setattr(time, "monotonic", lambda: later)

        with django_assert_num_queries(1), pytest.raises(OutOfStock):
            services.claim_coupon(coupon_name="PROMO", user_id="late")

    def test_the_memory_can_be_turned_off(
        self, settings: Any, django_assert_num_queries: Any
    ) -> None:
        settings.SOLD_OUT_MEMORY_SECONDS = 0
        services.create_coupon(name="PROMO", amount=1)
        services.claim_coupon(coupon_name="PROMO", user_id="holder")
        with pytest.raises(OutOfStock):  # Sold out, as seen under the lock.
            services.claim_coupon(coupon_name="PROMO", user_id="first-loser")

        for _ in range(2):
            with django_assert_num_queries(1), pytest.raises(OutOfStock):
                services.claim_coupon(coupon_name="PROMO", user_id="late")
