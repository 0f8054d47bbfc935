"""Coupons with a limited stock, and the ledger of who claimed them.

The input rules live here, on the fields, once: the API's serializers, the admin's forms and
the seed_coupons command all inherit them.
"""

import datetime
from typing import Any

from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import connections, models
from django.db.models import BooleanField, Count, Exists, F, OuterRef, Q, Subquery, Sum
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce, Trunc
from django.db.models.lookups import Exact, GreaterThan
from django.utils import timezone
from rest_framework_api_key.models import AbstractAPIKey

from coupons.claim_write import OneStatementClaimWrite
from coupons.errors import AmountBelowClaimed, SaleEnded, SaleNotStarted

MAX_AMOUNT = 2_147_483_647
# Rows a coupon's stock may be split over (docs/scaling.md, "Stock shards").
MAX_STOCK_SHARDS = 64

# Unicode control characters (C0, DEL and C1), NUL among them: invisible, and some cannot be
# stored or logged safely.
no_control_characters = RegexValidator(
    r"[\x00-\x1f\x7f-\x9f]",
    inverse_match=True,
    message="Must not contain control characters.",
    code="control_characters",
)
# A coupon is addressed by its name in a URL path, where "/" cannot stand.
no_slash = RegexValidator(
    "/", inverse_match=True, message="Must not contain '/'.", code="slash_in_name"
)
# A name an operator can see: spaces around it are kept as given, but not spaces alone.
visible = RegexValidator(
    r"\S", message="Must contain a character other than whitespace.", code="only_whitespace"
)


# An Idempotency-Key header: visible ASCII only, as HTTP headers carry it.
visible_ascii = RegexValidator(
    r"\A[\x21-\x7e]+\Z",
    message="Must be 1 to 255 visible ASCII characters (no spaces).",
    code="not_visible_ascii",
)


def check_sale_window(
    starts_at: datetime.datetime | None, ends_at: datetime.datetime | None, now: datetime.datetime
) -> None:
    """Raise SaleNotStarted before the window opens, SaleEnded once it has closed."""
    if starts_at is not None and now < starts_at:
        raise SaleNotStarted()
    if ends_at is not None and now >= ends_at:
        raise SaleEnded()


class NameField(models.CharField[str, str]):
    """A name or id of 1 to 255 characters, kept exactly as given: forms do not trim it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_length", 255)
        super().__init__(*args, **kwargs)

    def formfield(
        self, form_class: Any = None, choices_form_class: Any = None, **kwargs: Any
    ) -> Any:
        return super().formfield(
            form_class=form_class,
            choices_form_class=choices_form_class,
            **{"strip": False, **kwargs},
        )


# The stock left of coupons read with CouponQuerySet.with_stock(), to filter and order on
# (Coupon.stock_left is the same sum): one of the two is always 0, as the stock is on the
# row or in the shards.
STOCK_LEFT = F("remaining_amount") + F("shard_stock")


class CouponQuerySet(models.QuerySet["Coupon"]):
    def with_stock(self) -> "CouponQuerySet":
        """Annotate each coupon with `shard_stock`, the stock left in its StockShard rows,
        read in the same statement as the row (one snapshot: see Coupon.stock_left)."""
        in_shards = (
            StockShard.objects.filter(coupon=OuterRef("pk"))
            .values("coupon")
            .annotate(stock=Sum("remaining_amount"))
            .values("stock")
        )
        shard_stock = Coalesce(Subquery(in_shards), 0)
        return self.annotate(shard_stock=shard_stock)  # type: ignore[no-redef]  # Typed on Coupon.

    def sold_out(self, sold_out: bool = True) -> "CouponQuerySet":
        """Coupons with no stock left (or, with False, with some)."""
        coupons = self.with_stock()
        return coupons.filter(Exact(STOCK_LEFT, 0) if sold_out else GreaterThan(STOCK_LEFT, 0))

    def live(self, now: datetime.datetime) -> "CouponQuerySet":
        """Coupons open for claims at `now`: inside their sale window, with stock left."""
        return self.with_stock().filter(self._live_condition(now))

    def not_live(self, now: datetime.datetime) -> "CouponQuerySet":
        return self.with_stock().exclude(self._live_condition(now))

    @staticmethod
    def _live_condition(now: datetime.datetime) -> Q:
        return (
            Q(GreaterThan(STOCK_LEFT, 0))
            & (Q(starts_at__isnull=True) | Q(starts_at__lte=now))
            & (Q(ends_at__isnull=True) | Q(ends_at__gt=now))
        )

    def with_holder(self, user_id: str) -> "CouponQuerySet":
        """Annotate each coupon with `held`: whether this user holds a unit of it."""
        holder = ClaimHistory.objects.filter(coupon=OuterRef("pk"), user_id=user_id)
        return self.annotate(held=Exists(holder))  # type: ignore[no-redef]  # Typed on Coupon.


class Coupon(models.Model):
    """A coupon with a fixed total stock; `remaining_amount` is the stock left to claim."""

    name = NameField(unique=True, validators=[no_control_characters, no_slash, visible])
    amount = models.PositiveIntegerField(
        help_text="Total stock.",
        validators=[MinValueValidator(1), MaxValueValidator(MAX_AMOUNT)],
    )
    # A stored counter, decremented in the claim's transaction: a claim costs the same
    # whether 5 or 500,000 claims were made before it. With more than one stock shard the
    # counters are the shards' and this one stays 0 (coupon_stock_on_row_or_in_shards).
    remaining_amount = models.PositiveIntegerField(
        help_text="Stock left to claim on this row (all of it, with one stock shard)."
    )
    stock_shards = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(MAX_STOCK_SHARDS)],
        help_text=(
            "Rows the stock is split over, from 1 to 64: up to this many claims take a unit "
            "at once. Raise it for a hot coupon when the database is a network hop away."
        ),
    )
    # The sale window: claims are taken from starts_at (at once if empty) until ends_at
    # (never closing if empty).
    starts_at = models.DateTimeField(
        null=True, blank=True, help_text="Claims open; empty: at once."
    )
    ends_at = models.DateTimeField(null=True, blank=True, help_text="Claims close; empty: never.")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CouponQuerySet.as_manager()

    # Present when the queryset annotated them (with_holder, with_stock).
    held: bool
    shard_stock: int

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(amount__gte=1) & Q(amount__lte=MAX_AMOUNT),
                name="coupon_amount_in_range",
                violation_error_message=f"The amount must be from 1 to {MAX_AMOUNT:,}.",
            ),
            models.CheckConstraint(
                condition=Q(remaining_amount__gte=0) & Q(remaining_amount__lte=F("amount")),
                name="coupon_remaining_within_amount",
                violation_error_message="The stock left must be from 0 to the amount.",
            ),
            models.CheckConstraint(
                condition=Q(stock_shards__gte=1) & Q(stock_shards__lte=MAX_STOCK_SHARDS),
                name="coupon_stock_shards_in_range",
                violation_error_message=f"Stock shards must be from 1 to {MAX_STOCK_SHARDS}.",
            ),
            # The stock is counted in one place: on the row, or in the StockShard rows.
            models.CheckConstraint(
                condition=Q(stock_shards=1) | Q(remaining_amount=0),
                name="coupon_stock_on_row_or_in_shards",
                violation_error_message="A coupon with stock shards keeps no stock on its row.",
            ),
            models.CheckConstraint(
                condition=Q(starts_at__isnull=True)
                | Q(ends_at__isnull=True)
                | Q(ends_at__gt=F("starts_at")),
                name="coupon_window_ends_after_start",
                violation_error_message="ends_at must be after starts_at.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def stock_left(self) -> int:
        """The stock left to claim, the API's `remaining_amount`: the row's counter plus the
        shards' stock read with the row (with_stock()), as STOCK_LEFT. A coupon of one stock
        row read without it has nothing in shards."""
        shard_stock = vars(self).get("shard_stock")
        if shard_stock is None:
            if self.stock_shards > 1:
                raise AttributeError(
                    "A coupon with stock shards must be read with Coupon.objects.with_stock()."
                )
            shard_stock = 0
        return self.remaining_amount + shard_stock

    @property
    def claimed_count(self) -> int:
        # Exact because every claim and revocation moves a counter in the same transaction.
        return self.amount - self.stock_left

    @property
    def is_sold_out(self) -> bool:
        return self.stock_left == 0

    def check_sale_window(self, now: datetime.datetime) -> None:
        """Raise SaleNotStarted or SaleEnded if claims are not taken at `now`."""
        check_sale_window(self.starts_at, self.ends_at, now)

    def is_on_sale(self, now: datetime.datetime) -> bool:
        """Whether claims are taken at `now`: inside the sale window, with stock left."""
        try:
            self.check_sale_window(now)
        except (SaleNotStarted, SaleEnded):
            return False
        return not self.is_sold_out

    def check_new_amount(self, amount: int) -> None:
        """Raise AmountBelowClaimed if the stock cannot become `amount`: claims are kept."""
        if amount < self.claimed_count:
            raise AmountBelowClaimed(
                f"The amount cannot be lower than the {self.claimed_count} claims already made."
            )


def split_stock(stock: int, shards: int) -> list[int]:
    """Stock spread over shards as evenly as it goes, the larger parts first."""
    share, rest = divmod(stock, shards)
    return [share + (number < rest) for number in range(shards)]


class StockShardQuerySet(models.QuerySet["StockShard"]):
    def lock_one_with_stock(self, coupon_id: int, user_id: str) -> "StockShard | None":
        """Lock a shard of the coupon that has stock, its coupon read with it and annotated
        with `held` (see CouponQuerySet.with_holder); None if no shard has stock left.

        A shard another claim holds is skipped, the shards tried in random order so that
        claims spread over them. Only when every shard with stock is held does this wait for
        one, in the shards' order: should that shard be emptied meanwhile, it goes on to the
        next, keeping the emptied one's lock until it commits, so waiting claims must take
        their locks in one order, or two could each wait for the other's.
        """
        holder = ClaimHistory.objects.filter(coupon=OuterRef("coupon_id"), user_id=user_id)
        with_stock = (
            self.filter(coupon_id=coupon_id, remaining_amount__gt=0)
            .select_related("coupon")
            .annotate(held=Exists(holder))  # type: ignore[no-redef]  # Typed on StockShard.
        )
        free = with_stock.select_for_update(no_key=True, skip_locked=True, of=("self",))
        shard = free.order_by("?").first()
        if shard is None:
            busy = with_stock.select_for_update(no_key=True, of=("self",))
            shard = busy.order_by("number").first()
        return shard


class StockShard(models.Model):
    """A part of a coupon's stock on a row of its own, when the coupon's stock is split
    over `stock_shards` rows: each claim locks one shard, so that as many claims on the
    coupon take a unit at once (services.claim_coupon). A coupon with one shard keeps its
    stock on its own row and has no StockShard."""

    coupon = models.ForeignKey(
        Coupon,
        on_delete=models.CASCADE,
        related_name="shards",
        # The unique (coupon, number) index starts with coupon_id and serves the join.
        db_index=False,
    )
    number = models.PositiveSmallIntegerField(help_text="From 0 to the coupon's shards - 1.")
    remaining_amount = models.PositiveIntegerField(help_text="Stock left on this shard.")

    objects = StockShardQuerySet.as_manager()

    # Present when the queryset annotated it (lock_one_with_stock).
    held: bool

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["coupon", "number"], name="stock_shard_number"),
        ]

    def __str__(self) -> str:
        return f"{self.coupon} #{self.number}"


class ClaimQuerySet(OneStatementClaimWrite):
    def count_per(self, unit: str) -> "list[tuple[datetime.datetime, int]]":
        """How many claims were made in each `unit` ("second", "minute"...), oldest first:
        counted by the database, with no Python object per claim."""
        buckets = (
            self.annotate(bucket=Trunc("claimed_at", unit, tzinfo=datetime.UTC))
            .values_list("bucket")
            .annotate(claims=Count("id"))
            .order_by("bucket")
        )
        return list(buckets)

    def in_claim_order(self) -> "ClaimQuerySet":
        """The claims in the order they were made, read through claim_coupon_order_idx.

        That index is partial on "id > 0", true of every claim (see ClaimHistory.Meta), and
        serves only a query that states the condition as written: the ORM would send the 0
        as a parameter, which a prepared statement's generic plan cannot match to it.
        """
        table = connections[self.db].ops.quote_name(self.model._meta.db_table)
        every_claim = RawSQL(f"{table}.id > 0", [], output_field=BooleanField())
        return self.filter(every_claim).order_by("id")


# The unique constraints' names, as the database reports a violation of them.
ONE_CLAIM_PER_USER = "claim_one_per_user"
ONE_CLAIM_PER_IDEMPOTENCY_KEY = "claim_one_per_idempotency_key"


class ClaimHistory(models.Model):
    """One successful claim: a user holds one unit of a coupon."""

    coupon = models.ForeignKey(
        Coupon,
        on_delete=models.CASCADE,
        related_name="claims",
        # The unique (coupon, user_id) index starts with coupon_id and serves the join.
        db_index=False,
    )
    user_id = NameField(validators=[no_control_characters])
    # Given by the claim: the instant its sale window was checked against, under the lock.
    claimed_at = models.DateTimeField(default=timezone.now)
    # The claim request's Idempotency-Key: a retry with the same key is answered with this
    # claim. NULL, not "", when the request had none: a unique index leaves NULLs out of its
    # uniqueness, so no partial index (which a prepared statement's generic plan could not
    # use for `idempotency_key = $1`) is needed.
    idempotency_key = models.CharField(  # noqa: DJ001
        max_length=255, null=True, blank=True, validators=[visible_ascii]
    )

    objects = ClaimQuerySet.as_manager()

    # Set by services.claim_coupon on a claim it answers again for a retried request.
    replayed = False

    class Meta:
        verbose_name = "claim"
        verbose_name_plural = "claims"
        constraints = [
            # Backs the one-claim-per-user rule even if application code were wrong.
            models.UniqueConstraint(fields=["coupon", "user_id"], name=ONE_CLAIM_PER_USER),
            # A key names one claim request, whatever the coupon: a retry finds its claim by
            # the key alone, and a key reused for another coupon or user is refused.
            models.UniqueConstraint(fields=["idempotency_key"], name=ONE_CLAIM_PER_IDEMPOTENCY_KEY),
        ]
        indexes = [
            # The claimed_by listing, in claim order. Partial on "id > 0", which every row
            # meets, so that only a query stating it can use the index (details_document.py).
            # Otherwise PostgreSQL, without statistics on a young claims table, plans the
            # holder check (coupon_id = … AND user_id = …) on this index rather than the
            # unique one, and then reads every claim of the coupon on every claim: a
            # prepared statement keeps that plan for the connection's life.
            models.Index(
                fields=["coupon", "id"], condition=Q(id__gt=0), name="claim_coupon_order_idx"
            ),
        ]
        # No index on user_id alone: the admin's search by user is a substring match,
        # which no B-tree serves, and every claim would pay for it under the row lock.

    def __str__(self) -> str:
        return f"{self.user_id} → {self.coupon}"


class ApiKey(AbstractAPIKey):
    """A key a shop's backend sends as `Authorization: Bearer <key>` when API_AUTH=required.

    djangorestframework-api-key stores a prefix to find the key and a SHA-512 hash of the
    whole key (never the key itself), and compares hashes in constant time. The scope says
    what the key may do (coupons/access.py).
    """

    class Scope(models.TextChoices):
        ADMIN = "admin", "admin: everything, including creating coupons and revoking claims"
        CLIENT = "client", "client: claim coupons and read them"

    # Unique, unlike the library's: operators revoke a key by its name.
    name = models.CharField(max_length=50, unique=True, help_text="Who holds this key.")
    scope = models.CharField(max_length=10, choices=Scope.choices)

    class Meta(AbstractAPIKey.Meta):
        verbose_name = "API key"
        verbose_name_plural = "API keys"
