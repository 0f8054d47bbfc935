"""The write paths of the product. The API, the admin and the commands all go through here."""

import contextlib
import datetime
import functools
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from coupons.errors import (
    AlreadyClaimed,
    CouponError,
    CouponExists,
    CouponNotFound,
    IdempotencyKeyReused,
    OutOfStock,
    SaleEnded,
    SaleNotStarted,
)
from coupons.models import (
    ONE_CLAIM_PER_IDEMPOTENCY_KEY,
    ONE_CLAIM_PER_USER,
    ClaimHistory,
    Coupon,
    check_sale_window,
)


def create_coupon(
    *,
    name: str,
    amount: int,
    starts_at: datetime.datetime | None = None,
    ends_at: datetime.datetime | None = None,
) -> Coupon:
    """Create a coupon with its whole stock available; raise CouponExists if the name is taken.

    Claims are taken from starts_at (at once if None) until ends_at (for ever if None).
    """
    try:
        with transaction.atomic():
            coupon = Coupon.objects.create(
                name=name,
                amount=amount,
                remaining_amount=amount,
                starts_at=starts_at,
                ends_at=ends_at,
            )
            # A coupon of this name deleted earlier may still be remembered sold out.
            transaction.on_commit(lambda: forget_coupon(name))
    except IntegrityError:
        if Coupon.objects.filter(name=name).exists():
            raise CouponExists() from None
        raise
    return coupon


def create_coupons(coupons: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[str]]:
    """Create many coupons at once, with bulk inserts; return the names created and those
    skipped because a coupon has them already.

    Takes the fields create_coupon takes. In a caller's transaction (seed_coupons opens one
    for all its batches), nothing is created unless everything is.
    """
    names = [coupon["name"] for coupon in coupons]
    with transaction.atomic():
        taken = set(Coupon.objects.filter(name__in=names).values_list("name", flat=True))
        new = [
            Coupon(**coupon, remaining_amount=coupon["amount"])
            for coupon in coupons
            if coupon["name"] not in taken
        ]
        Coupon.objects.bulk_create(new)
        created = [coupon.name for coupon in new]
        # Coupons of these names deleted earlier may still be remembered sold out.
        for name in created:
            transaction.on_commit(functools.partial(forget_coupon, name))
    return created, [name for name in names if name in taken]


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


def claim_coupon(
    *, coupon_name: str, user_id: str, idempotency_key: str | None = None
) -> ClaimHistory:
    """Give one unit of a coupon to a user, or raise why not.

    The checks come in the contract's order: CouponNotFound, then SaleNotStarted or
    SaleEnded, then AlreadyClaimed, then OutOfStock. The idempotency_key, if any, is
    recorded with the claim; the unique index on keys refuses a second claim with it
    (AlreadyClaimed), which claim_coupon_idempotently then answers.

    Takes and releases the coupon row's lock; call it outside any transaction
    (durable=True refuses a caller's atomic block, but cannot see a transaction opened by
    switching autocommit off: there the claim commits with its caller).
    """
    sold_out_memory.answer(coupon_name, user_id, timezone.now())
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
            now = timezone.now()  # The claim's instant: checked against the window, recorded.
            coupon.check_sale_window(now)
            if coupon.is_sold_out and not coupon.held:
                # Had this statement waited for the lock, its EXISTS still saw the claims
                # as they were before the wait: look again, for the contract's order.
                coupon.held = coupon.claims.filter(user_id=user_id).exists()
            if coupon.held:
                raise AlreadyClaimed()
            if coupon.is_sold_out:
                raise OutOfStock()
            claim = ClaimHistory.objects.take_unit(
                coupon=coupon, user_id=user_id, claimed_at=now, idempotency_key=idempotency_key
            )
    except Coupon.DoesNotExist:
        # Deleted since this process looked it up, and perhaps made anew under its name.
        on_sale_memory.discard(coupon_name)
        if remembered_id is None:
            raise CouponNotFound() from None
        return claim_coupon(
            coupon_name=coupon_name, user_id=user_id, idempotency_key=idempotency_key
        )
    except (SaleNotStarted, SaleEnded):
        # Raised only on what the lock read: `coupon` is that row, as it stands.
        on_sale_memory.discard(coupon_name)
        sold_out_memory.remember(coupon)
        raise
    except OutOfStock:
        # Raised only on what the lock read: `coupon` is that row, as it stands.
        on_sale_memory.discard(coupon_name)
        sold_out_memory.remember(coupon)
        raise
    except IntegrityError as error:
        # A claim by this user, or with this key, committed after the lock statement's
        # snapshot (another request, which held the lock while this one waited), and a
        # unique index refused this one; the transaction is rolled back.
        if _refused_as_a_repeat(error, coupon_id, user_id, idempotency_key):
            raise AlreadyClaimed() from None
        raise
    return claim


def claim_coupon_idempotently(
    *, coupon_name: str, user_id: str, idempotency_key: str | None
) -> ClaimHistory:
    """claim_coupon, safe to retry with the same idempotency_key.

    A claim already made with the key by this user on this coupon is answered again, its
    `replayed` set, without taking stock, whatever the coupon's stock or window now; the
    key used by another user or on another coupon raises IdempotencyKeyReused. The key is
    looked up before the claim and again after any refusal, so a retry racing its own first
    try gets that try's claim: no lookup is added inside the lock.
    """
    if idempotency_key is None:
        return claim_coupon(coupon_name=coupon_name, user_id=user_id)
    # A retry whose claim was made is answered at once, without queueing for the lock.
    earlier = _claim_made_with(idempotency_key, coupon_name, user_id)
    if earlier is not None:
        return earlier
    try:
        return claim_coupon(
            coupon_name=coupon_name, user_id=user_id, idempotency_key=idempotency_key
        )
    except CouponError:
        # Refused before the lock (from memory, or by the lock-free look), or by a unique
        # index, while this request's first try was committing its claim.
        earlier = _claim_made_with(idempotency_key, coupon_name, user_id)
        if earlier is not None:
            return earlier
        raise


def _look_before_queueing(coupon_name: str, user_id: str) -> int:
    """Return the id of the coupon to claim, or raise the refusal it already warrants.

    Read without any lock: the window, "already claimed" and "sold out" seen in a
    committed snapshot were true at that moment, so they are honest answers, and the
    requests that end here never queue for the lock.
    """
    coupon = Coupon.objects.with_holder(user_id).filter(name=coupon_name).first()
    if coupon is None:
        raise CouponNotFound()
    now = timezone.now()
    if not coupon.is_on_sale(now):
        sold_out_memory.remember(coupon)
    coupon.check_sale_window(now)
    if coupon.held:
        raise AlreadyClaimed()
    if coupon.is_sold_out:
        raise OutOfStock()
    on_sale_memory.add(coupon_name, coupon.pk)
    return coupon.pk


def _claim_made_with(idempotency_key: str, coupon_name: str, user_id: str) -> ClaimHistory | None:
    """The claim made with this key, to answer again, if this user made it on this coupon;
    None if no claim has the key. Raise IdempotencyKeyReused if another user or coupon has it."""
    claim = ClaimHistory.objects.select_related("coupon").filter(idempotency_key=idempotency_key)
    earlier = claim.first()
    if earlier is None:
        return None
    if (earlier.coupon.name, earlier.user_id) != (coupon_name, user_id):
        raise IdempotencyKeyReused()
    earlier.replayed = True
    return earlier


def _refused_as_a_repeat(
    error: IntegrityError, coupon_id: int, user_id: str, idempotency_key: str | None
) -> bool:
    """Whether a claim's unique constraint refused the write: one claim per user and
    coupon, one claim per idempotency key.

    PostgreSQL names the constraint, which stays the answer should the claim that held the
    coupon or the key be revoked before this request is answered. SQLite names none: the
    claim the constraint protects is looked for instead. (There, its write lock shows every
    committed claim to the lock's read, so only a key already used by another user or on
    another coupon gets this far.)
    """
    diagnostic = getattr(error.__cause__, "diag", None)
    if getattr(diagnostic, "constraint_name", None) in {
        ONE_CLAIM_PER_USER,
        ONE_CLAIM_PER_IDEMPOTENCY_KEY,
    }:
        return True
    protected = Q(coupon_id=coupon_id, user_id=user_id)
    if idempotency_key is not None:
        protected |= Q(idempotency_key=idempotency_key)
    return ClaimHistory.objects.filter(protected).exists()


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


def change_sale_window(
    *, coupon_id: int, starts_at: datetime.datetime | None, ends_at: datetime.datetime | None
) -> Coupon:
    """Set when a coupon's claims are taken (None: from now, for ever).

    Inside a caller's transaction (the admin's), the coupon's lock lasts until that ends.
    """
    with transaction.atomic():
        # Under the claims' lock, so no claim checks a window that is being replaced.
        coupon = Coupon.objects.select_for_update(no_key=True).get(pk=coupon_id)
        coupon.starts_at, coupon.ends_at = starts_at, ends_at
        coupon.save(update_fields=["starts_at", "ends_at", "updated_at"])
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
class RememberedCoupon:
    """A coupon refusing claims as this process last saw it: its sale window, and if it was
    sold out, everyone who holds it."""

    coupon_id: int
    version: object
    starts_at: datetime.datetime | None
    ends_at: datetime.datetime | None
    sold_out: bool
    claimants: frozenset[str]
    seen_at: float


class SoldOutMemory:
    """Answers claims on coupons that refuse them, from process memory, without the database.

    Most requests of a flash sale arrive after the stock is gone, and many before the sale
    opens. A coupon sold out or outside its sale window stays so until an operator changes
    its amount or window or revokes a claim, and each change moves its `updated_at`; so an
    entry is trusted for `SOLD_OUT_MEMORY_SECONDS`, then checked against the row again (one
    indexed read) and reloaded only if it changed. Such an answer is at most that old; it
    never lets a claim through, so it cannot oversell or double dip. It answers in the
    contract's order: the sale window first (against the time of the claim, so a sale that
    opens is not refused from memory), then the holders, then the stock. Changes made in
    this process (more stock, a revoked claim, a new window, the coupon deleted or made
    again) forget the entry as they commit.
    """

    max_coupons = 256
    # Remembering the holders costs memory per claim: past this, ask the database.
    max_claimants = 100_000

    def __init__(self) -> None:
        self._coupons: OrderedDict[str, RememberedCoupon] = OrderedDict()

    def answer(self, coupon_name: str, user_id: str, now: datetime.datetime) -> None:
        """Raise the refusal a claim at `now` gets, if this process knows it."""
        entry = self._coupons.get(coupon_name)
        if entry and time.monotonic() - entry.seen_at < settings.SOLD_OUT_MEMORY_SECONDS:
            check_sale_window(entry.starts_at, entry.ends_at, now)
            if entry.sold_out:
                raise AlreadyClaimed() if user_id in entry.claimants else OutOfStock()

    def remember(self, coupon: Coupon) -> None:
        """Note the coupon, seen refusing claims, as it was then (its `updated_at`)."""
        if settings.SOLD_OUT_MEMORY_SECONDS <= 0:
            return
        entry = self._coupons.get(coupon.name)
        if not coupon.is_sold_out:
            claimants: frozenset[str] = frozenset()
        elif entry and (entry.coupon_id, entry.version) == (coupon.pk, coupon.updated_at):
            claimants = entry.claimants  # Unchanged since it was loaded.
        else:
            holders = ClaimHistory.objects.filter(coupon_id=coupon.pk).values_list("user_id")
            if holders[self.max_claimants : self.max_claimants + 1].exists():
                return
            claimants = frozenset(user_id for (user_id,) in holders)
        if coupon.name not in self._coupons and len(self._coupons) >= self.max_coupons:
            _drop_oldest(self._coupons)
        self._coupons[coupon.name] = RememberedCoupon(
            coupon.pk,
            coupon.updated_at,
            coupon.starts_at,
            coupon.ends_at,
            coupon.is_sold_out,
            claimants,
            time.monotonic(),
        )

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
