"""Check that every coupon's stored stock agrees with its claims."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, F

from coupons.models import Coupon


class Command(BaseCommand):
    help = (
        "Check remaining_amount == amount - claims and 0 <= remaining_amount <= amount for "
        "every coupon. Exits non-zero and lists the coupons that disagree."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        coupons = Coupon.objects.annotate(claims_made=Count("claims")).order_by("name")
        total = coupons.count()
        broken = list(
            coupons.exclude(remaining_amount=F("amount") - F("claims_made")).values(
                "name", "amount", "remaining_amount", "claims_made"
            )
        )
        for coupon in broken:
            self.stderr.write(
                f"MISMATCH {coupon['name']}: amount {coupon['amount']}, "
                f"remaining {coupon['remaining_amount']}, claims {coupon['claims_made']} "
                f"(expected remaining {coupon['amount'] - coupon['claims_made']})"
            )
        if broken:
            raise CommandError(f"{len(broken)} of {total} coupons break the stock invariant.")
        self.stdout.write(self.style.SUCCESS(f"All {total} coupons are consistent."))
