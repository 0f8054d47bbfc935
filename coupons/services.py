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
    StockShard,
    check_sale_window,
    split_stock,
)


def create_coupon(
    *,
    name: str,
    amount: int,
    starts_at: datetime.datetime | None = None,
    ends_at: datetime.datetime | None = None,
    stock_shards: int = 1,
) -> Coupon:
    """Create a coupon with its whole stock available; raise CouponExists if the name is taken.

    Claims are taken from starts_at (at once if None) until ends_at (for ever if None). The
    stock is split over stock_shards rows (see StockShard).
    """
    try:
        with transaction.atomic():
            coupon = Coupon(
                name=name,
                amount=amount,
                stock_shards=stock_shards,
                starts_at=starts_at,
                ends_at=ends_at,
            )
            shards = _place_stock(coupon, amount)
            coupon.save(force_insert=True)
            StockShard.objects.bulk_create(shards)
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
        new = [Coupon(**coupon) for coupon in coupons if coupon["name"] not in taken]
        shards = [shard for coupon in new for shard in _place_stock(coupon, coupon.amount)]
        Coupon.objects.bulk_create(new)
        StockShard.objects.bulk_create(shards)
        created = [coupon.name for coupon in new]
        # Coupons of these names deleted earlier may still be remembered sold out.
        for name in created:
            transaction.on_commit(functools.partial(forget_coupon, name))
    return created, [name for name in names if name in taken]


def delete_coupon(*, coupon_id: int) -> None:
    """Delete a coupon and its claims."""
    with transaction.atomic():
        try:
            coupon = _lock_stock(coupon_id)
        except Coupon.DoesNotExist:
            return
        coupon.delete()
        transaction.on_commit(lambda: forget_coupon(coupon.name))


def _place_stock(coupon: Coupon, stock: int) -> list[StockShard]:
    """Put `stock` on the coupon's row if it has one stock shard; else leave the row none and
    return the StockShard rows that hold it, to create once the row is saved."""
    if coupon.stock_shards == 1:
        coupon.remaining_amount, coupon.shard_stock = stock, 0
        return []
    coupon.remaining_amount, coupon.shard_stock = 0, stock
    parts = split_stock(stock, coupon.stock_shards)
    return [
        StockShard(coupon=coupon, number=number, remaining_amount=part)
        for number, part in enumerate(parts)
    ]


def _lock_stock(coupon_id: int) -> Coupon:
    """Lock a coupon's row and every stock shard of it, and read its stock left (the
    coupon's `shard_stock` set): until the caller's transaction ends, no claim on it
    takes a unit, and the claims that took one have committed.

    Operators' changes take the row, then the shards; a claim takes one shard, then, as
    it writes, shares the row's key lock with other claims, which this row lock (FOR NO
    KEY UPDATE) does not block: no cycle, so no deadlock.
    """
    coupon = Coupon.objects.select_for_update(no_key=True).get(pk=coupon_id)
    coupon.shard_stock = 0
    if coupon.stock_shards > 1:
        shards = StockShard.objects.select_for_update(no_key=True).filter(coupon_id=coupon_id)
        coupon.shard_stock = sum(
            shards.order_by("number").values_list("remaining_amount", flat=True)
        )
    return coupon


def _restock(coupon: Coupon, *, stock: int) -> None:
    """Put `stock` units in the coupon's stock, spread over its `stock_shards`, under
    _lock_stock. The shards are made anew: a claim waiting for an old one finds it gone
    and claims again (services.claim_coupon)."""
    StockShard.objects.filter(coupon=coupon).delete()
    StockShard.objects.bulk_create(_place_stock(coupon, stock))
    coupon.save(update_fields=["amount", "remaining_amount", "stock_shards", "updated_at"])


def forget_coupon(name: str) -> None:
    """Drop what this process remembers of the coupon of this name (sold out, on sale)."""
    sold_out_memory.forget(name)
    on_sale_memory.discard(name)


class _StockMoved(Exception):
    """The coupon's stock is no longer where this claim looked for it: an operator changed
    its shards, its stock or its window meanwhile. The claim is rolled back and made again."""


def claim_coupon(
    *, coupon_name: str, user_id: str, idempotency_key: str | None = None
) -> ClaimHistory:
    """Give one unit of a coupon to a user, or raise why not.

    The checks come in the contract's order: CouponNotFound, then SaleNotStarted or
    SaleEnded, then AlreadyClaimed, then OutOfStock. The idempotency_key, if any, is
    recorded with the claim; the unique index on keys refuses a second claim with it
    (AlreadyClaimed), which claim_coupon_idempotently then answers.

    Takes and releases the lock of the row that holds the unit: the coupon's, or one of its
    stock shards'. Call it outside any transaction (durable=True refuses a caller's atomic
    block, but cannot see a transaction opened by switching autocommit off: there the claim
    commits with its caller).
    """
    sold_out_memory.answer(coupon_name, user_id, timezone.now())
    while True:
        try:
            return _claim(coupon_name, user_id, idempotency_key)
        except _StockMoved:
            on_sale_memory.discard(coupon_name)


def _claim(coupon_name: str, user_id: str, idempotency_key: str | None) -> ClaimHistory:
    remembered = on_sale_memory.get(coupon_name)
    coupon_id, shards = remembered or _look_before_queueing(coupon_name, user_id)
    try:
        with transaction.atomic(durable=True):
            # The row lock serialises every claim that takes a unit from that row, so the
            # counter read here stays true until the commit. The claims queue on it, one
            # at a time: keep this block to its few round trips.
            if shards == 1:
                coupon = (
                    Coupon.objects.select_for_update(no_key=True)
                    .with_holder(user_id)
                    .get(pk=coupon_id)
                )
                shard = None
            else:
                coupon, shard = _lock_a_shard(coupon_id, user_id)
            if coupon.name != coupon_name:
                raise Coupon.DoesNotExist  # The id was given to another coupon since.
            if coupon.stock_shards != shards:
                raise _StockMoved
            sold_out = coupon.is_sold_out if shard is None else False
            now = timezone.now()  # The claim's instant: checked against the window, recorded.
            coupon.check_sale_window(now)
            if sold_out and not coupon.held and shards == 1:
                # Had the lock's statement waited, its EXISTS still saw the claims as they
                # were before the wait: look again, for the contract's order. (A coupon with
                # shards is found sold out by a fresh read that did not wait.)
                coupon.held = coupon.claims.filter(user_id=user_id).exists()
            if coupon.held:
                raise AlreadyClaimed()
            if sold_out:
                raise OutOfStock()
            claim, seen_by_write = ClaimHistory.objects.take_unit(
                coupon=coupon,
                user_id=user_id,
                claimed_at=now,
                idempotency_key=idempotency_key,
                shard=shard,
            )
            if seen_by_write is not None and seen_by_write != coupon.updated_at:
                # The coupon's row changed between the lock's read and the shard's lock
                # (an operator's change, which takes every shard): check it anew.
                raise _StockMoved
    except Coupon.DoesNotExist:
        # Deleted since this process looked it up, and perhaps made anew under its name.
        if remembered is None:
            raise CouponNotFound() from None
        raise _StockMoved from None
    except (SaleNotStarted, SaleEnded, OutOfStock):
        # Raised only on what the lock read: `coupon` is that row, as it stands; but a
        # shard's claim reads the coupon's row without locking it, as it stood when the
        # shard's statement began, which may have waited for an operator's change.
        if shard is not None and _changed_since_read(coupon):
            raise _StockMoved from None
        on_sale_memory.discard(coupon_name)
        sold_out_memory.remember(coupon, sold_out=sold_out)
        raise
    except IntegrityError as error:
        # A claim by this user, or with this key, committed after the lock statement's
        # snapshot (another request, which held the lock while this one waited, or took a
        # unit from another shard), and a unique index refused this one; the transaction
        # is rolled back.
        if _refused_as_a_repeat(error, coupon_id, user_id, idempotency_key):
            raise AlreadyClaimed() from None
        raise
    return claim


def _changed_since_read(coupon: Coupon) -> bool:
    """Whether the coupon's row has changed since `coupon` was read (every change moves
    its `updated_at`, or deletes it)."""
    return not Coupon.objects.filter(pk=coupon.pk, updated_at=coupon.updated_at).exists()


def _lock_a_shard(coupon_id: int, user_id: str) -> tuple[Coupon, StockShard | None]:
    """Lock a shard of the coupon with stock left, and return it with the coupon (`held`
    annotated); with None if every shard is empty (the coupon, then, read anew)."""
    shard = StockShard.objects.lock_one_with_stock(coupon_id, user_id)
    if shard is not None:
        coupon = shard.coupon
        coupon.held = shard.held
        return coupon, shard
    # Sold out, unless an operator added stock or changed the shards since the shards'
    # statement began: this statement sees that.
    coupon = Coupon.objects.with_stock().with_holder(user_id).get(pk=coupon_id)
    if coupon.stock_shards > 1 and not coupon.is_sold_out:
        raise _StockMoved
    return coupon, None


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


def _look_before_queueing(coupon_name: str, user_id: str) -> tuple[int, int]:
    """Return the id and stock shards of the coupon to claim, or raise the refusal it
    already warrants.

    Read without any lock: the window, "already claimed" and "sold out" seen in a
    committed snapshot were true at that moment, so they are honest answers, and the
    requests that end here never queue for the lock.
    """
    coupon = Coupon.objects.with_stock().with_holder(user_id).filter(name=coupon_name).first()
    if coupon is None:
        raise CouponNotFound()
    now = timezone.now()
    if not coupon.is_on_sale(now):
        sold_out_memory.remember(coupon, sold_out=coupon.is_sold_out)
    coupon.check_sale_window(now)
    if coupon.held:
        raise AlreadyClaimed()
    if coupon.is_sold_out:
        raise OutOfStock()
    on_sale_memory.add(coupon_name, coupon.pk, coupon.stock_shards)
    return coupon.pk, coupon.stock_shards


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

    Inside a caller's transaction (the admin's), the coupon's locks last until that ends.
    """
    with transaction.atomic():
        coupon = _lock_stock(coupon_id)
        if amount == coupon.amount:
            return coupon  # As the admin saves a coupon whose amount it did not change.
        coupon.check_new_amount(amount)
        stock = amount - coupon.claimed_count
        coupon.amount = amount
        _restock(coupon, stock=stock)
        transaction.on_commit(lambda: forget_coupon(coupon.name))
    return coupon


def change_stock_shards(*, coupon_id: int, stock_shards: int) -> Coupon:
    """Split a coupon's stock left over `stock_shards` rows (1: the coupon's own row),
    keeping every unit and claim. Claims wait while it runs, then go on.

    Inside a caller's transaction (the admin's), the coupon's locks last until that ends.
    """
    with transaction.atomic():
        coupon = _lock_stock(coupon_id)
        stock = coupon.stock_left
        coupon.stock_shards = stock_shards
        _restock(coupon, stock=stock)
        transaction.on_commit(lambda: forget_coupon(coupon.name))
    return coupon


def change_sale_window(
    *, coupon_id: int, starts_at: datetime.datetime | None, ends_at: datetime.datetime | None
) -> Coupon:
    """Set when a coupon's claims are taken (None: from now, for ever).

    Inside a caller's transaction (the admin's), the coupon's lock lasts until that ends.
    """
    with transaction.atomic():
        # Under the claims' locks, so no claim checks a window that is being replaced.
        coupon = _lock_stock(coupon_id)
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
        # The claims' locks, taken first, so the counters and the ledger move together.
        coupon = _lock_stock(coupon_id)
        deleted, _ = ClaimHistory.objects.filter(pk=claim_id).delete()
        if deleted:
            if coupon.stock_shards == 1:
                coupon.remaining_amount += 1
            else:
                # To the emptiest shard, which claims are least likely to find empty.
                emptiest = coupon.shards.order_by("remaining_amount", "number")[:1]
                StockShard.objects.filter(pk__in=emptiest).update(
                    remaining_amount=F("remaining_amount") + 1
                )
            # The row's updated_at moves even with shards: the sold-out memory and claims
            # waiting for a shard see the change by it.
            coupon.save(update_fields=["remaining_amount", "updated_at"])
            transaction.on_commit(lambda: forget_coupon(coupon.name))
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

    def remember(self, coupon: Coupon, *, sold_out: bool) -> None:
        """Note the coupon, seen refusing claims, as it was then (its `updated_at`), and
        whether it was sold out."""
        if settings.SOLD_OUT_MEMORY_SECONDS <= 0:
            return
        entry = self._coupons.get(coupon.name)
        version = (coupon.pk, coupon.updated_at)
        if not sold_out:
            claimants: frozenset[str] = frozenset()
        elif entry and entry.sold_out and (entry.coupon_id, entry.version) == version:
            # Sold out then and unchanged since: the same holders. (Claims on stock shards
            # leave `updated_at` alone, so an entry from before the sell-out has none.)
            claimants = entry.claimants
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
            sold_out,
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
    """The ids and stock shards of coupons this process last saw with stock left, by name;
    bounded.

    A claim on one of them skips the lock-free look and goes straight to the coupon's row
    lock, whose statement reads everything the checks need anyway: while a sale lasts
    nearly every claim gets that far, and the look would cost each one more round trip.
    Only the route is taken from here, never an answer. The claim checks the name on the
    row it locks by id, so a coupon deleted since (or an id given to another coupon after
    its sequence was reset) counts as gone, and the claim looks again.
    """

    max_coupons = 256

    def __init__(self) -> None:
        self._ids: OrderedDict[str, tuple[int, int]] = OrderedDict()

    def get(self, coupon_name: str) -> tuple[int, int] | None:
        return self._ids.get(coupon_name)

    def add(self, coupon_name: str, coupon_id: int, stock_shards: int) -> None:
        if coupon_name not in self._ids and len(self._ids) >= self.max_coupons:
            _drop_oldest(self._ids)
        self._ids[coupon_name] = (coupon_id, stock_shards)

    def discard(self, coupon_name: str) -> None:
        self._ids.pop(coupon_name, None)

    def clear(self) -> None:
        self._ids.clear()


on_sale_memory = OnSaleMemory()
