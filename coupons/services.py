"""The write paths of the product. The API, the admin and the commands all go through here."""

import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from coupons.errors import AlreadyClaimed, CouponExists, CouponNotFound, OutOfStock
from coupons.models import ONE_CLAIM_PER_USER, ClaimHistory, Coupon


def create_coupon(*, name: str, amount: int) -> Coupon:
    """Create a coupon with its whole stock available; raise CouponExists if the name is taken."""
    try:
        with transaction.atomic():
            coupon = Coupon.objects.create(name=name, amount=amount, remaining_amount=amount)
            # A coupon of this name deleted earlier may still be remembered sold out.
            transaction.on_commit(lambda: forget_coupon(name))
    except IntegrityError:
        if Coupon.objects.filter(name=name).exists():
            raise CouponExists() from None
        raise
    return coupon


def delete_coupon(*, coupon_id: int) -> None:
    """Delete a coupon and its claims."""
    with transaction.atomic():
        name = Coupon.objects.filter(pk=coupon_id).values_list("name", flat=True).first()
        Coupon.objects.filter(pk=coupon_id).delete()
        if name is not None:
            transaction.on_commit(lambda: forget_coupon(name))


def forget_coupon(name: str) -> None:
    """Drop what this process remembers of the coupon of this name (sold out, on sale)."""
    sold_out_memory.forget(name)
    on_sale_memory.discard(name)


def claim_coupon(*, coupon_name: str, user_id: str) -> ClaimHistory:
    """Give one unit of a coupon to a user, or raise why not.

    The checks come in the contract's order: CouponNotFound, then AlreadyClaimed, then
    OutOfStock. Takes and releases the coupon row's lock; call it outside any transaction
    (durable=True refuses a caller's atomic block, but cannot see a transaction opened by
    switching autocommit off: there the claim commits with its caller).
    """
    sold_out_memory.answer(coupon_name, user_id)
    remembered_id = on_sale_memory.get(coupon_name)
    coupon_id = remembered_id or _look_before_queueing(coupon_name, user_id)

    try:
        with transaction.atomic(durable=True):
            # The row lock serialises every claim, revocation and change of stock on this
            # coupon, so the counter read here stays true until the commit. The claims
            # queue on it, one at a time: keep this block to its few round trips.
            coupon = (
                Coupon.objects.select_for_update(no_key=True).with_holder(user_id).get(pk=coupon_id)
            )
            if coupon.name != coupon_name:
                raise Coupon.DoesNotExist  # The id was given to another coupon since.
            if coupon.is_sold_out and not coupon.held:
                # Had this statement waited for the lock, its EXISTS still saw the claims
                # as they were before the wait: look again, for the contract's order.
                coupon.held = coupon.claims.filter(user_id=user_id).exists()
            if coupon.held:
                raise AlreadyClaimed()
            if coupon.is_sold_out:
                raise OutOfStock()
            claim = ClaimHistory.objects.take_unit(coupon=coupon, user_id=user_id)
    except Coupon.DoesNotExist:
        # Deleted since this process looked it up, and perhaps made anew under its name.
        on_sale_memory.discard(coupon_name)
        if remembered_id is None:
            raise CouponNotFound() from None
        return claim_coupon(coupon_name=coupon_name, user_id=user_id)
    except OutOfStock:
        # Raised only on what the lock read: `coupon` is that row, as it stands.
        on_sale_memory.discard(coupon_name)
        sold_out_memory.remember(coupon_name, coupon.pk, coupon.updated_at)
        raise
    except IntegrityError as error:
        # A claim by this user committed after the lock statement's snapshot (the user's
        # other request, which held the lock while this one waited), and the unique
        # (coupon, user_id) index refused this one; the transaction is rolled back.
        if _refused_as_a_repeat(error):
            raise AlreadyClaimed() from None
        raise
    return claim


def _look_before_queueing(coupon_name: str, user_id: str) -> int:
    """Return the id of the coupon to claim, or raise the refusal it already warrants.

    Read without any lock: "already claimed" and "sold out" seen in a committed snapshot
    were true at that moment, so they are honest answers, and the requests that end here
    never queue for the lock.
    """
    coupon = Coupon.objects.with_holder(user_id).filter(name=coupon_name).first()
    if coupon is None:
        raise CouponNotFound()
    if coupon.is_sold_out:
        sold_out_memory.remember(coupon_name, coupon.pk, coupon.updated_at)
    if coupon.held:
        raise AlreadyClaimed()
    if coupon.is_sold_out:
        raise OutOfStock()
    on_sale_memory.add(coupon_name, coupon.pk)
    return coupon.pk


def _refused_as_a_repeat(error: IntegrityError) -> bool:
    """Whether the unique (coupon, user_id) constraint refused a claim, as PostgreSQL names it.

    The name stays the answer should the claim that held the coupon be revoked before this
    request is answered. (On SQLite no repeat gets this far: its write lock, taken as the
    claim's transaction begins, shows the lock statement every committed claim.)
    """
    diagnostic = getattr(error.__cause__, "diag", None)
    return getattr(diagnostic, "constraint_name", None) == ONE_CLAIM_PER_USER


def change_coupon_amount(*, coupon_id: int, amount: int) -> Coupon:
    """Set a coupon's total stock, keeping the claims made; it cannot go below them.

    Inside a caller's transaction (the admin's), the coupon's lock lasts until that ends.
    """
    with transaction.atomic():
        coupon = Coupon.objects.select_for_update(no_key=True).get(pk=coupon_id)
        coupon.check_new_amount(amount)
        coupon.remaining_amount = amount - coupon.claimed_count
        coupon.amount = amount
        coupon.save(update_fields=["amount", "remaining_amount", "updated_at"])
        transaction.on_commit(lambda: forget_coupon(coupon.name))
    return coupon


def revoke_claim(*, claim_id: int) -> bool:
    """Take a claim back and return its unit to the stock; False if it was already gone.

    Inside a caller's transaction (the admin's), the coupon's lock lasts until that ends.
    """
    coupon_id = ClaimHistory.objects.filter(pk=claim_id).values_list("coupon_id", flat=True).first()
    if coupon_id is None:
        return False
    with transaction.atomic():
        # The same lock as a claim, taken first, so the counter and the ledger move together.
        name = (
            Coupon.objects.select_for_update(no_key=True)
            .filter(pk=coupon_id)
            .values_list("name", flat=True)
            .get()
        )
        deleted, _ = ClaimHistory.objects.filter(pk=claim_id).delete()
        if deleted:
            Coupon.objects.filter(pk=coupon_id).update(
                remaining_amount=F("remaining_amount") + 1, updated_at=timezone.now()
            )
            transaction.on_commit(lambda: forget_coupon(name))
    return bool(deleted)


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
    oversell or double dip. Changes made in this process (more stock, a revoked claim, the
    coupon deleted or made again) forget the entry as they commit.
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

    def forget(self, coupon_name: str) -> None:
        """Drop what is known of a coupon whose stock or claims this process changed."""
        self._coupons.pop(coupon_name, None)

    def clear(self) -> None:
        self._coupons.clear()


sold_out_memory = SoldOutMemory()


class OnSaleMemory:
    """The ids of coupons this process last saw with stock left, by name; bounded.

    A claim on one of them skips the lock-free look and goes straight to the coupon's row
    lock, whose statement reads everything the checks need anyway: while a sale lasts
    nearly every claim gets that far, and the look would cost each one more round trip.
    Only the route is taken from here, never an answer. The claim checks the name on the
    row it locks by id, so a coupon deleted since (or an id given to another coupon after
    its sequence was reset) counts as gone, and the claim looks again.
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
