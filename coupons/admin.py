"""The operators' console: coupons and their sales, and the ledger of claims.

Every change goes through the services, under the same lock and rules as the API.
"""

import csv
import datetime
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.admin.options import IncorrectLookupParameters
from django.core.exceptions import PermissionDenied
from django.db.models import F, Q, QuerySet
from django.db.models.lookups import Exact, GreaterThan
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseBase,
    HttpResponseRedirect,
    StreamingHttpResponse,
)
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html
from rest_framework_api_key.admin import APIKeyModelAdmin
from rest_framework_api_key.models import APIKey as LibraryApiKey

from coupons import services
from coupons.errors import AmountBelowClaimed
from coupons.models import STOCK_LEFT, ApiKey, ClaimHistory, Coupon


def moment(value: datetime.datetime | None) -> str:
    """A time to the second, with its time zone, as operators read it."""
    if value is None:
        return "—"
    return timezone.localtime(value).strftime("%Y-%m-%d %H:%M:%S %Z")


def sale_state(coupon: Coupon, now: datetime.datetime) -> str:
    if coupon.starts_at is not None and now < coupon.starts_at:
        return "not started"
    if coupon.ends_at is not None and now >= coupon.ends_at:
        return "ended"
    return "sold out" if coupon.is_sold_out else "on sale"


class SaleFilter(admin.SimpleListFilter):
    title = "sale"
    parameter_name = "sale"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [
            ("on_sale", "On sale"),
            ("sold_out", "Sold out"),
            ("not_started", "Not started"),
            ("ended", "Ended"),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Coupon]) -> QuerySet[Coupon]:
        # As sale_state() words it: not started, then ended, then sold out, else on sale.
        now = timezone.now()
        started = Q(starts_at__isnull=True) | Q(starts_at__lte=now)
        open_ = started & (Q(ends_at__isnull=True) | Q(ends_at__gt=now))
        match self.value():
            case "on_sale":
                return queryset.filter(open_, GreaterThan(STOCK_LEFT, 0))
            case "sold_out":
                return queryset.filter(open_, Exact(STOCK_LEFT, 0))
            case "not_started":
                return queryset.filter(starts_at__gt=now)
            case "ended":
                return queryset.filter(started, ends_at__lte=now)
        return queryset


class CouponAdminForm(forms.ModelForm[Coupon]):
    class Meta:
        model = Coupon
        fields = ["name", "amount", "stock_shards", "starts_at", "ends_at"]

    def clean_amount(self) -> int:
        amount: int = self.cleaned_data["amount"]
        if self.instance.pk:
            # An early answer on the form; the service checks again under the coupon's lock.
            try:
                self.instance.check_new_amount(amount)
            except AmountBelowClaimed as refusal:
                raise forms.ValidationError(refusal.message) from None
        return amount


@dataclass
class Activity:
    """Claims over time, per second while a sale drains, per minute after, for the chart:
    `slots` units from `start`. `poll_seconds`: how often the page asks again (0: never)."""

    unit: str
    start: datetime.datetime
    slots: int
    buckets: list[tuple[datetime.datetime, int]]
    last_claim: datetime.datetime | None
    poll_seconds: int

    @property
    def most(self) -> int:
        return max((claims for _, claims in self.buckets), default=0)


SECONDS_SHOWN, MINUTES_SHOWN = 120, 240
# While the last claim is this recent, the sale is watched per second, and the page follows
# it every 3 s; a coupon that may still sell is asked about every 15 s.
LIVELY = datetime.timedelta(seconds=SECONDS_SHOWN)
DRAINING_POLL, WAITING_POLL = 3, 15


def sale_activity(coupon: Coupon, now: datetime.datetime) -> Activity:
    claims = ClaimHistory.objects.filter(coupon=coupon)
    last = claims.in_claim_order().values_list("claimed_at", flat=True).last()
    lively = last is not None and now - last < LIVELY
    if lively:
        # The last two minutes, to now.
        unit, slots = "second", SECONDS_SHOWN
        since = now.replace(microsecond=0) - datetime.timedelta(seconds=slots - 1)
    else:
        # The sale's last four hours, to its last claim.
        unit, slots = "minute", MINUTES_SHOWN
        end = (last or now).replace(second=0, microsecond=0)
        since = end - datetime.timedelta(minutes=slots - 1)
    buckets = claims.filter(claimed_at__gte=since).count_per(unit)
    may_sell = sale_state(coupon, now) in {"on sale", "not started"}
    poll = DRAINING_POLL if lively and may_sell else WAITING_POLL if may_sell else 0
    return Activity(unit, since, slots, buckets, last, poll)


@admin.register(Coupon)
class CouponAdmin(admin.ModelAdmin[Coupon]):
    form = CouponAdminForm
    list_display = [
        "name",
        "amount",
        "remaining",
        "claimed",
        "share_sold",
        "sale",
        "window_opens",
        "window_closes",
        "created",
    ]
    list_filter = [SaleFilter, "created_at"]
    search_fields = ["name"]
    readonly_fields = ["remaining", "claimed", "share_sold", "sale", "created", "updated"]
    date_hierarchy = "created_at"
    ordering = ["-created_at", "-id"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Coupon]:
        coupons: QuerySet[Coupon] = super().get_queryset(request).with_stock()  # type: ignore[attr-defined]
        return coupons

    def get_readonly_fields(self, request: HttpRequest, obj: Coupon | None = None) -> list[str]:
        # Shops address a coupon by its name, so it is fixed once created.
        # A coupon being added has no stock or claims to show yet.
        return [*self.readonly_fields, "name"] if obj else []

    @admin.display(description="remaining amount", ordering=STOCK_LEFT)
    def remaining(self, coupon: Coupon) -> int:
        # On the row, or summed over the stock shards.
        return coupon.stock_left

    @admin.display(description="claimed", ordering=F("amount") - STOCK_LEFT)
    def claimed(self, coupon: Coupon) -> str:
        # A bar of the share claimed, and the count, linking to the coupon's claims.
        claims = reverse("admin:coupons_claimhistory_changelist")
        return format_html(
            '<meter min="0" max="{}" value="{}" title="{} of {}"></meter> '
            '<a href="{}?coupon__id__exact={}">{}</a>',
            coupon.amount,
            coupon.claimed_count,
            coupon.claimed_count,
            coupon.amount,
            claims,
            coupon.pk,
            coupon.claimed_count,
        )

    @admin.display(description="sold")
    def share_sold(self, coupon: Coupon) -> str:
        # Rounded down: 9,996 of 10,000 is 99.9 %, not yet 100.0 %.
        return f"{math.floor(1000 * coupon.claimed_count / coupon.amount) / 10:.1f} %"

    @admin.display(description="sale")
    def sale(self, coupon: Coupon) -> str:
        return sale_state(coupon, timezone.now())

    @admin.display(description="opens", ordering="starts_at")
    def window_opens(self, coupon: Coupon) -> str:
        return moment(coupon.starts_at)

    @admin.display(description="closes", ordering="ends_at")
    def window_closes(self, coupon: Coupon) -> str:
        return moment(coupon.ends_at)

    @admin.display(description="created", ordering="created_at")
    def created(self, coupon: Coupon) -> str:
        return moment(coupon.created_at)

    @admin.display(description="last changed")
    def updated(self, coupon: Coupon) -> str:
        return moment(coupon.updated_at)

    def get_urls(self) -> list[URLPattern]:
        activity = path(
            "<int:coupon_id>/activity/",
            self.admin_site.admin_view(self.activity_view),
            name="coupons_coupon_activity",
        )
        return [activity, *super().get_urls()]

    def activity_view(self, request: HttpRequest, coupon_id: int) -> HttpResponse:
        """The coupon's numbers and its chart of claims, which the change page refreshes."""
        coupon = get_object_or_404(self.get_queryset(request), pk=coupon_id)
        if not self.has_view_permission(request, coupon):
            raise PermissionDenied
        return TemplateResponse(
            request, "admin/coupons/coupon/activity.html", self.sale_context(coupon)
        )

    def sale_context(self, coupon: Coupon) -> dict[str, Any]:
        now = timezone.now()
        activity = sale_activity(coupon, now)
        claims = reverse("admin:coupons_claimhistory_changelist")
        return {
            "coupon": coupon,
            "sale": sale_state(coupon, now),
            "share_sold": self.share_sold(coupon),
            "activity": activity,
            "bars": chart_bars(activity),
            "claims_url": f"{claims}?coupon__id__exact={coupon.pk}",
            "export_url": f"{claims}export/?coupon__id__exact={coupon.pk}",
            "activity_url": reverse("admin:coupons_coupon_activity", args=[coupon.pk]),
            "now": moment(now),
            "last_claim": moment(activity.last_claim),
        }

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        coupon = self.get_object(request, object_id)
        sale = self.sale_context(coupon) if coupon else {}
        return super().change_view(request, object_id, form_url, {**(extra_context or {}), **sale})

    def delete_model(self, request: HttpRequest, obj: Coupon) -> None:
        services.delete_coupon(coupon_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Coupon]) -> None:
        for coupon_id in queryset.values_list("pk", flat=True):
            services.delete_coupon(coupon_id=coupon_id)

    def save_model(self, request: HttpRequest, obj: Coupon, form: Any, change: bool) -> None:
        if not change:
            saved = services.create_coupon(
                name=obj.name,
                amount=obj.amount,
                starts_at=obj.starts_at,
                ends_at=obj.ends_at,
                stock_shards=obj.stock_shards,
            )
        else:
            # One transaction (the admin's): the changes land together, under the locks the
            # first one takes.
            saved = services.change_coupon_amount(coupon_id=obj.pk, amount=obj.amount)
            if "stock_shards" in form.changed_data:
                saved = services.change_stock_shards(
                    coupon_id=obj.pk, stock_shards=obj.stock_shards
                )
            if {"starts_at", "ends_at"} & set(form.changed_data):
                saved = services.change_sale_window(
                    coupon_id=obj.pk, starts_at=obj.starts_at, ends_at=obj.ends_at
                )
        obj.pk = saved.pk
        obj.remaining_amount = saved.remaining_amount
        obj.shard_stock = saved.shard_stock
        obj.created_at = saved.created_at
        obj.updated_at = saved.updated_at


@dataclass
class Bar:
    x: float
    width: float
    height: float
    claims: int
    label: str

    @property
    def top(self) -> float:
        return CHART_HEIGHT - self.height


CHART_WIDTH, CHART_HEIGHT = 720, 160


def chart_bars(activity: Activity) -> list[Bar]:
    """The chart's bars, scaled to its size: one per unit of time that saw claims."""
    step = datetime.timedelta(seconds=1 if activity.unit == "second" else 60)
    width = CHART_WIDTH / activity.slots
    return [
        Bar(
            x=(moment_ - activity.start) / step * width,
            width=max(width * 0.9, 1),
            height=CHART_HEIGHT * claims / activity.most,
            claims=claims,
            label=f"{moment(moment_)}: {claims}",
        )
        for moment_, claims in activity.buckets
    ]


class ClaimsCSV:
    """The rows of a claims export, written as they are read: bounded memory for any size.

    UTF-8 with a byte-order mark, so that spreadsheets read it as such; a name or user id
    that a spreadsheet would take for a formula (=, +, -, @) is written with a leading '.
    """

    class _Line:
        def write(self, line: str) -> str:
            return line

    def __init__(self, claims: QuerySet[ClaimHistory]) -> None:
        self.claims = claims

    def __iter__(self) -> Iterator[str]:
        writer = csv.writer(self._Line())
        yield "\ufeff" + writer.writerow(["coupon", "user_id", "claimed_at"])
        rows = self.claims.values_list("coupon__name", "user_id", "claimed_at")
        for coupon_name, user_id, claimed_at in rows.iterator(chunk_size=2_000):
            yield writer.writerow([as_text(coupon_name), as_text(user_id), claimed_at.isoformat()])


def as_text(cell: str) -> str:
    return f"'{cell}" if cell.startswith(("=", "+", "-", "@", "\t", "\r")) else cell


@admin.register(ClaimHistory)
class ClaimHistoryAdmin(admin.ModelAdmin[ClaimHistory]):
    """A read-only ledger: claims are revoked (an action, or delete), never edited."""

    list_display = ["user_id", "coupon_link", "claimed"]
    list_filter = [("coupon", admin.RelatedOnlyFieldListFilter), "claimed_at"]
    list_select_related = ["coupon"]
    search_fields = ["user_id", "coupon__name"]
    # No date_hierarchy: it reads the whole ledger for its dates on every page.
    ordering = ["-id"]
    readonly_fields = ["user_id", "coupon_link", "claimed", "idempotency_key"]
    fields = ["user_id", "coupon_link", "claimed", "idempotency_key"]
    actions = ["revoke"]
    # The ledger can be large: a filtered page does not count the whole table as well.
    show_full_result_count = False

    @admin.display(description="coupon", ordering="coupon__name")
    def coupon_link(self, claim: ClaimHistory) -> str:
        url = reverse("admin:coupons_coupon_change", args=[claim.coupon_id])
        return format_html('<a href="{}">{}</a>', url, claim.coupon.name)

    @admin.display(description="claimed at", ordering="claimed_at")
    def claimed(self, claim: ClaimHistory) -> str:
        return moment(claim.claimed_at)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ClaimHistory | None = None) -> bool:
        return False

    @admin.action(
        description="Revoke the selected claims (their units go back to stock)",
        permissions=["delete"],
    )
    def revoke(self, request: HttpRequest, queryset: QuerySet[ClaimHistory]) -> None:
        claims = list(queryset.select_related("coupon"))
        revoked = [claim for claim in claims if services.revoke_claim(claim_id=claim.pk)]
        if revoked and request.user.pk is not None:  # Admin views need a logged-in user.
            LogEntry.objects.log_actions(
                user_id=request.user.pk,
                queryset=revoked,
                action_flag=DELETION,
                change_message="Revoked: its unit went back to the coupon's stock.",
            )
        if revoked:
            message = f"Revoked {len(revoked)} claims; their units are back in stock."
            self.message_user(request, message, messages.SUCCESS)
        else:
            self.message_user(request, "No claim was revoked: they were gone.", messages.WARNING)

    def delete_model(self, request: HttpRequest, obj: ClaimHistory) -> None:
        services.revoke_claim(claim_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ClaimHistory]) -> None:
        for claim_id in queryset.values_list("pk", flat=True):
            services.revoke_claim(claim_id=claim_id)

    def get_urls(self) -> list[URLPattern]:
        export = path(
            "export/",
            self.admin_site.admin_view(self.export_view),
            name="coupons_claimhistory_export",
        )
        return [export, *super().get_urls()]

    def export_view(self, request: HttpRequest) -> HttpResponseBase:
        """The claims the ledger shows with its current search and filters, as CSV, streamed."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            claims = self.get_changelist_instance(request).get_queryset(request)
        except IncorrectLookupParameters:
            # As the ledger answers a filter it does not know: back to it, with ?e=1.
            return HttpResponseRedirect(f"{reverse('admin:coupons_claimhistory_changelist')}?e=1")
        response = StreamingHttpResponse(ClaimsCSV(claims), content_type="text/csv; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="claims.csv"'
        return response


# The library's own APIKey table is unused: the service's keys carry a scope (ApiKey).
admin.site.unregister(LibraryApiKey)


@admin.register(ApiKey)
class ApiKeyAdmin(APIKeyModelAdmin):
    """API keys: made here or by `create_api_key` (the key is shown once), revoked at once."""

    # The library types its own tuples to the letter; these name more columns.
    list_display = ("name", "scope", "prefix", "created", "expiry_date", "_has_expired", "revoked")  # type: ignore[assignment]
    list_filter = ("scope", "revoked")  # type: ignore[assignment]
    search_fields = ("name", "prefix")
    actions = ["revoke"]

    @admin.action(
        description="Revoke the selected keys (refused from the next request on)",
        permissions=["change"],
    )
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        keys = list(queryset.filter(revoked=False))
        queryset.filter(pk__in=[key.pk for key in keys]).update(revoked=True)
        if keys and request.user.pk is not None:
            LogEntry.objects.log_actions(
                user_id=request.user.pk,
                queryset=keys,
                action_flag=CHANGE,
                change_message="Revoked.",
            )
        self.message_user(request, f"Revoked {len(keys)} keys.", messages.SUCCESS)
