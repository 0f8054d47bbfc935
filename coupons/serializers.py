"""The shapes of the API's requests and responses; validation only, no business rules.

Every input rule comes from the model's fields (coupons/models.py); these serializers add
only what JSON needs: strings must be strings, integers integers, and nothing else is taken.
"""

import datetime
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import models
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from rest_framework import serializers
from rest_framework.validators import UniqueValidator

from coupons.models import ClaimHistory, Coupon


class StrictCharField(serializers.CharField):
    """A JSON string, taken exactly as given: no number coerced to text, no whitespace trimmed."""

    default_error_messages = {"invalid": "Must be a string."}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer: no string, float or boolean coerced to a number."""

    default_error_messages = {"invalid": "Must be an integer."}

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


def refuse_unknown_fields(serializer: serializers.Serializer[Any], data: Any) -> None:
    """Refuse any field the serializer does not take: nothing can be set that the API does
    not offer (remaining_amount, say)."""
    if isinstance(data, dict):
        writable = {name for name, field in serializer.fields.items() if not field.read_only}
        unknown = sorted(set(data) - writable, key=str)
        if unknown:
            raise serializers.ValidationError({field: ["Unknown field."] for field in unknown})


class AwareDateTimeField(serializers.DateTimeField):
    """An ISO 8601 date and time that says its time zone: a bare local time is refused."""

    default_error_messages = {"naive": "Must include a time zone, such as Z or +02:00."}

    def to_internal_value(self, value: Any) -> datetime.datetime:
        if not isinstance(value, str):
            self.fail("invalid", format="ISO 8601")
        parsed = parse_datetime(value.strip())
        if parsed is not None and timezone.is_naive(parsed):
            self.fail("naive")
        return super().to_internal_value(value)


class StrictModelSerializer(serializers.ModelSerializer[Any]):
    """A serializer whose fields, validators included, are the model's; it refuses any field
    it does not take, so nothing can be set that the API does not offer."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.PositiveIntegerField: StrictIntegerField,
        models.PositiveSmallIntegerField: StrictIntegerField,
        models.DateTimeField: AwareDateTimeField,
    }

    def build_standard_field(
        self, field_name: str, model_field: Any
    ) -> tuple[type, dict[str, Any]]:
        field_class, field_kwargs = super().build_standard_field(field_name, model_field)
        # A name taken is the service's answer (409 coupon_exists), backed by the database's
        # unique constraint; a look-up here would only race with it.
        field_kwargs["validators"] = [
            validator
            for validator in field_kwargs.get("validators", [])
            if not isinstance(validator, UniqueValidator)
        ]
        return field_class, field_kwargs

    def to_internal_value(self, data: Any) -> Any:
        refuse_unknown_fields(self, data)
        return super().to_internal_value(data)


class CouponSerializer(StrictModelSerializer):
    """A coupon in full, as listings show it; creating one takes its name, amount, sale
    window and stock shards. Read it with Coupon.objects.with_stock()."""

    # The stock left, wherever it is counted (Coupon.stock_left).
    remaining_amount = serializers.IntegerField(source="stock_left", read_only=True)
    claimed_count = serializers.IntegerField(read_only=True)

    class Meta:
        model = Coupon
        fields = [
            "name",
            "amount",
            "remaining_amount",
            "claimed_count",
            "stock_shards",
            "starts_at",
            "ends_at",
            "created_at",
        ]
        read_only_fields = ["created_at"]
        extra_kwargs = {
            "starts_at": {"required": False},
            "ends_at": {"required": False},
            "stock_shards": {"required": False},
        }
        validators: list[Any] = []  # See build_standard_field and validate.

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # The sale window's rule is the model's constraint (ends after it starts), checked by
        # a query: only a window with both ends can break it.
        window = {key: attrs.get(key) for key in ("starts_at", "ends_at")}
        if None in window.values():
            return attrs
        try:
            Coupon(**window).validate_constraints(
                exclude={"amount", "remaining_amount", "stock_shards"}
            )
        except DjangoValidationError as refused:
            raise serializers.ValidationError({"ends_at": refused.messages}) from None
        return attrs


class CouponDetailsSerializer(serializers.ModelSerializer[Coupon]):
    """A coupon's details: exactly the four keys of the contract. GET /api/coupons/{name}
    answers in this shape, written by the database (details_document.py)."""

    remaining_amount = serializers.IntegerField(source="stock_left", read_only=True)
    # A coupon just created has none.
    claimed_by = serializers.ListField(child=serializers.CharField(), read_only=True, default=list)

    class Meta:
        model = Coupon
        fields = ["name", "amount", "remaining_amount", "claimed_by"]
        read_only_fields = fields


class ClaimSerializer(serializers.Serializer[Any]):
    """A claim: a user id and the name of a coupon, under the rules of the model fields they
    name; answered with the time the claim was recorded.

    A plain Serializer whose fields take their rules from the models: a ModelSerializer
    builds its fields anew for every instance, which more than doubled the CPU this costs
    on the hottest request of a flash sale (docs/performance.md).
    """

    # The model fields' validators include their maximum length.
    user_id = StrictCharField(validators=ClaimHistory._meta.get_field("user_id").validators)
    coupon_name = StrictCharField(
        source="coupon.name", validators=Coupon._meta.get_field("name").validators
    )
    claimed_at = serializers.DateTimeField(read_only=True)

    def to_internal_value(self, data: Any) -> Any:
        refuse_unknown_fields(self, data)
        return super().to_internal_value(data)


def idempotency_key(header: str | None) -> str | None:
    """The Idempotency-Key header's value, under the rules of ClaimHistory.idempotency_key;
    None when the header is absent."""
    if header is None:
        return None
    field = StrictCharField(validators=ClaimHistory._meta.get_field("idempotency_key").validators)
    try:
        key: str = field.run_validation(header)
    except serializers.ValidationError as refused:
        raise serializers.ValidationError({"Idempotency-Key": refused.detail}) from None
    return key
