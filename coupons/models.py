"""Coupons with a limited stock, and the ledger of who claimed them."""

import functools
from typing import Any

from django.db import connections, models
from django.db.models import F, Q

# The locking statement of a claim, per database alias; see CouponQuerySet.claim_lock().
_lock_statements: dict[str, str] = {}


@functools.cache
def _naming_tables(sql: str) -> str:
    """Fill in the {coupon} and {claim} table names of a hand-written statement.

    Cached: the claim's statements are filled in once per process, not on every claim.
    """
    return sql.format(coupon=Coupon._meta.db_table, claim=ClaimHistory._meta.db_table)


class CouponQuerySet(models.QuerySet["Coupon"]):
    def _one_row(self, sql: str, params: list[Any]) -> tuple[Any, ...] | None:
        """Run one SQL statement; return its first row."""
        with connections[self.db].cursor() as cursor:
            cursor.execute(sql, params)
            row: tuple[Any, ...] | None = cursor.fetchone()
        return row

    def claim_outlook(self, name: str, user_id: str) -> tuple[int, int, object, bool] | None:
        """Return (id, remaining_amount, version, held_by_user) of a coupon, or None.

        The lock-free first look of every claim, in one indexed statement. Written in SQL
        because the ORM spends longer building this query than the database takes to
        answer it. `version` is `updated_at` as stored, only ever compared for equality.
        """
        row = self._one_row(
            _naming_tables(
                """
                SELECT c.id, c.remaining_amount, c.updated_at, EXISTS(
                    SELECT 1 FROM {claim} h WHERE h.coupon_id = c.id AND h.user_id = %s
                )
                FROM {coupon} c WHERE c.name = %s
                """
            ),
            [user_id, name],
        )
        return (row[0], row[1], row[2], bool(row[3])) if row else None

    def claim_lock(self, coupon_id: int) -> tuple[str, list[Any]]:
        """Return the statement, and its parameters, that lock a coupon's row for a claim.

        It reads (remaining_amount, updated_at, name) of the coupon, if there is one, and holds
        the row's lock until the transaction ends; call it inside the claim's transaction
        (Django compiles a locking statement only there). Used where a claim's checks run one
        by one (SQLite, services._take_one_unit); on PostgreSQL the UPDATE of take_one_unit()
        takes the lock itself. NO KEY: the row's key is not changed, so foreign-key checks
        need not wait. It is the statement `select_for_update(no_key=True)` builds, built once
        per process rather than for every claim: building it took four times the CPU of
        running it (168 against 40 µs).
        """
        statement = _lock_statements.get(self.db)
        if statement is None:
            locking = self.select_for_update(no_key=True).filter(pk=0)
            statement, params = (
                locking.values_list("remaining_amount", "updated_at", "name")
                .query.get_compiler(using=self.db)
                .as_sql()
            )
            assert params == (0,), "the coupon id must be the statement's only parameter"
            _lock_statements[self.db] = statement
        return statement, [coupon_id]

    def take_one_unit(self, coupon_id: int, name: str, user_id: str) -> tuple[str, list[Any]]:
        """Return the statement, and its parameters, that takes one unit for a claim.

        PostgreSQL only; a claim's whole transaction (services.py). It takes a unit only if
        stock is left and the user holds none, records the claim, and reads
        (remaining_amount, updated_at, held_by_user, claim id, claimed_at) of the coupon as
        its snapshot saw it, for the answer; no row if there is no coupon with this id and
        name. The UPDATE takes the coupon's row lock; if it had to wait, it checks the stock
        again on the row as committed, and a claim by the same user committed meanwhile,
        which its snapshot cannot see, meets the unique (coupon, user_id) index, which fails
        the statement and rolls the unit back. The claim's id and time are taken under the
        lock, so ids follow commit order and claimed_by only ever grows at its end. The
        coupon is found by id, its name compared in a form no index serves (IS NOT DISTINCT
        FROM): searching the name's index under a sale's updates doubled PostgreSQL's CPU
        per claim (docs/performance.md).
        """
        sql = """
            WITH taken AS (
                UPDATE {coupon} c
                SET remaining_amount = c.remaining_amount - 1, updated_at = clock_timestamp()
                WHERE c.id = %s AND c.name IS NOT DISTINCT FROM %s
                    AND c.remaining_amount > 0 AND NOT EXISTS (
                    SELECT 1 FROM {claim} h WHERE h.coupon_id = c.id AND h.user_id = %s
                )
                RETURNING c.id, c.updated_at
            ), claim AS (
                INSERT INTO {claim} (coupon_id, user_id, claimed_at)
                SELECT id, %s, updated_at FROM taken
                RETURNING id, claimed_at
            )
            SELECT c.remaining_amount, c.updated_at, EXISTS (
                    SELECT 1 FROM {claim} h WHERE h.coupon_id = c.id AND h.user_id = %s
                ),
                (SELECT id FROM claim), (SELECT claimed_at FROM claim)
            FROM {coupon} c WHERE c.id = %s AND c.name IS NOT DISTINCT FROM %s
        """
        params = [coupon_id, name, user_id, user_id, user_id, coupon_id, name]
        return _naming_tables(sql), params

    def details_json(self, name: str) -> str | None:
        """Return the public details of one coupon as a JSON document, or None.

        The database renders the whole document in one statement, so the counter and
        the list of claimants come from one snapshot even while claims commit, and a
        coupon with 100,000 claims costs no Python object per claim. "h.id > 0", true of
        every claim, is what lets it read the claims through claim_coupon_order_idx.

        The list is aggregated from a subquery ordered by claim id, not with ORDER BY
        inside the aggregate: PostgreSQL 15 sorts an aggregate's input again even when it
        arrives in order, which took a third of the time of reading 100,000 claims
        (docs/performance.md). PostgreSQL's documentation gives this form for ordered
        aggregates; it holds as long as the query around the subquery does nothing but
        aggregate (no join that could reorder the rows). A test checks it on 5,000 claims
        stored out of claim order.
        """
        if connections[self.db].vendor == "postgresql":
            sql = """
                SELECT json_build_object(
                    'name', c.name,
                    'amount', c.amount,
                    'remaining_amount', c.remaining_amount,
                    'claimed_by', COALESCE(
                        (SELECT json_agg(s.user_id) FROM (
                            SELECT h.user_id FROM {claim} h
                            WHERE h.coupon_id = c.id AND h.id > 0 ORDER BY h.id
                        ) s),
                        '[]'::json
                    )
                )::text
                FROM {coupon} c WHERE c.name = %s
            """
        else:
            # SQLite before 3.44 has no ORDER BY inside an aggregate; it aggregates an
            # ordered subquery in that order.
            sql = """
                SELECT json_object(
                    'name', c.name,
                    'amount', c.amount,
                    'remaining_amount', c.remaining_amount,
                    'claimed_by', (
                        SELECT json_group_array(user_id) FROM (
                            SELECT h.user_id FROM {claim} h
                            WHERE h.coupon_id = c.id AND h.id > 0 ORDER BY h.id
                        )
                    )
                )
                FROM {coupon} c WHERE c.name = %s
            """
        row = self._one_row(_naming_tables(sql), [name])
        return row[0] if row else None


class Coupon(models.Model):
    """A coupon with a fixed total stock; `remaining_amount` is the stock left to claim."""

    name = models.CharField(max_length=255, unique=True)
    amount = models.PositiveIntegerField(help_text="Total stock.")
    # A stored counter, decremented in the claim's transaction: a claim costs the same
    # whether 5 or 500,000 claims were made before it.
    remaining_amount = models.PositiveIntegerField(help_text="Stock left to claim.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CouponQuerySet.as_manager()

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gte=1) & Q(amount__lte=2_147_483_647),
                name="coupon_amount_in_range",
            ),
            models.CheckConstraint(
                condition=Q(remaining_amount__gte=0) & Q(remaining_amount__lte=F("amount")),
                name="coupon_remaining_within_amount",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def claimed_count(self) -> int:
        # Exact because every claim and revocation moves the counter in the same transaction.
        return self.amount - self.remaining_amount

    @property
    def is_sold_out(self) -> bool:
        return self.remaining_amount == 0


# The unique (coupon, user_id) constraint's name, as the database reports a violation of it.
ONE_CLAIM_PER_USER = "claim_one_per_user"


class ClaimHistory(models.Model):
    """One successful claim: a user holds one unit of a coupon."""

    coupon = models.ForeignKey(
        Coupon,
        on_delete=models.CASCADE,
        related_name="claims",
        # The unique (coupon, user_id) index starts with coupon_id and serves the join.
        db_index=False,
    )
    user_id = models.CharField(max_length=255)
    claimed_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name = "claim"
        verbose_name_plural = "claims"
        constraints = [
            # Backs the one-claim-per-user rule even if application code were wrong.
            models.UniqueConstraint(fields=["coupon", "user_id"], name=ONE_CLAIM_PER_USER),
        ]
        indexes = [
            # The claimed_by listing, in claim order. Partial on "id > 0", which every row
            # meets, so that only a query stating it can use the index (details_json does).
            # Otherwise PostgreSQL, without statistics on a young claims table, plans the
            # holder check (coupon_id = … AND user_id = …) on this index rather than the
            # unique one, and then reads every claim of the coupon on every claim: a
            # prepared statement keeps that plan for the connection's life (B2 fell from
            # 1,200 to 400 claims/s as claims piled up; docs/performance.md).
            models.Index(
                fields=["coupon", "id"], condition=Q(id__gt=0), name="claim_coupon_order_idx"
            ),
        ]
        # No index on user_id alone: the admin's search by user is a substring match,
        # which no B-tree serves, and every claim would pay for it under the row lock.

    def __str__(self) -> str:
        return f"{self.user_id} → {self.coupon}"
