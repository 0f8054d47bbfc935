"""The OpenAPI description of each endpoint, beyond what drf-spectacular reads from the code:
the answers besides success, with their error codes and examples, the headers every answer
carries, and the input rules it cannot read right. api.py applies them.

Error answers are described from the domain errors themselves (errors.py), so a code or a
status cannot be documented one way and answered another; the few that DRF or Django give
are described beside them. test_fuzzing.py holds a live server to all of it.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.validators import RegexValidator
from drf_spectacular.extensions import (
    OpenApiAuthenticationExtension,
    OpenApiSerializerExtension,
    OpenApiSerializerFieldExtension,
)
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import Direction, OpenApiExample, OpenApiParameter, OpenApiResponse
from rest_framework import serializers
from rest_framework.pagination import CursorPagination

from coupons import errors
from coupons.access import ApiKeyAuthentication
from coupons.models import ClaimHistory, Coupon, visible
from coupons.serializers import ClaimSerializer, CouponDetailsSerializer, CouponSerializer


def ecma_pattern(pattern: str) -> str:
    """A Python regex as OpenAPI's patterns (ECMA 262) spell it, as drf-spectacular does."""
    return pattern.replace(r"\x", r"\u00").replace(r"\A", "^").replace(r"\Z", "$")


def regex_source(validator: RegexValidator) -> str:
    """The validator's regular expression, as written."""
    regex = validator.regex
    return regex if isinstance(regex, str) else regex.pattern


def refused_characters(validator: RegexValidator) -> str:
    """The characters a validator refuses, as the inside of a character class."""
    pattern = ecma_pattern(regex_source(validator))
    if pattern.startswith("[") and pattern.endswith("]") and not pattern.startswith("[^"):
        return pattern[1:-1]
    if len(pattern) == 1:
        return f"\\{pattern}" if pattern in "\\]^-" else pattern
    raise ImproperlyConfigured(f"No pattern describes the validator of {pattern!r}.")


def text_pattern(validators: Iterable[object]) -> str | None:
    """One pattern for a text field's regex validators, or None if it has none.

    drf-spectacular writes only a field's first RegexValidator, and as a pattern to match
    even when the validator refuses what matches (no control characters, say): clients and
    fuzzers would take the very names the API refuses for the valid ones.
    """
    regexes = [validator for validator in validators if isinstance(validator, RegexValidator)]
    if not regexes:
        return None
    refused = "".join(refused_characters(regex) for regex in regexes if regex.inverse_match)
    required = [regex for regex in regexes if not regex.inverse_match]
    if not refused and len(required) == 1:
        return ecma_pattern(regex_source(required[0]))
    if any(regex != visible for regex in required):
        raise ImproperlyConfigured(f"No pattern describes the validators {regexes!r}.")
    anything = f"[^{refused}]*"
    if required:
        return f"^{anything}[^\\s{refused}]{anything}$"
    return f"^{anything}$"


class TextFieldRules(OpenApiSerializerFieldExtension):  # type: ignore[no-untyped-call]
    """Names and ids described with every input rule of their model field (text_pattern)."""

    target_class = "coupons.serializers.StrictCharField"
    match_subclasses = True

    def map_serializer_field(self, auto_schema: AutoSchema, direction: Direction) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer_field(  # type: ignore[no-untyped-call]
            self.target, direction, bypass_extensions=True
        )
        pattern = text_pattern(self.target.validators)
        if pattern is not None:
            schema["pattern"] = pattern
        return schema


class ClosedRequestBody(OpenApiSerializerExtension):  # type: ignore[no-untyped-call]
    """A request body with no property beyond its fields: the serializer refuses any other
    (serializers.refuse_unknown_fields)."""

    target_class = "coupons.serializers.StrictModelSerializer"
    match_subclasses = True

    def map_serializer(self, auto_schema: AutoSchema, direction: Direction) -> dict[str, Any]:
        schema: dict[str, Any] = auto_schema._map_serializer(  # type: ignore[no-untyped-call]
            self.target, direction, bypass_extensions=True
        )
        if direction == "request":
            schema["additionalProperties"] = False
        return schema


class ClosedClaimBody(ClosedRequestBody):  # type: ignore[no-untyped-call]
    """The claim's body, likewise (a plain Serializer, for speed)."""

    target_class = "coupons.serializers.ClaimSerializer"


def text_schema(model_field: Any) -> dict[str, Any]:
    """The schema of a path or header parameter under a model field's input rules."""
    schema: dict[str, Any] = {"type": "string", "minLength": 1, "maxLength": model_field.max_length}
    pattern = text_pattern(model_field.validators)
    if pattern is not None:
        schema["pattern"] = pattern
    return schema


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


@dataclass(frozen=True)
class Refusal:
    """An error answered by DRF or Django rather than by a domain error, in the same JSON."""

    status: HTTPStatus
    code: str
    when: str  # For the description.
    message: str  # As answered, for the example.
    fields: dict[str, list[str]] | None = None

    def body(self) -> dict[str, Any]:
        extra = {} if self.fields is None else {"fields": self.fields}
        return errors.error_body(self.code, self.message, **extra)


def refusals(*kinds: type[errors.CouponError] | Refusal) -> dict[int, OpenApiResponse]:
    """The error answers of these refusals, by status, each code with its meaning and an
    example."""
    by_status: dict[int, list[Refusal]] = {}
    for kind in kinds:
        refusal = (
            kind
            if isinstance(kind, Refusal)
            else Refusal(kind.status, kind.code, when=kind.message, message=kind.message)
        )
        by_status.setdefault(refusal.status, []).append(refusal)
    return {
        status: OpenApiResponse(
            ErrorSerializer,
            description="\n".join(f"- `{refusal.code}`: {refusal.when}" for refusal in same),
            examples=[
                OpenApiExample(
                    refusal.code, refusal.body(), status_codes=[status], response_only=True
                )
                for refusal in same
            ],
        )
        for status, same in by_status.items()
    }


def paths_without_trailing_slash(endpoints: list[Any], **kwargs: Any) -> list[Any]:
    """drf-spectacular's preprocessing hook: the contract's paths end without "/" (the
    router tolerates one; its pattern would otherwise be documented with it)."""
    return [(path.rstrip("/"), pattern, method, view) for path, pattern, method, view in endpoints]


INVALID = Refusal(
    HTTPStatus.BAD_REQUEST,
    "invalid",
    when="A field is missing, of the wrong type, out of range or unknown; `fields` says "
    "which and why, the problems of the body as a whole under `body`.",
    message="The request is not valid.",
    fields={"amount": ["Must be an integer."]},
)
INVALID_JSON = Refusal(
    HTTPStatus.BAD_REQUEST,
    "invalid_json",
    when="The body is not JSON.",
    message="JSON parse error - Expecting value: line 1 column 1 (char 0)",
)
PAYLOAD_TOO_LARGE = Refusal(
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    "payload_too_large",
    when="The body is over `MAX_BODY_BYTES`.",
    message=errors.PAYLOAD_TOO_LARGE["error"]["message"],
)
UNSUPPORTED_MEDIA_TYPE = Refusal(
    HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    "unsupported_media_type",
    when="The body is not application/json.",
    message='Unsupported media type "text/plain" in request.',
)
INVALID_FILTER = Refusal(
    HTTPStatus.BAD_REQUEST,
    "invalid",
    when="A filter's value is not `true` or `false`; `fields` names it.",
    message="The request is not valid.",
    fields={"sold_out": ["Select a valid choice. yes is not one of the available choices."]},
)
INVALID_CURSOR = Refusal(
    HTTPStatus.NOT_FOUND,
    "not_found",
    when="The `cursor` is not one this listing gave.",
    message=str(CursorPagination.invalid_cursor_message),
)
SERVICE_UNAVAILABLE = Refusal(
    HTTPStatus.SERVICE_UNAVAILABLE,
    "service_unavailable",
    when="The database is unreachable; nothing was half-written. Retry after the "
    "`Retry-After` header's seconds.",
    message="The database is unavailable; retry shortly.",
)

NOT_AUTHENTICATED = Refusal(
    HTTPStatus.UNAUTHORIZED,
    "not_authenticated",
    when="With API_AUTH=required: no `Authorization: Bearer <key>`. Sent with "
    "`WWW-Authenticate: Bearer`.",
    message="Authentication credentials were not provided.",
)
AUTHENTICATION_FAILED = Refusal(
    HTTPStatus.UNAUTHORIZED,
    "authentication_failed",
    when="With API_AUTH=required: the key is unknown, revoked, expired or malformed.",
    message="The API key is unknown or revoked.",
)
PERMISSION_DENIED = Refusal(
    HTTPStatus.FORBIDDEN,
    "permission_denied",
    when="With API_AUTH=required: a client key; this call needs an admin key.",
    message="This API key's scope does not allow this call.",
)
THROTTLED = Refusal(
    HTTPStatus.TOO_MANY_REQUESTS,
    "throttled",
    when="Over a rate limit (RATE_LIMIT_CLIENT, or RATE_LIMIT_SHOPPER for one user's claims "
    "on one coupon). Retry after the `Retry-After` header's seconds.",
    message="Request was throttled. Expected available in 42 seconds.",
)

# What any request with a body can be answered, before any rule of the product.
BODY_REFUSALS = (INVALID, INVALID_JSON, PAYLOAD_TOO_LARGE, UNSUPPORTED_MEDIA_TYPE)
# What any call can be answered when keys are required or rate limits set.
ACCESS_REFUSALS = (NOT_AUTHENTICATED, AUTHENTICATION_FAILED, THROTTLED)
# And the calls only an admin key may make.
ADMIN_REFUSALS = (*ACCESS_REFUSALS, PERMISSION_DENIED)

# Headers of every answer, documented on every operation.
REQUEST_ID = OpenApiParameter(
    "X-Request-ID",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="An id for this request, echoed in the answer and its log line if it is 1 "
    "to 128 visible ASCII characters; otherwise the service makes one.",
)
ANSWERED_REQUEST_ID = OpenApiParameter(
    "X-Request-ID",
    {"type": "string", "pattern": "^[\\u0021-\\u007e]{1,128}$"},
    OpenApiParameter.HEADER,
    required=True,
    response=True,
    description="The caller's X-Request-ID if it sent a sane one, else a new one; the "
    "request's log line carries it too.",
)
RETRY_AFTER = OpenApiParameter(
    "Retry-After",
    {"type": "integer", "minimum": 0},
    OpenApiParameter.HEADER,
    required=True,
    response=[HTTPStatus.SERVICE_UNAVAILABLE, HTTPStatus.TOO_MANY_REQUESTS],
    description="Seconds to wait before retrying.",
)
WWW_AUTHENTICATE = OpenApiParameter(
    "WWW-Authenticate",
    {"type": "string", "enum": ['Bearer realm="api"']},
    OpenApiParameter.HEADER,
    required=True,
    response=[HTTPStatus.UNAUTHORIZED],
    description="How to authenticate: with an API key, as a bearer token.",
)
EVERY_ANSWER = [REQUEST_ID, ANSWERED_REQUEST_ID, RETRY_AFTER, WWW_AUTHENTICATE]

NAME = OpenApiParameter(
    "name",
    text_schema(Coupon._meta.get_field("name")),
    OpenApiParameter.PATH,
    description="The coupon's name, percent-encoded. No coupon has a name outside these "
    "rules (no control characters, no `/`, not only whitespace): such a name is answered "
    "404.",
    examples=[OpenApiExample("A coupon", value="PROMO_SUPER")],
)
USER_ID = OpenApiParameter(
    "user_id",
    text_schema(ClaimHistory._meta.get_field("user_id")),
    OpenApiParameter.PATH,
    description="The user's id, percent-encoded (`/` as `%2F`); it runs to the path's end.",
    examples=[OpenApiExample("A user", value="user_12345")],
)
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    text_schema(ClaimHistory._meta.get_field("idempotency_key")),
    OpenApiParameter.HEADER,
    description="1 to 255 visible ASCII characters naming this claim request, so that it is "
    "safe to retry.",
)
IDEMPOTENT_REPLAYED = OpenApiParameter(
    "Idempotent-Replayed",
    {"type": "string", "enum": ["true"]},
    OpenApiParameter.HEADER,
    response=[HTTPStatus.CREATED],
    description="Present on the answer to a retry: the original claim, no stock taken.",
)

# django-filter's choices are documented as a boolean whose values are strings, which no
# value could be. They are these strings; an empty one filters nothing, as in an HTML form.
SOLD_OUT = OpenApiParameter(
    "sold_out",
    OpenApiTypes.STR,
    OpenApiParameter.QUERY,
    enum=["true", "false", ""],
    description="`true`: coupons with no stock left; `false`: with some; empty: all. Any "
    "other value is refused with 400.",
)
LIVE = OpenApiParameter(
    "live",
    OpenApiTypes.STR,
    OpenApiParameter.QUERY,
    enum=["true", "false", ""],
    description="`true`: coupons inside their sale window with stock left; `false`: the "
    "others; empty: all. Any other value is refused with 400.",
)
# DRF's pagination takes any page_size: one it cannot use gives the default page.
PAGE_SIZE = OpenApiParameter(
    "page_size",
    OpenApiTypes.STR,
    OpenApiParameter.QUERY,
    description="Results per page, up to 1000 (more gives 1000); anything but a positive "
    "integer gives the default, 100.",
)

CREATE: dict[str, Any] = {
    "summary": "Create a coupon",
    "description": "Its whole stock is available at once, or from `starts_at`. Answers with "
    "the coupon's details.",
    "request": CouponSerializer,
    "parameters": EVERY_ANSWER,
    "responses": {
        HTTPStatus.CREATED: CouponDetailsSerializer,
        **refusals(*BODY_REFUSALS, *ADMIN_REFUSALS, errors.CouponExists, SERVICE_UNAVAILABLE),
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
        OpenApiExample(
            "A hot coupon, its stock split over 16 rows",
            {"name": "FLASH_5000", "amount": 5000, "stock_shards": 16},
            request_only=True,
        ),
    ],
}

LIST: dict[str, Any] = {
    "summary": "List coupons",
    "description": "Newest first, in pages: follow `next`, a cursor.",
    "parameters": [SOLD_OUT, LIVE, PAGE_SIZE, *EVERY_ANSWER],
    "responses": {
        HTTPStatus.OK: CouponSerializer(many=True),
        **refusals(INVALID_FILTER, INVALID_CURSOR, *ACCESS_REFUSALS, SERVICE_UNAVAILABLE),
    },
}

DETAILS: dict[str, Any] = {
    "summary": "A coupon's details",
    "description": "One consistent snapshot: `remaining_amount == amount - len(claimed_by)`; "
    "`claimed_by` lists the claimants once each, in claim order.",
    "parameters": [NAME, *EVERY_ANSWER],
    "responses": {
        HTTPStatus.OK: CouponDetailsSerializer,
        **refusals(errors.CouponNotFound, *ACCESS_REFUSALS, SERVICE_UNAVAILABLE),
    },
}

DETAILS_OF_CLAIM: dict[str, Any] = {
    **DETAILS,
    "summary": "The details of the coupon named `claim`",
    "parameters": EVERY_ANSWER,
}

CLAIM: dict[str, Any] = {
    "summary": "Claim a coupon for a user",
    "description": "Checked in this order: the coupon exists, its sale window is open, the "
    "user does not hold it yet, stock is left; then one unit is taken for the user, "
    "atomically. With an `Idempotency-Key`, a retry of a claim already made with it by "
    "this user on this coupon is answered with the original 201 and "
    "`Idempotent-Replayed: true`, without taking stock.",
    "request": ClaimSerializer,
    "parameters": [IDEMPOTENCY_KEY, IDEMPOTENT_REPLAYED, *EVERY_ANSWER],
    "responses": {
        HTTPStatus.CREATED: OpenApiResponse(
            ClaimSerializer,
            description="The claim. A retried one carries `Idempotent-Replayed: true`.",
        ),
        **refusals(
            *BODY_REFUSALS,
            *ACCESS_REFUSALS,
            errors.CouponNotFound,
            errors.SaleNotStarted,
            errors.SaleEnded,
            errors.AlreadyClaimed,
            errors.OutOfStock,
            errors.IdempotencyKeyReused,
            SERVICE_UNAVAILABLE,
        ),
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
    "parameters": [NAME, PAGE_SIZE, *EVERY_ANSWER],
    "responses": {
        HTTPStatus.OK: ClaimSerializer(many=True),
        **refusals(errors.CouponNotFound, INVALID_CURSOR, *ADMIN_REFUSALS, SERVICE_UNAVAILABLE),
    },
}

CLAIM_OF_USER: dict[str, Any] = {
    "summary": "A user's claim on a coupon",
    "description": "What a checkout asks before it applies a discount.",
    "parameters": [NAME, USER_ID, *EVERY_ANSWER],
    "responses": {
        HTTPStatus.OK: ClaimSerializer,
        **refusals(
            errors.CouponNotFound, errors.ClaimNotFound, *ACCESS_REFUSALS, SERVICE_UNAVAILABLE
        ),
    },
}

REVOKE: dict[str, Any] = {
    "summary": "Revoke a user's claim",
    "description": "In one transaction under the coupon's lock: the claim is deleted, its "
    "unit returns to the stock, and the user may claim again.",
    "parameters": [NAME, USER_ID, *EVERY_ANSWER],
    "responses": {
        HTTPStatus.NO_CONTENT: OpenApiResponse(description="Revoked."),
        **refusals(
            errors.CouponNotFound, errors.ClaimNotFound, *ADMIN_REFUSALS, SERVICE_UNAVAILABLE
        ),
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


class CouponApiSchema(AutoSchema):
    """drf-spectacular's schema, saying what the running service asks: while API_AUTH is off a
    key is optional (no security requirement, or the bearer key)."""

    def get_auth(self) -> list[dict[str, list[Any]]]:
        auth: list[dict[str, list[Any]]] = super().get_auth()
        return auth if settings.API_AUTH_REQUIRED else [*auth, {}]
