"""The write paths of the product. The API, the admin and the commands all go through here."""

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from coupons.errors import (
    AlreadyClaimed,
    AmountBelowClaimed,
    CouponExists,
    CouponNotFound,
    OutOfStock,
)
from coupons.models import ONE_CLAIM_PER_USER, ClaimHistory, Coupon


def create_coupon(*, name: str, amount: int) -> Coupon:
    """Create a coupon with its whole stock available; raise CouponExists if the name is taken."""
    try:
        with transaction.atomic():
            return Coupon.objects.create(name=name, amount=amount, remaining_amount=amount)
    except IntegrityError:
        if Coupon.objects.filter(name=name).exists():
            raise CouponExists() from None
        raise


def _drop_oldest(entries: OrderedDict[str, Any]) -> None:
    """Drop the oldest entry of a bounded per-process memory.

    popitem() runs in C, so a worker's other threads (GUNICORN_THREADS) cannot change
    the dict halfway through it, as they could between iter() and pop().
    """
    with contextlib.suppress(KeyError):  # Another thread emptied it first.
        entries.popitem(last=False)


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
        self._coupons: OrderedDict[str, SoldOutCoupon] = OrderedDict()

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
            _drop_oldest(self._coupons)
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
    without the lock. The claim's transaction checks the name on the row it finds by id:
    a coupon deleted since, or an id given to another coupon after its sequence was reset,
    counts as gone, and the claim looks again.
    """

    max_coupons = 256

    def __init__(self) -> None:
        self._ids: OrderedDict[str, int] = OrderedDict()

    def get(self, coupon_name: str) -> int | None:
        return self._ids.get(coupon_name)

    def add(self, coupon_name: str, coupon_id: int) -> None:
        if coupon_name not in self._ids and len(self._ids) >= self.max_coupons:
            _drop_oldest(self._ids)
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
            locked, claim = _take_one_unit_in_one_statement(coupon_id, coupon_name, user_id)
        else:
            locked, claim = _take_one_unit(coupon_id, coupon_name, user_id)
    except IntegrityError as error:
        # Caught outside the transaction, which is already rolled back: a claim by this user
        # committed after the statement's snapshot (its other request, which held the lock
        # while this one waited), and the unique (coupon, user_id) index refused this one.
        # The user held the coupon then; that stays the answer should the claim be revoked
        # before this request is answered.
        if _refused_as_a_repeat(error) or (
            ClaimHistory.objects.filter(coupon_id=coupon_id, user_id=user_id).exists()
        ):
            raise AlreadyClaimed() from None
        raise
    if claim is not None:
        return claim
    if locked is None:
        on_sale_memory.discard(coupon_name)
        if remembered:
            # Deleted since this process looked (and perhaps made again under its name).
            return claim_coupon(coupon_name=coupon_name, user_id=user_id)
        raise CouponNotFound()
    # The checks again, on the coupon as the claim's transaction left it.
    if locked.remaining_amount == 0:
        on_sale_memory.discard(coupon_name)
        sold_out_memory.remember(coupon_name, coupon_id, locked.version)
    # A user who holds the coupon hears that first, as the contract orders the checks.
    if locked.held:
        raise AlreadyClaimed()
    raise OutOfStock()


def _refused_as_a_repeat(error: IntegrityError) -> bool:
    """Whether the database named the unique (coupon, user_id) constraint as what refused a
    write. PostgreSQL names it; SQLite names none, and a holder is looked for instead."""
    diagnostic = getattr(error.__cause__, "diag", None)
    return getattr(diagnostic, "constraint_name", None) == ONE_CLAIM_PER_USER


class LockedCoupon(NamedTuple):
    """A coupon as a claim found it: the answer's facts when no unit was taken."""

    remaining_amount: int
    version: object  # updated_at, as SoldOutMemory compares it
    held: bool  # by the claiming user


def _take_one_unit_in_one_statement(
    coupon_id: int, coupon_name: str, user_id: str
) -> tuple[LockedCoupon | None, ClaimHistory | None]:
    """A claim's transaction on PostgreSQL: one statement, one round trip.

    Django keeps the connection in autocommit between requests, so the statement of
    take_one_unit() is a transaction of its own: its UPDATE takes the coupon's row lock,
    checks the stock (again, on the row as committed, if it had to wait), inserts the claim
    and commits, and the lock is released at that commit. Nothing else is sent, so no
    worker has to be woken and get a CPU back while the row is locked. Inside a
    transaction that durable=True lets through (a test case's, or one opened by switching
    autocommit off) it runs in a savepoint, and the transaction's end is left to its owner;
    inside a caller's atomic block it is refused, as a claim commits before it is answered.

    When the statement took nothing, what it read of the coupon comes from its snapshot,
    taken before any wait for the lock: a claim that committed meanwhile (the same user's
    other request, say) is not in it. So unless the user was already seen holding the
    coupon, the coupon is read again, as it stands now: the contract answers a holder with
    already_claimed before out_of_stock. That read costs a round trip only for claims
    refused here, which are few: the sold-out memory answers the rest. Should it find stock
    again (an operator raised the amount or revoked a claim in between), the claim is made
    once more.
    """
    take = Coupon.objects.take_one_unit(coupon_id, coupon_name, user_id)
    in_autocommit = connection.get_autocommit()  # Connects first, if need be.
    for attempt in range(2):
        try:
            with (
                contextlib.nullcontext() if in_autocommit else transaction.atomic(durable=True),
                connection.cursor() as cursor,
            ):
                cursor.execute(*take)
                row = cursor.fetchone()
        except DatabaseError:
            # A connection lost mid-claim (the database restarted, the backend was killed)
            # is dropped now, so that the next query reconnects instead of failing until
            # the request ends. Not inside a caller's transaction: a fresh connection would
            # quietly commit what the caller writes next.
            if in_autocommit and connection.connection and connection.connection.closed:
                connection.close()
            raise
        if row is None:
            return None, None
        remaining_amount, version, held, claim_id, claimed_at = row
        if claim_id is not None:
            claim = ClaimHistory(
                id=claim_id, coupon_id=coupon_id, user_id=user_id, claimed_at=claimed_at
            )
            return LockedCoupon(remaining_amount, version, held), claim
        if held:
            return LockedCoupon(remaining_amount, version, held), None
        now = Coupon.objects.claim_outlook(coupon_name, user_id)
        if now is None or now[0] != coupon_id:
            return None, None  # Deleted meanwhile.
        _, remaining_amount, version, held = now
        if held or remaining_amount == 0 or attempt:
            break
    return LockedCoupon(remaining_amount, version, held), None


def _take_one_unit(
    coupon_id: int, coupon_name: str, user_id: str
) -> tuple[LockedCoupon | None, ClaimHistory | None]:
    """A claim's transaction step by step, on SQLite.

    SQLite's statements cost no network round trip, and its IMMEDIATE transactions take
    the database's write lock as they begin (settings.py), so what they read is current.
    """
    with transaction.atomic(durable=True):
        with connection.cursor() as cursor:
            cursor.execute(*Coupon.objects.claim_lock(coupon_id))
            row = cursor.fetchone()
        if row is None or row[2] != coupon_name:
            return None, None
        held = ClaimHistory.objects.filter(coupon_id=coupon_id, user_id=user_id).exists()
        locked = LockedCoupon(remaining_amount=row[0], version=row[1], held=held)
        if held or locked.remaining_amount == 0:
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
