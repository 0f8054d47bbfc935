"""The write paths, called directly: rules, database constraints, and real threads on PostgreSQL."""

import contextlib
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
        # The lock-free look, and the statement that takes a unit under the lock.
        services.claim_coupon(coupon_name="PROMO", user_id="u3")
    claims = ClaimHistory._meta.db_table
    plans = []
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE young (LIKE {claims} INCLUDING INDEXES)")
        cursor.execute(
            "INSERT INTO young (id, coupon_id, user_id, claimed_at)"
            " SELECT n, %s, 'u' || n, now() FROM generate_series(1, 20) n",
            [coupon.pk],
        )
        holder_checks = [query["sql"] for query in captured if claims in query["sql"]]
        for sql in holder_checks:
            cursor.execute(f"EXPLAIN {sql.replace(claims, 'young')}")
            plans.append("\n".join(line for (line,) in cursor.fetchall()))
    assert len(plans) == 2
    for plan in plans:
        assert "young_coupon_id_user_id_key" in plan, plan
        assert "young_coupon_id_id_idx" not in plan, plan


def a_claim_waits_for_a_lock(within_s: float = 10) -> bool:
    """Wait until a claim's statement waits for a lock (the coupon's row, or another
    transaction's claim row in the unique index); False if none did in time."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        with connection.cursor() as cursor:
            # Inside a transaction the statistics views keep their first reading.
            cursor.execute("SELECT pg_stat_clear_snapshot()")
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE wait_event_type = 'Lock' AND query LIKE '%%WITH taken AS%%'"
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


def protocol_messages_of_a_claim_on_sale(earlier_claims: int = 1) -> list[str]:
    """The protocol messages of a claim on a coupon on sale, from libpq's trace.

    One line per message in the order sent (F) and received (B), such as "F\t4\tSync".
    After more than PREPARE_THRESHOLD earlier claims, the statements run prepared.
    """
    services.create_coupon(name="PROMO", amount=earlier_claims + 1)
    for number in range(earlier_claims):
        services.claim_coupon(coupon_name="PROMO", user_id=f"earlier-{number}")
    pgconn = connection.connection.pgconn
    with tempfile.TemporaryFile() as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        finally:
            pgconn.untrace()
        trace.seek(0)
        return trace.read().decode().splitlines()


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


@contextlib.contextmanager
def last_unit_taken_while_the_claim_waits(coupon: Coupon, taker: str) -> Iterator[None]:
    """Another transaction takes the coupon's last unit for taker, holding its row lock, and
    commits once a claim's statement inside the block waits for that lock."""
    coupon_table, claim_table = Coupon._meta.db_table, ClaimHistory._meta.db_table
    with psycopg.connect(**connection.get_connection_params()) as other:
        other.execute(f"SELECT 1 FROM {coupon_table} WHERE id = %s FOR UPDATE", [coupon.pk])
        other.execute(
            f"INSERT INTO {claim_table} (coupon_id, user_id, claimed_at) VALUES (%s, %s, now())",
            [coupon.pk, taker],
        )
        other.execute(
            f"UPDATE {coupon_table} SET remaining_amount = 0, updated_at = now() WHERE id = %s",
            [coupon.pk],
        )

        def commit_once_the_claim_waits() -> None:
            a_claim_waits_for_a_lock()
            connection.close()
            other.commit()

        committer = threading.Thread(target=commit_once_the_claim_waits)
        committer.start()
        try:
            yield
        finally:
            committer.join()


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
    """How a claim reaches PostgreSQL while its coupon is on sale."""

    def test_a_claim_on_sale_skips_the_look_and_is_one_statement(self) -> None:
        services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with CaptureQueriesContext(connection) as captured:
            services.claim_coupon(coupon_name="PROMO", user_id="second")
        statements = [query["sql"] for query in captured]
        assert len(statements) == 1, statements
        assert statements[0].lstrip().startswith("WITH taken AS")

    def test_a_coupon_deleted_during_its_sale_is_not_found_under_the_lock(self) -> None:
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        assert services.on_sale_memory.get("PROMO") == coupon.pk
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
            memory.add(f"coupon-{index}", index)
        memory.add("coupon-2", 2)  # Known already: nothing is dropped.

        assert memory.get("coupon-0") is None
        assert (memory.get("coupon-1"), memory.get("coupon-2")) == (1, 2)
        assert memory.get(f"coupon-{memory.max_coupons}") == memory.max_coupons

    def test_the_statement_and_the_sync_are_sent_before_any_answer_is_read(self) -> None:
        # The Sync that commits must be on its way before the statement's answer comes
        # back, so that no worker needs a CPU while the coupon's row is locked.
        messages = protocol_messages_of_a_claim_on_sale()
        take_sent = next(i for i, line in enumerate(messages) if "WITH taken AS" in line)
        sync_sent = messages.index("F\t4\tSync")
        first_answer = next(i for i, line in enumerate(messages) if line.startswith("B\t"))
        assert take_sent < sync_sent < first_answer, messages

    @pytest.mark.parametrize("earlier_claims", [1, 10], ids=["parsed", "prepared"])
    def test_a_claim_on_sale_is_its_own_transaction_and_one_wait(self, earlier_claims: int) -> None:
        # In autocommit the statement commits at its Sync. An explicit transaction would
        # cost two more waits, for BEGIN's and COMMIT's answers, with the row locked.
        messages = protocol_messages_of_a_claim_on_sale(earlier_claims)
        threshold = settings.DATABASES["default"]["OPTIONS"].get("prepare_threshold")
        if threshold is not None and earlier_claims > threshold:
            assert not any("\tParse\t" in line for line in messages), messages
        sent = [line for line in messages if line.startswith("F\t")]
        assert [line for line in sent if line.endswith("\tSync")] == ["F\t4\tSync"], sent
        assert not any('"BEGIN"' in line or '"COMMIT"' in line for line in sent), sent

    def test_a_holder_whose_claim_committed_while_the_statement_waited_hears_already_claimed(
        self,
    ) -> None:
        # The statement's snapshot predates its wait for the lock, and cannot see the
        # holder's claim; the contract still answers a holder before a sold-out coupon.
        coupon = services.create_coupon(name="PROMO", amount=2)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with (
            last_unit_taken_while_the_claim_waits(coupon, taker="u"),
            pytest.raises(AlreadyClaimed),
        ):
            services.claim_coupon(coupon_name="PROMO", user_id="u")
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (0, ["first", "u"])

    def test_a_coupon_sold_out_while_the_statement_waited_is_remembered_as_it_stands(
        self,
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=2)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        with last_unit_taken_while_the_claim_waits(coupon, taker="v"), pytest.raises(OutOfStock):
            services.claim_coupon(coupon_name="PROMO", user_id="u")

        # Answered from the sold-out memory, which knows the last unit's taker.
        with CaptureQueriesContext(connection) as captured:
            with pytest.raises(AlreadyClaimed):
                services.claim_coupon(coupon_name="PROMO", user_id="v")
            with pytest.raises(OutOfStock):
                services.claim_coupon(coupon_name="PROMO", user_id="w")
        assert list(captured) == []
        assert services.on_sale_memory.get("PROMO") is None

    def test_stock_back_before_the_second_read_gets_the_claim_made(self) -> None:
        # An operator raises the amount between the statement that found no stock and the
        # read that follows it: there is stock again, so the claim is made once more.
        coupon = services.create_coupon(name="PROMO", amount=2)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        services.claim_coupon(coupon_name="PROMO", user_id="second")
        assert services.on_sale_memory.get("PROMO") == coupon.pk  # So the look is skipped.
        claim_outlook = Coupon.objects.claim_outlook

        def amount_raised_first(*args: Any) -> Any:
            services.change_coupon_amount(coupon_id=coupon.pk, amount=3)
            return claim_outlook(*args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Coupon.objects, "claim_outlook", amount_raised_first)
            claim = services.claim_coupon(coupon_name="PROMO", user_id="u")

        assert claim.user_id == "u"
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (0, ["first", "second", "u"])

    def test_a_killed_connection_inside_a_transaction_opened_by_hand_stays_the_callers(
        self,
    ) -> None:
        # Replacing it would let the caller's next writes commit one by one, on a fresh
        # connection in autocommit, after the first half of its transaction was lost.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        backend = backend_pid()

        def kill_once_the_claim_waits() -> None:
            try:
                a_claim_waits_for_a_lock()
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [backend])
            finally:
                connection.close()

        transaction.set_autocommit(False)
        try:
            with row_locked_elsewhere(coupon.pk):
                killer = threading.Thread(target=kill_once_the_claim_waits)
                killer.start()
                with pytest.raises(OperationalError):
                    services.claim_coupon(coupon_name="PROMO", user_id="second")
                killer.join()
            with pytest.raises(DatabaseError):
                Coupon.objects.filter(name="PROMO").update(amount=6)
        finally:
            connection.close()
            transaction.set_autocommit(True)
        assert Coupon.objects.get(name="PROMO").amount == 5

    def test_a_claim_inside_a_transaction_opened_by_hand_is_left_to_its_caller(self) -> None:
        # durable=True does not see a transaction opened by switching autocommit off; the
        # claim must then neither commit the caller's work nor outlive its rollback.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        transaction.set_autocommit(False)
        try:
            Coupon.objects.filter(pk=coupon.pk).update(amount=999)
            services.claim_coupon(coupon_name="PROMO", user_id="second")
            transaction.rollback()
        finally:
            transaction.set_autocommit(True)

        coupon.refresh_from_db()
        assert (coupon.amount, coupon.remaining_amount, claimants(coupon)) == (5, 4, ["first"])

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
        # Whichever run of the claim's statement fails, the one that prepares it included
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
        # A deferred trigger fails only as the implicit transaction commits, at the Sync.
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

    def test_a_claim_inside_a_callers_transaction_is_refused(self) -> None:
        services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")

        with transaction.atomic(), pytest.raises(RuntimeError, match="durable"):
            services.claim_coupon(coupon_name="PROMO", user_id="second")

    def test_a_claim_row_written_without_the_lock_still_meets_the_unique_index(self) -> None:
        # Were some code to write a claim without the coupon's lock, the statement taking
        # the unit could not see it coming; the unique index refuses the second claim, and
        # the whole transaction, unit included, is rolled back.
        coupon = services.create_coupon(name="PROMO", amount=5)
        services.claim_coupon(coupon_name="PROMO", user_id="first")
        written = threading.Event()
        answers: list[object] = []

        def stray_writer() -> None:
            with transaction.atomic():
                ClaimHistory.objects.create(coupon=coupon, user_id="u")
                written.set()
                # Commit only once the claim below waits on the unique index.
                assert a_claim_waits_for_a_lock(), "the claim never waited on the unique index"

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

        def refused_by_the_unique_index(*_: object) -> None:
            raise refused.value

        monkeypatch.setattr(
            services, "_take_one_unit_in_one_statement", refused_by_the_unique_index
        )
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
def test_the_claim_lock_statement_holds_the_coupon_row_until_the_transaction_ends() -> None:
    coupon = services.create_coupon(name="PROMO", amount=3)
    services.claim_coupon(coupon_name="PROMO", user_id="holder")

    def rival_claims_lock(_: int) -> None:
        with transaction.atomic():
            Coupon.objects.select_for_update(no_key=True, nowait=True).get(pk=coupon.pk)

    def lock(coupon_id: int) -> Any:
        with connection.cursor() as cursor:
            cursor.execute(*Coupon.objects.claim_lock(coupon_id))
            return cursor.fetchone()

    with transaction.atomic():
        locked = lock(coupon.pk)
        (while_held,) = in_threads(1, rival_claims_lock)
        assert lock(coupon.pk + 1) is None
    coupon.refresh_from_db()
    assert locked == (2, coupon.updated_at, "PROMO")
    assert isinstance(while_held, OperationalError)
    assert "could not obtain lock" in str(while_held)
    assert in_threads(1, rival_claims_lock) == [None]


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
        # A repeat that waited for the first one's lock is refused by the unique index,
        # one that came after by the statement's own check: both answer already_claimed.
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

    def test_a_rival_claim_landing_after_the_lock_free_check_ends_as_already_claimed(
        self,
    ) -> None:
        coupon = services.create_coupon(name="PROMO", amount=1)
        take_one_unit = Coupon.objects.take_one_unit
        rivals: list[BaseException | None] = []

        def rival_commits_first(*args: Any) -> tuple[str, list[Any]]:
            # The same user's other request takes the last unit between this one's
            # lock-free check and its claim statement.
            if not rivals:
                rivals.append(None)
                rivals[:] = in_threads(
                    1, lambda _: services.claim_coupon(coupon_name="PROMO", user_id="u")
                )
            return take_one_unit(*args)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(Coupon.objects, "take_one_unit", rival_commits_first)
            with pytest.raises(AlreadyClaimed):
                services.claim_coupon(coupon_name="PROMO", user_id="u")

        assert rivals == [None]
        coupon.refresh_from_db()
        assert (coupon.remaining_amount, claimants(coupon)) == (0, ["u"])


@pytest.mark.django_db
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

    def test_a_coupon_recreated_under_the_same_name_is_a_new_coupon(
        self, sold_out: Coupon, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sold_out.delete()
        services.create_coupon(name="PROMO", amount=1)
        later = time.monotonic() + settings.SOLD_OUT_MEMORY_SECONDS + 0.1
        monkeypatch.setattr(time, "monotonic", lambda: later)

        services.claim_coupon(coupon_name="PROMO", user_id="holder")

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
