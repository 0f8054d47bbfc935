"""The service with a deliberately unsafe claim (no transaction, no lock), to prove the
concurrency tests can fail. Served only by the tests; never imported by the product."""

import time

from couponsite.wsgi import application  # Sets Django up before the models are imported.

# isort: split
from coupons import services
from coupons.errors import CouponNotFound, OutOfStock
from coupons.models import ClaimHistory, Coupon


def claim_without_lock(
    *, coupon_name: str, user_id: str, idempotency_key: str | None = None
) -> ClaimHistory:
    """Read the stock, then write it back: the classic lost update."""
    coupon = Coupon.objects.filter(name=coupon_name).first()
    if coupon is None:
        raise CouponNotFound()
    if coupon.remaining_amount == 0:
        raise OutOfStock()
    time.sleep(0.005)  # The time a busier database would take; widens the race.
    claim = ClaimHistory.objects.create(coupon=coupon, user_id=user_id)
    Coupon.objects.filter(pk=coupon.pk).update(remaining_amount=coupon.remaining_amount - 1)
    return claim


services.claim_coupon = claim_without_lock

__all__ = ["application"]
