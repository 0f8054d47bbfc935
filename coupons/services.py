"""The write paths of the product. The API, the admin and the commands all go through here."""

import time
from dataclasses import dataclass

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from coupons.errors import (
    AlreadyClaimed,
    AmountBelowClaimed,
    CouponExists,
    CouponNotFound,
    OutOfStock,
)
from coupons.models import ClaimHistory, Coupon


def create_coupon(*, name: str, amount: int) -> Coupon:
    """Create a coupon with its whole stock available; raise CouponExists if the name is taken."""
    try:
        with transaction.atomic():
            return Coupon.objects.create(name=name, amount=amount, remaining_amount=amount)
    except IntegrityError:
        if Coupon.objects.filter(name=name).exists():
            raise CouponExists() from None
        raise


@dataclass(frozen=True)
class SoldOutCoupon:
    """A sold-out coupon as this process last saw it, with everyone who holds it."""

    coupon_id: int
    version: object
    claimants: frozenset[str]
    seen_at: float


class SoldOutMemory:
    """Answers claims on sold-out coupons from process memory, without the database.

    Most requests of a flash sale arrive after the stock is gone. A sold-out coupon stays
    sold out until an operator raises its amount or revokes a claim, and either change
    moves its `updated_at`; so an entry is trusted for `SOLD_OUT_MEMORY_SECONDS`, then
    checked against the row again (one indexed read) and reloaded only if it changed.
    Such an answer is at most that old; it never lets a claim through, so it cannot
    oversell or double dip. Changes made in this process forget the entry at once.
    """

    max_coupons = 256
    # Remembering the holders costs memory per claim: past this, ask the database.
    max_claimants = 100_000

    def __init__(self) -> None:
        self._coupons: dict[str, SoldOutCoupon] = {}

    def answer(self, coupon_name: str, user_id: str) -> None:
        """Raise AlreadyClaimed or OutOfStock if the coupon is known to be sold out."""
        entry = self._coupons.get(coupon_name)
        if entry and time.monotonic() - entry.seen_at < settings.SOLD_OUT_MEMORY_SECONDS:
            raise AlreadyClaimed() if user_id in entry.claimants else OutOfStock()

    def remember(self, coupon_name: str, coupon_id: int, version: object) -> None:
        """Note that the coupon was seen sold out at this version (its `updated_at`)."""
        if settings.SOLD_OUT_MEMORY_SECONDS <= 0:
            return
        entry = self._coupons.get(coupon_name)
        if entry and (entry.coupon_id, entry.version) == (coupon_id, version):
            claimants = entry.claimants  # Unchanged since it was loaded.
        else:
            holders = ClaimHistory.objects.filter(coupon_id=coupon_id).values_list("user_id")
            if holders[self.max_claimants : self.max_claimants + 1].exists():
                return
            claimants = frozenset(user_id for (user_id,) in holders)
        if coupon_name not in self._coupons and len(self._coupons) >= self.max_coupons:
            # Drop the oldest entry; pop() tolerates another thread dropping it first.
            self._coupons.pop(next(iter(self._coupons), ""), None)
        self._coupons[coupon_name] = SoldOutCoupon(coupon_id, version, claimants, time.monotonic())

    def forget(self, coupon_id: int) -> None:
        """Drop what is known of a coupon whose stock or claims this process changed."""
        for name, entry in list(self._coupons.items()):
            if entry.coupon_id == coupon_id:
                self._coupons.pop(name, None)

    def clear(self) -> None:
        self._coupons.clear()


sold_out_memory = SoldOutMemory()


class OnSaleMemory:
    """The ids of coupons this process last saw with stock left, by name; bounded.

    A claim on one of them skips the lock-free look and goes straight to the coupon's row
    lock, which makes every check again anyway: while a sale lasts nearly every claim gets
    that far, and the look cost each one more round trip and a search of the name's
    index. Only the route is taken from here, never an answer. A claim that finds the
    coupon sold out or gone drops its entry, so that refusals go back to being answered
    without the lock.
    """

    max_coupons = 256

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}

    def get(self, coupon_name: str) -> int | None:
        return self._ids.get(coupon_name)

    def add(self, coupon_name: str, coupon_id: int) -> None:
        if coupon_name not in self._ids and len(self._ids) >= self.max_coupons:
            self._ids.pop(next(iter(self._ids), ""), None)
        self._ids[coupon_name] = coupon_id

    def discard(self, coupon_name: str) -> None:
        self._ids.pop(coupon_name, None)

    def clear(self) -> None:
        self._ids.clear()


on_sale_memory = OnSaleMemory()


def claim_coupon(*, coupon_name: str, user_id: str) -> ClaimHistory:
    """Give one unit of a coupon to a user, or raise why not.

    The checks come in the contract's order: CouponNotFound, then AlreadyClaimed, then
    OutOfStock. Takes and releases the coupon row's lock; call it outside any transaction.
    """
    sold_out_memory.answer(coupon_name, user_id)

    coupon_id = on_sale_memory.get(coupon_name)
    remembered = coupon_id is not None
    if coupon_id is None:
        # Read without any lock first: "already claimed" and "sold out" seen in a committed
        # snapshot were true at that moment, so they are honest answers, and requests that
        # end here never queue for the lock.
        outlook = Coupon.objects.claim_outlook(coupon_name, user_id)
        if outlook is None:
            raise CouponNotFound()
        coupon_id, remaining_amount, version, already_claimed = outlook
        if remaining_amount == 0:
            sold_out_memory.remember(coupon_name, coupon_id, version)
        if already_claimed:
            raise AlreadyClaimed()
        if remaining_amount == 0:
            raise OutOfStock()
        on_sale_memory.add(coupon_name, coupon_id)

    try:
        if connection.vendor == "postgresql":
            locked, claim = _take_one_unit_in_one_flush(coupon_id, coupon_name, user_id)
        else:
            locked, claim = _take_one_unit(coupon_id, coupon_name, user_id)
    except IntegrityError:
        # Caught outside the atomic block, whose transaction is already rolled back. Only
        # a claim row written without the coupon's lock could get here: the unique
        # (coupon, user_id) index stood in for the check made under the lock.
        if ClaimHistory.objects.filter(coupon_id=coupon_id, user_id=user_id).exists():
            raise AlreadyClaimed() from None
        raise
    if claim is not None:
        return claim
    # The checks again, as they stood under the lock. A user who holds the coupon hears
    # that first, even once it is sold out, as the contract orders the checks.
    if locked is not None and locked[2]:
        raise AlreadyClaimed()
    on_sale_memory.discard(coupon_name)
    if locked is None:
        if remembered:
            # Deleted since this process looked, and perhaps made again under the name.
            return claim_coupon(coupon_name=coupon_name, user_id=user_id)
        raise CouponNotFound()
    # Neither a holder nor a claim: no stock was left.
    sold_out_memory.remember(coupon_name, coupon_id, version=locked[1])
    raise OutOfStock()


# What a claim's transaction read under the coupon's row lock: (remaining_amount,
# updated_at, held_by_user) of the coupon, or None if there is none.
LockedCoupon = tuple[int, object, bool] | None

# The rest of a claim's transaction on PostgreSQL, sent together with the lock statement,
# before its answer is known. It takes one unit only if stock is left and the user holds
# none, and then records the claim; it reads the coupon as it stood before, for the
# answer. Sent after the lock, it reads with a snapshot taken once the lock is held, so
# it sees every claim committed before. It is safe even without that lock: the UPDATE
# locks the row itself and checks the stock again if it had to wait, and the unique
# (coupon, user_id) index refuses a second claim that its check could not see. The
# claim's id and time are taken under the lock, so ids follow commit order and
# claimed_by only ever grows at its end. Parameters: coupon id, name, user id (3 times),
# coupon id, name.
_TAKE_ONE_UNIT = f"""
    WITH taken AS (
        UPDATE {Coupon._meta.db_table} c
        SET remaining_amount = c.remaining_amount - 1, updated_at = clock_timestamp()
        WHERE c.id = %s AND c.name = %s AND c.remaining_amount > 0 AND NOT EXISTS (
            SELECT 1 FROM {ClaimHistory._meta.db_table} h
            WHERE h.coupon_id = c.id AND h.user_id = %s
        )
        RETURNING c.id, c.updated_at
    ), claim AS (
        INSERT INTO {ClaimHistory._meta.db_table} (coupon_id, user_id, claimed_at)
        SELECT id, %s, updated_at FROM taken
        RETURNING id, claimed_at
    )
    SELECT c.remaining_amount, c.updated_at, EXISTS (
            SELECT 1 FROM {ClaimHistory._meta.db_table} h
            WHERE h.coupon_id = c.id AND h.user_id = %s
        ),
        (SELECT id FROM claim), (SELECT claimed_at FROM claim)
    FROM {Coupon._meta.db_table} c WHERE c.id = %s AND c.name = %s
"""


def _take_one_unit_in_one_flush(
    coupon_id: int, coupon_name: str, user_id: str
) -> tuple[LockedCoupon, ClaimHistory | None]:
    """A claim's transaction on PostgreSQL: the lock, _TAKE_ONE_UNIT and COMMIT in one flush.

    In psycopg's pipeline mode, once BEGIN has gone ahead on its own, the three leave
    together and their answers are read after the COMMIT: no worker has to get a CPU
    back while the row lock is held, so the lock lasts only as long as PostgreSQL takes
    to run them (docs/performance.md). It is still Django's atomic block around a
    select_for_update() statement; an error in any statement rolls the transaction back
    whole and is raised as usual.
    """
    connection.ensure_connection()
    with connection.cursor() as lock, connection.cursor() as take:
        with connection.connection.pipeline(), transaction.atomic():
            lock.execute(*Coupon.objects.claim_lock(coupon_id, coupon_name, user_id))
            take.execute(
                _TAKE_ONE_UNIT,
                [coupon_id, coupon_name, user_id, user_id, user_id, coupon_id, coupon_name],
            )
        row = take.fetchone()
    if row is None:
        return None, None
    remaining_amount, version, held, claim_id, claimed_at = row
    locked = (remaining_amount, version, held)
    if claim_id is None:
        return locked, None
    return locked, ClaimHistory(
        id=claim_id, coupon_id=coupon_id, user_id=user_id, claimed_at=claimed_at
    )


def _take_one_unit(
    coupon_id: int, coupon_name: str, user_id: str
) -> tuple[LockedCoupon, ClaimHistory | None]:
    """A claim's transaction step by step, on databases without pipelining (SQLite).

    SQLite's statements cost no network round trip, and its IMMEDIATE transactions take
    the database's write lock as they begin (settings.py).
    """
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute(*Coupon.objects.claim_lock(coupon_id, coupon_name, user_id))
            row = cursor.fetchone()
        if row is None:
            return None, None
        locked = (row[0], row[1], bool(row[2]))
        remaining_amount, _, held = locked
        if held or remaining_amount == 0:
            return locked, None
        claim = ClaimHistory.objects.create(coupon_id=coupon_id, user_id=user_id)
        Coupon.objects.filter(pk=coupon_id).update(
            remaining_amount=F("remaining_amount") - 1, updated_at=claim.claimed_at
        )
    return locked, claim


def change_coupon_amount(*, coupon_id: int, amount: int) -> Coupon:
    """Set a coupon's total stock, keeping the claims made; it cannot go below them."""
    with transaction.atomic():
        coupon = Coupon.objects.select_for_update(no_key=True).get(pk=coupon_id)
        claimed_count = coupon.claimed_count
        if amount < claimed_count:
            raise AmountBelowClaimed(
                f"The amount cannot be lower than the {claimed_count} claims already made."
            )
        coupon.amount = amount
        coupon.remaining_amount = amount - claimed_count
        coupon.save(update_fields=["amount", "remaining_amount", "updated_at"])
    sold_out_memory.forget(coupon_id)
    return coupon


def revoke_claim(*, claim_id: int) -> bool:
    """Take a claim back and return its unit to the stock; False if it was already gone."""
    coupon_id = ClaimHistory.objects.filter(pk=claim_id).values_list("coupon_id", flat=True).first()
    if coupon_id is None:
        return False
    with transaction.atomic():
        # The same lock as a claim, taken first, so the counter and the ledger move together.
        list(Coupon.objects.select_for_update(no_key=True).filter(pk=coupon_id).values_list("pk"))
        deleted, _ = ClaimHistory.objects.filter(pk=claim_id).delete()
        if deleted:
            Coupon.objects.filter(pk=coupon_id).update(
                remaining_amount=F("remaining_amount") + 1, updated_at=timezone.now()
            )
    sold_out_memory.forget(coupon_id)
    return bool(deleted)
