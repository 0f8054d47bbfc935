"""A claim's write in one statement on PostgreSQL: the one hand-written write of the service.

Inside the claim's transaction, under the lock of the row that holds the unit (the
coupon's, or one of its stock shards), the ORM writes a claim in two statements: the
claim's INSERT and the stock's UPDATE. Every shopper of the coupon (or of the shard) waits
on that lock, so each round trip inside it, and the worker's CPU to build each statement,
is paid by the whole queue. One statement does both writes here, with a data-modifying
WITH: a round trip and two ORM statement builds less while the lock is held.

Measured in pairs on 2026-12-04 (`make bench-compare REV=9a4868d`, the ORM's two
statements; 2 cores shared with PostgreSQL and wrk): B2 1.22 × the winning claims per
second (1.12–1.25 in four pairs) at 0.82 × the machine's CPU per claim, B1's p99 0.82 ×.
docs/performance.md, "The claim's write", has the figures.

SQLite has no data-modifying WITH, and its statements cost no round trip: there the ORM
writes. The checks that decide whether a unit may be taken stay in Python, in
services.claim_coupon; this only writes.
"""

import datetime
from typing import TYPE_CHECKING, Any

from django.db import connections, models, router
from django.db.models import F

if TYPE_CHECKING:
    from coupons.models import ClaimHistory, Coupon, StockShard


class OneStatementClaimWrite(models.QuerySet["ClaimHistory"]):
    """ClaimHistory's queryset gets take_unit() from here (models.ClaimQuerySet)."""

    def take_unit(
        self,
        *,
        coupon: "Coupon",
        user_id: str,
        claimed_at: datetime.datetime,
        idempotency_key: str | None = None,
        shard: "StockShard | None" = None,
    ) -> "tuple[ClaimHistory, datetime.datetime | None]":
        """Record the user's claim, made at claimed_at, and take its unit from the stock:
        the coupon's row, or the shard given.

        Call it inside the claim's transaction, holding the lock on the row that holds the
        unit (the coupon's, or the shard's), once the checks have passed. Return the claim
        and, for a shard's unit, the coupon's `updated_at` as this statement saw it: the
        coupon's row, which the claim did not lock, may have been changed by an operator
        since the lock's statement read it (None for a unit of the coupon's row).
        """
        using = router.db_for_write(self.model)
        connection = connections[using]
        stock: Any = shard if shard is not None else coupon
        if connection.vendor != "postgresql":
            claim = self.using(using).create(
                coupon=coupon,
                user_id=user_id,
                claimed_at=claimed_at,
                idempotency_key=idempotency_key,
            )
            taken = {"remaining_amount": F("remaining_amount") - 1}
            if shard is None:
                its_row = type(coupon).objects.using(using).filter(pk=coupon.pk)
                its_row.update(**taken, updated_at=claimed_at)
                return claim, None
            type(shard).objects.using(using).filter(pk=shard.pk).update(**taken)
            versions = type(coupon).objects.using(using).values_list("updated_at", flat=True)
            return claim, versions.get(pk=coupon.pk)
        quote = connection.ops.quote_name
        coupons = quote(coupon._meta.db_table)
        # A claim moves the coupon's updated_at only where it takes the unit from the
        # coupon's row: a shard's claim leaves that row, which every shard shares, alone,
        # and reads it in this statement, which began once the shard was locked.
        if shard is None:
            moved, seen = ", updated_at = %(claimed_at)s", "NULL"
        else:
            moved, seen = "", f"(SELECT updated_at FROM {coupons} WHERE id = %(coupon)s)"
        sql = f"""
            WITH unit AS (
                UPDATE {quote(stock._meta.db_table)}
                SET remaining_amount = remaining_amount - 1{moved}
                WHERE id = %(stock)s
                RETURNING id
            )
            INSERT INTO {quote(self.model._meta.db_table)}
                (coupon_id, user_id, idempotency_key, claimed_at)
            SELECT %(coupon)s, %(user_id)s, %(key)s, %(claimed_at)s FROM unit
            RETURNING id, {seen}
        """
        parameters = {
            "stock": stock.pk,
            "coupon": coupon.pk,
            "user_id": user_id,
            "key": idempotency_key,
            "claimed_at": claimed_at,
        }
        with connection.cursor() as cursor:
            cursor.execute(sql, parameters)
            row: Any = cursor.fetchone()
        claim_id, version = row
        claim = self.model(
            id=claim_id,
            coupon=coupon,
            user_id=user_id,
            idempotency_key=idempotency_key,
            claimed_at=claimed_at,
        )
        claim._state.adding, claim._state.db = False, using  # As if read from the database.
        return claim, version
