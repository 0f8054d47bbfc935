"""The write paths of the product. The API, the admin and the commands all go through here."""

from django.db import IntegrityError, transaction
from django.db.models import Exists, F, OuterRef
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


def claim_coupon(*, coupon_name: str, user_id: str) -> ClaimHistory:
    """Give one unit of a coupon to a user, or raise why not.

    The checks come in the contract's order: CouponNotFound, then AlreadyClaimed, then
    OutOfStock. Takes and releases the coupon row's lock; call it outside any transaction.
    """
    # Read without any lock first: "already claimed" and "sold out" seen in a committed
    # snapshot were true at that moment, so they are honest answers. Most requests of a
    # flash sale end here and never queue for the lock.
    found = list(
        Coupon.objects.filter(name=coupon_name)
        .annotate(
            already_claimed=Exists(
                ClaimHistory.objects.filter(coupon=OuterRef("pk"), user_id=user_id)
            )
        )
        .values_list("pk", "remaining_amount", "already_claimed")[:1]
    )
    if not found:
        raise CouponNotFound()
    coupon_id, remaining_amount, already_claimed = found[0]
    if already_claimed:
        raise AlreadyClaimed()
    if remaining_amount == 0:
        raise OutOfStock()

    try:
        with transaction.atomic():
            # Lock the coupon's row so concurrent claims take its stock one at a time, and
            # re-read the counter under the lock: the value read above may already be stale.
            # NO KEY: the row's key is not changed, so foreign-key checks need not wait.
            remaining_amount = (
                Coupon.objects.select_for_update(no_key=True)
                .values_list("remaining_amount", flat=True)
                .get(pk=coupon_id)
            )
            # Inserted under the lock, so claim ids follow commit order and claimed_by
            # only ever grows at its end. The unique (coupon, user_id) index refuses a
            # second claim by the same user before the stock is looked at, keeping the
            # contract's order of checks.
            claim = ClaimHistory.objects.create(coupon_id=coupon_id, user_id=user_id)
            if remaining_amount == 0:
                raise OutOfStock()  # Rolls back the claim inserted above.
            Coupon.objects.filter(pk=coupon_id).update(
                remaining_amount=F("remaining_amount") - 1, updated_at=timezone.now()
            )
    except IntegrityError:
        # Caught outside the atomic block, whose transaction is already rolled back.
        if ClaimHistory.objects.filter(coupon_id=coupon_id, user_id=user_id).exists():
            raise AlreadyClaimed() from None
        if not Coupon.objects.filter(pk=coupon_id).exists():
            raise CouponNotFound() from None
        raise
    except Coupon.DoesNotExist:
        raise CouponNotFound() from None
    return claim


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
    return bool(deleted)
