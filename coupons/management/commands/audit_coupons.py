"""Check that every coupon's stored stock agrees with its claims, and its name with the rules."""

import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, F
from tqdm import tqdm

from coupons.models import Coupon


class Command(BaseCommand):
    help = (
        "Check remaining_amount == amount - claims and 0 <= remaining_amount <= amount for "
        "every coupon, and that every name meets the input rules (a name stored before a "
        "rule existed cannot be read or claimed through the API). Exits non-zero and lists "
        "the coupons that fail."
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
        misnamed = 0
        name_field = Coupon._meta.get_field("name")
        names = Coupon.objects.order_by("name").values_list("name", flat=True).iterator()
        # A progress bar on a terminal's stderr; none when stderr is not a terminal.
        for name in tqdm(names, total=total, desc="names", disable=not sys.stderr.isatty()):
            try:
                name_field.run_validators(name)
            except ValidationError as refused:
                misnamed += 1
                self.stderr.write(f"NAME {name!r}: {' '.join(refused.messages)}")
        if broken or misnamed:
            raise CommandError(
                f"{len(broken)} of {total} coupons break the stock invariant; "
                f"{misnamed} have a name the rules refuse."
            )
        self.stdout.write(self.style.SUCCESS(f"All {total} coupons are consistent."))
