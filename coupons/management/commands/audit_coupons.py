"""Check that every coupon's stored stock agrees with its claims, and its name with the rules."""

import sys
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db.models import Count, Exists, F, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.db.models.lookups import Exact
from tqdm import tqdm

from coupons.models import STOCK_LEFT, ClaimHistory, Coupon, StockShard


class Command(BaseCommand):
    help = (
        "Check remaining_amount == amount - claims and 0 <= remaining_amount <= amount for "
        "every coupon (its stock on its row, or summed over its stock shards, which must "
        "be numbered 0 to stock_shards - 1), and that every name meets the input rules (a "
        "name stored before a rule existed cannot be read or claimed through the API). "
        "Exits non-zero and lists the coupons that fail."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        # Counted in subqueries, one per coupon: joining claims and shards would multiply them.
        claims_made = ClaimHistory.objects.filter(coupon=OuterRef("pk")).values("coupon")
        coupons = (
            Coupon.objects.with_stock()
            .annotate(
                claims_made=Coalesce(Subquery(claims_made.annotate(n=Count("id")).values("n")), 0)
            )
            .order_by("name")
        )
        total = coupons.count()
        broken = list(
            coupons.exclude(Exact(STOCK_LEFT, F("amount") - F("claims_made")))
            .annotate(remaining=STOCK_LEFT)
            .values("name", "amount", "remaining", "claims_made")
        )
        for coupon in broken:
            self.stderr.write(
                f"MISMATCH {coupon['name']}: amount {coupon['amount']}, "
                f"remaining {coupon['remaining']}, claims {coupon['claims_made']} "
                f"(expected remaining {coupon['amount'] - coupon['claims_made']})"
            )
        # A coupon with K stock shards has exactly the shards 0 to K - 1; with one, none.
        shards = StockShard.objects.filter(coupon=OuterRef("pk")).values("coupon")
        misshapen = list(
            Coupon.objects.annotate(
                shards_made=Coalesce(Subquery(shards.annotate(n=Count("id")).values("n")), 0),
                shards_beyond=Exists(shards.filter(number__gte=OuterRef("stock_shards"))),
            )
            .filter(
                Q(shards_beyond=True)
                | Q(stock_shards=1, shards_made__gt=0)
                | (Q(stock_shards__gt=1) & ~Q(shards_made=F("stock_shards")))
            )
            .order_by("name")
            .values("name", "stock_shards", "shards_made")
        )
        for coupon in misshapen:
            self.stderr.write(
                f"SHARDS {coupon['name']}: stock_shards {coupon['stock_shards']}, "
                f"shard rows {coupon['shards_made']}"
            )
        failing = {coupon["name"] for coupon in broken + misshapen}
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
        if failing or misnamed:
            raise CommandError(
                f"{len(failing)} of {total} coupons break the stock invariant; "
                f"{misnamed} have a name the rules refuse."
            )
        self.stdout.write(self.style.SUCCESS(f"All {total} coupons are consistent."))
