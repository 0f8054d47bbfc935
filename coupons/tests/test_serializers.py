"""The claim's cheap acceptance check agrees with ClaimSerializer on every body."""

import itertools
from typing import Any

import pytest

from coupons.serializers import ClaimSerializer, is_plain_claim

VALUES: list[Any] = [
    "u",
    "user_12345",
    "x" * 255,
    "x" * 256,
    "",
    " padded ",
    "é" * 255,
    "🎟" * 255,
    "🎟" * 256,
    "券",
    "a/b",
    "nul\x00",
    "\x1f",
    "\x20",
    "\x7e",
    "\x7f",
    "\x80",
    "\x9f",
    "\xa0",
    "line\nbreak",
    "lone \ud800 surrogate",
    "\udfff",
    "\U0010ffff",
    0,
    5,
    1.5,
    True,
    None,
    [],
    ["u"],
    {},
]


def bodies() -> list[Any]:
    pairs = [
        {"user_id": user_id, "coupon_name": coupon_name}
        for user_id, coupon_name in itertools.product(VALUES, VALUES)
    ]
    odd_shapes: list[Any] = [
        {"user_id": "u"},
        {"coupon_name": "P"},
        {"user_id": "u", "coupon_name": "P", "amount": 1},
        {"user_id": "u", "coupon_name": "P", "remaining_amount": 0},
        {},
        [],
        ["u", "P"],
        "u",
        None,
        7,
    ]
    return pairs + odd_shapes


@pytest.mark.parametrize("body", bodies(), ids=repr)
def test_the_cheap_check_accepts_exactly_what_the_serializer_accepts(body: Any) -> None:
    assert is_plain_claim(body) == ClaimSerializer(data=body).is_valid()
