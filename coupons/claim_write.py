"""A claim's write in one statement on PostgreSQL: the one hand-written write of the service.

Inside the claim's transaction, under the coupon's row lock, the ORM writes a claim in two
statements: the claim's INSERT and the stock's UPDATE. Every shopper of the coupon waits
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
    from coupons.models import ClaimHistory, Coupon


class OneStatementClaimWrite(models.QuerySet["ClaimHistory"]):
    """ClaimHistory's queryset gets take_unit() from here (models.ClaimQuerySet)."""

    def take_unit(
        self,
        *,
        coupon: "Coupon",
        user_id: str,
        claimed_at: datetime.datetime,
        idempotency_key: str | None = None,
    ) -> "ClaimHistory":
        """Record the user's claim, made at claimed_at, and take its unit from the stock.

        Call it inside the claim's transaction, holding the coupon's row lock, once the
        checks have passed: claim ids then follow commit order.
        """
        using = router.db_for_write(self.model)
        connection = connections[using]
        if connection.vendor != "postgresql":
            claim = self.using(using).create(
                coupon=coupon,
                user_id=user_id,
                claimed_at=claimed_at,
                idempotency_key=idempotency_key,
            )
            type(coupon).objects.using(using).filter(pk=coupon.pk).update(
                remaining_amount=F("remaining_amount") - 1, updated_at=claim.claimed_at
            )
            return claim
        quote = connection.ops.quote_name
        sql = f"""
            WITH unit AS (
                UPDATE {quote(coupon._meta.db_table)}
                SET remaining_amount = remaining_amount - 1, updated_at = %s
                WHERE id = %s
                RETURNING id
            )
            INSERT INTO {quote(self.model._meta.db_table)}
                (coupon_id, user_id, idempotency_key, claimed_at)
            SELECT id, %s, %s, %s FROM unit
            RETURNING id
        """
        with connection.cursor() as cursor:
            cursor.execute(sql, [claimed_at, coupon.pk, user_id, idempotency_key, claimed_at])
            row: Any = cursor.fetchone()
        (claim_id,) = row
        claim = self.model(
            id=claim_id,
            coupon=coupon,
            user_id=user_id,
            idempotency_key=idempotency_key,
            claimed_at=claimed_at,
        )
        claim._state.adding, claim._state.db = False, using  # As if read from the database.
        return claim
