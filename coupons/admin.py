"""The operators' view of coupons and their claims; every change goes through the services."""

from typing import Any

from django import forms
from django.contrib import admin
from django.db.models import F, QuerySet
from django.http import HttpRequest

from coupons import services
from coupons.errors import AmountBelowClaimed
from coupons.models import ClaimHistory, Coupon


class SoldOutFilter(admin.SimpleListFilter):
    title = "stock"
    parameter_name = "stock"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("available", "Available"), ("sold_out", "Sold out")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Coupon]) -> QuerySet[Coupon]:
        if self.value() == "available":
            return queryset.filter(remaining_amount__gt=0)
        if self.value() == "sold_out":
            return queryset.filter(remaining_amount=0)
        return queryset


class CouponAdminForm(forms.ModelForm[Coupon]):
    class Meta:
        model = Coupon
        fields = ["name", "amount", "starts_at", "ends_at"]

    def clean_amount(self) -> int:
        amount: int = self.cleaned_data["amount"]
        if self.instance.pk:
            # An early answer on the form; the service checks again under the coupon's lock.
            try:
                self.instance.check_new_amount(amount)
            except AmountBelowClaimed as refusal:
                raise forms.ValidationError(refusal.message) from None
        return amount


@admin.register(Coupon)
class CouponAdmin(admin.ModelAdmin[Coupon]):
    form = CouponAdminForm
    list_display = [
        "name",
        "amount",
        "remaining_amount",
        "claimed_count",
        "sold_out",
        "starts_at",
        "ends_at",
        "created_at",
    ]
    list_filter = [SoldOutFilter, "created_at"]
    search_fields = ["name"]
    readonly_fields = ["remaining_amount", "claimed_count", "created_at", "updated_at"]
    date_hierarchy = "created_at"
    ordering = ["-created_at", "-id"]

    def get_readonly_fields(self, request: HttpRequest, obj: Coupon | None = None) -> list[str]:
        # Shops address a coupon by its name, so it is fixed once created.
        # A coupon being added has no stock or claims to show yet.
        return [*self.readonly_fields, "name"] if obj else []

    @admin.display(description="claimed", ordering=F("amount") - F("remaining_amount"))
    def claimed_count(self, coupon: Coupon) -> int:
        return coupon.claimed_count

    @admin.display(description="sold out", boolean=True, ordering="remaining_amount")
    def sold_out(self, coupon: Coupon) -> bool:
        return coupon.is_sold_out

    def delete_model(self, request: HttpRequest, obj: Coupon) -> None:
        services.delete_coupon(coupon_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Coupon]) -> None:
        for coupon_id in queryset.values_list("pk", flat=True):
            services.delete_coupon(coupon_id=coupon_id)

    def save_model(self, request: HttpRequest, obj: Coupon, form: Any, change: bool) -> None:
        if not change:
            saved = services.create_coupon(
                name=obj.name, amount=obj.amount, starts_at=obj.starts_at, ends_at=obj.ends_at
            )
        else:
            saved = services.change_coupon_amount(coupon_id=obj.pk, amount=obj.amount)
            if {"starts_at", "ends_at"} & set(form.changed_data):
                saved = services.change_sale_window(
                    coupon_id=obj.pk, starts_at=obj.starts_at, ends_at=obj.ends_at
                )
        obj.pk = saved.pk
        obj.remaining_amount = saved.remaining_amount
        obj.created_at = saved.created_at
        obj.updated_at = saved.updated_at


@admin.register(ClaimHistory)
class ClaimHistoryAdmin(admin.ModelAdmin[ClaimHistory]):
    """A read-only ledger; deleting a claim revokes it and returns its unit to the stock."""

    list_display = ["user_id", "coupon", "claimed_at"]
    list_filter = [("coupon", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["coupon"]
    search_fields = ["user_id", "coupon__name"]
    ordering = ["-id"]
    # The ledger can be large: skip the COUNT(*) of the whole table on every page.
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ClaimHistory | None = None) -> bool:
        return False

    def delete_model(self, request: HttpRequest, obj: ClaimHistory) -> None:
        services.revoke_claim(claim_id=obj.pk)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[ClaimHistory]) -> None:
        for claim_id in queryset.values_list("pk", flat=True):
            services.revoke_claim(claim_id=claim_id)
