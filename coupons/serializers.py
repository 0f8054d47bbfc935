"""The shapes of the API's requests and responses; validation only, no business rules."""

import re
from typing import Any

from django.core.validators import RegexValidator
from rest_framework import serializers

MAX_NAME_LENGTH = 255
MAX_AMOUNT = 2_147_483_647

# Unicode control characters (C0, DEL and C1), NUL among them.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What StrictCharField refuses in a string: those, and lone surrogates (DRF's own check).
REFUSED_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

no_control_characters = RegexValidator(
    CONTROL_CHARACTERS, message="Must not contain control characters.", inverse_match=True
)
# A coupon is addressed by its name in a URL path, where "/" cannot stand.
no_slash = RegexValidator("/", message="Must not contain '/'.", inverse_match=True)


def is_valid_identifier(value: object) -> bool:
    """Tell whether a value passes StrictCharField: a string of 1 to 255 plain characters."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_NAME_LENGTH
        and not REFUSED_CHARACTERS.search(value)
    )


def is_possible_coupon_name(name: str) -> bool:
    """Tell whether a string could name a coupon, so one taken from a path needs no query."""
    return is_valid_identifier(name) and "/" not in name


def is_plain_claim(data: object) -> bool:
    """Tell, cheaply, whether a claim body passes ClaimSerializer.

    A claim is the hottest request of a flash sale, and building a serializer costs a
    quarter of a sold-out answer. Well-formed bodies skip it; anything else goes
    through ClaimSerializer, which says what is wrong.
    """
    return (
        type(data) is dict
        and data.keys() == {"user_id", "coupon_name"}
        and is_valid_identifier(data["user_id"])
        and is_valid_identifier(data["coupon_name"])
    )


class StrictCharField(serializers.CharField):
    """A JSON string, taken exactly as given: no number coerced to text, no whitespace trimmed."""

    default_error_messages = {"invalid": "Must be a string."}

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        kwargs.setdefault("min_length", 1)
        kwargs.setdefault("max_length", MAX_NAME_LENGTH)
        super().__init__(**kwargs)
        self.validators.append(no_control_characters)

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


class StrictSerializer(serializers.Serializer[Any]):
    """Refuses fields it does not declare, so nothing can be set that the API does not offer."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({field: ["Unknown field."] for field in unknown})
        return super().to_internal_value(data)


class CouponCreateSerializer(StrictSerializer):
    name = StrictCharField(validators=[no_slash])
    amount = StrictIntegerField(min_value=1, max_value=MAX_AMOUNT)


class ClaimSerializer(StrictSerializer):
    user_id = StrictCharField()
    coupon_name = StrictCharField()
