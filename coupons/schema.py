"""The OpenAPI description of each endpoint, beyond what drf-spectacular reads from the code:
the answers besides success, with their error codes, and examples. api.py applies them.

Error answers are described from the domain errors themselves (errors.py), so a code or a
status cannot be documented one way and answered another.
"""

from http import HTTPStatus
from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework import serializers

from coupons import errors
from coupons.access import ApiKeyAuthentication
from coupons.serializers import ClaimSerializer, CouponDetailsSerializer, CouponSerializer


class ErrorDetailSerializer(serializers.Serializer[Any]):
    code = serializers.CharField(help_text="What went wrong, for a program: see each answer.")
    message = serializers.CharField(help_text="What went wrong, for a human.")

    def get_fields(self) -> dict[str, serializers.Field[Any, Any, Any, Any]]:
        fields = super().get_fields()
        # Declared here: a class attribute named "fields" would hide Serializer.fields.
        fields["fields"] = serializers.DictField(
            child=serializers.ListField(child=serializers.CharField()),
            required=False,
            help_text='With code "invalid": the problems of each field; of the body as a '
            'whole under "body".',
        )
        return fields


class ErrorSerializer(serializers.Serializer[Any]):
    """Every error the API answers."""

    error = ErrorDetailSerializer()


def refusals(*kinds: type[errors.CouponError]) -> dict[int, OpenApiResponse]:
    """The error answers of these domain errors, by status, each code with its message."""
    by_status: dict[int, list[type[errors.CouponError]]] = {}
    for kind in kinds:
        by_status.setdefault(kind.status, []).append(kind)
    return {
        status: OpenApiResponse(
            ErrorSerializer,
            description="\n".join(f"- `{kind.code}`: {kind.message}" for kind in same),
            examples=[
                OpenApiExample(
                    kind.code,
                    {"error": {"code": kind.code, "message": kind.message}},
                    status_codes=[status],
                    response_only=True,
                )
                for kind in same
            ],
        )
        for status, same in by_status.items()
    }


def paths_without_trailing_slash(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """drf-spectacular's preprocessing hook: the contract's paths end without "/" (the
    router tolerates one; its pattern would otherwise be documented with it)."""
    return [(path.rstrip("/"), pattern, method, view) for path, pattern, method, view in endpoints]


def error(status: HTTPStatus, description: str) -> dict[int, OpenApiResponse]:
    return {status: OpenApiResponse(ErrorSerializer, description=description)}


# What any request with a body can be answered, before any rule of the product.
BODY_REFUSALS = {
    **error(
        HTTPStatus.BAD_REQUEST,
        "`invalid`: a field is missing, of the wrong type, out of range or unknown (`fields` "
        "says which and why); `invalid_json`: the body is not JSON.",
    ),
    **error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "`payload_too_large`: the body is too large."),
    **error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "`unsupported_media_type`: not application/json."),
}
UNAVAILABLE = error(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "`service_unavailable`: the database is unreachable; nothing was half-written. Retry "
    "after the Retry-After header's seconds.",
)

NAME = OpenApiParameter(
    "name",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="The coupon's name, percent-encoded.",
)
USER_ID = OpenApiParameter(
    "user_id",
    OpenApiTypes.STR,
    OpenApiParameter.PATH,
    description="The user's id, percent-encoded (`/` as `%2F`); it runs to the path's end.",
)

CREATE: dict[str, Any] = {
    "summary": "Create a coupon",
    "description": "Its whole stock is available at once, or from `starts_at`. Answers with "
    "the coupon's details.",
    "request": CouponSerializer,
    "responses": {
        HTTPStatus.CREATED: CouponDetailsSerializer,
        **BODY_REFUSALS,
        **refusals(errors.CouponExists),
        **UNAVAILABLE,
    },
    "examples": [
        OpenApiExample("A coupon", {"name": "PROMO_SUPER", "amount": 100}, request_only=True),
        OpenApiExample(
            "A coupon with a sale window",
            {
                "name": "BLACK_FRIDAY",
                "amount": 500,
                "starts_at": "2030-11-29T09:00:00+01:00",
                "ends_at": "2030-11-29T21:00:00+01:00",
            },
            request_only=True,
        ),
    ],
}

LIST: dict[str, Any] = {
    "summary": "List coupons",
    "description": "Newest first, in pages: follow `next`, a cursor.",
    "responses": {
        HTTPStatus.OK: CouponSerializer(many=True),
        **error(HTTPStatus.BAD_REQUEST, "`invalid`: a filter's value is not `true` or `false`."),
        **UNAVAILABLE,
    },
}

DETAILS: dict[str, Any] = {
    "summary": "A coupon's details",
    "description": "One consistent snapshot: `remaining_amount == amount - len(claimed_by)`; "
    "`claimed_by` lists the claimants once each, in claim order.",
    "parameters": [NAME],
    "responses": {
        HTTPStatus.OK: CouponDetailsSerializer,
        **refusals(errors.CouponNotFound),
        **UNAVAILABLE,
    },
}

DETAILS_OF_CLAIM: dict[str, Any] = {
    **DETAILS,
    "summary": "The details of the coupon named `claim`",
    "parameters": [],
}

CLAIM: dict[str, Any] = {
    "summary": "Claim a coupon for a user",
    "description": "Checked in this order: the coupon exists, its sale window is open, the "
    "user does not hold it yet, stock is left; then one unit is taken for the user, "
    "atomically. With an `Idempotency-Key`, a retry of a claim already made with it by "
    "this user on this coupon is answered with the original 201 and "
    "`Idempotent-Replayed: true`, without taking stock.",
    "request": ClaimSerializer,
    "parameters": [
        OpenApiParameter(
            "Idempotency-Key",
            OpenApiTypes.STR,
            OpenApiParameter.HEADER,
            description="1 to 255 visible ASCII characters naming this claim request, so "
            "that it is safe to retry.",
        )
    ],
    "responses": {
        HTTPStatus.CREATED: OpenApiResponse(
            ClaimSerializer,
            description="The claim. A retried one carries `Idempotent-Replayed: true`.",
        ),
        **BODY_REFUSALS,
        **refusals(
            errors.CouponNotFound,
            errors.SaleNotStarted,
            errors.SaleEnded,
            errors.AlreadyClaimed,
            errors.OutOfStock,
            errors.IdempotencyKeyReused,
        ),
        **UNAVAILABLE,
    },
    "examples": [
        OpenApiExample(
            "A claim",
            {"user_id": "user_12345", "coupon_name": "PROMO_SUPER"},
            request_only=True,
        )
    ],
}

CLAIMS: dict[str, Any] = {
    "summary": "A coupon's claims",
    "description": "In claim order, in pages: follow `next`, a cursor. For coupons too big "
    "for `claimed_by`.",
    "parameters": [NAME],
    "responses": {
        HTTPStatus.OK: ClaimSerializer(many=True),
        **refusals(errors.CouponNotFound),
        **UNAVAILABLE,
    },
}

CLAIM_OF_USER: dict[str, Any] = {
    "summary": "A user's claim on a coupon",
    "description": "What a checkout asks before it applies a discount.",
    "parameters": [NAME, USER_ID],
    "responses": {
        HTTPStatus.OK: ClaimSerializer,
        **refusals(errors.CouponNotFound, errors.ClaimNotFound),
        **UNAVAILABLE,
    },
}

REVOKE: dict[str, Any] = {
    "summary": "Revoke a user's claim",
    "description": "In one transaction under the coupon's lock: the claim is deleted, its "
    "unit returns to the stock, and the user may claim again.",
    "parameters": [NAME, USER_ID],
    "responses": {
        HTTPStatus.NO_CONTENT: OpenApiResponse(description="Revoked."),
        **refusals(errors.CouponNotFound, errors.ClaimNotFound),
        **UNAVAILABLE,
    },
}


class ApiKeyScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """Describes the API keys (coupons/access.py) in the schema."""

    target_class = ApiKeyAuthentication
    name = "apiKey"

    def get_security_definition(self, auto_schema: AutoSchema) -> dict[str, Any]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": (
                "Needed when the service runs with API_AUTH=required: `Authorization: Bearer "
                "<key>`, a key made by `manage.py create_api_key`. A client key claims and "
                "reads; an admin key may also create coupons, list a coupon's claims and "
                "revoke claims. Missing or unknown: 401 (`not_authenticated`, "
                "`authentication_failed`); the wrong scope: 403 (`permission_denied`)."
            ),
        }
