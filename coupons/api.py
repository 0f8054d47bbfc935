"""The HTTP API: parse, call the service, answer."""

import json
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import IO, Any

from django.conf import settings
from django.http import HttpResponse
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ParseError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.json import strict_constant

from coupons import services
from coupons.errors import CouponNotFound
from coupons.models import ClaimHistory, Coupon
from coupons.serializers import (
    ClaimSerializer,
    CouponCreateSerializer,
    is_plain_claim,
    is_possible_coupon_name,
)


class AlwaysJSON(DefaultContentNegotiation):
    """Answer in JSON whatever the Accept header asks: the API speaks nothing else."""

    def select_renderer(
        self,
        request: Request,
        renderers: Iterable[BaseRenderer],
        format_suffix: str | None = None,
    ) -> tuple[BaseRenderer, str]:
        renderer = next(iter(renderers))
        return renderer, renderer.media_type


class BoundedJSONParser(JSONParser):
    """DRF's JSON parser, answering 400 to a body nested deeper than Python's stack allows."""

    def parse(
        self,
        stream: IO[Any],
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - the body is nested too deeply.") from None


# What BoundedJSONParser accepts, decoded without DRF's streams (claim_fields).
_CLAIM_DECODER = json.JSONDecoder(
    parse_constant=strict_constant if BoundedJSONParser.strict else None
)


def claim_fields(request: Request) -> Any:
    """The claim's fields, from a body checked to hold a plain claim; raises the API's 4xx
    error if it does not.

    A claim is the hottest request of a flash sale. `request.data` negotiates a parser and
    reads the body through streams and a decoder: 33 µs of a 240 µs refusal, where decoding
    the bytes takes a few (docs/performance.md). A body sent as plain `application/json`
    that holds a plain claim is decoded here as BoundedJSONParser would decode it (in the
    default charset, refusing NaN and Infinity); anything else, errors included, goes
    through `request.data`, which answers it as before. Likewise ClaimSerializer, whose
    errors say what is wrong, runs only for bodies that are not plain claims
    (test_serializers.py keeps the two checks equal).
    """
    if request.content_type == "application/json":
        try:
            fields = _CLAIM_DECODER.decode(request.body.decode(settings.DEFAULT_CHARSET))
        except (ValueError, RecursionError):
            pass  # request.data says what is wrong.
        else:
            if is_plain_claim(fields):
                return fields
    fields = request.data
    if not is_plain_claim(fields):
        ClaimSerializer(data=fields).is_valid(raise_exception=True)
    return fields


def claim_answer(coupon_name: str, claim: ClaimHistory) -> HttpResponse:
    """The 201 answer to a claim, written as DRF's JSONRenderer writes it, without DRF.

    Its fields are three strings, which the renderer writes compact, non-ASCII as is, with
    U+2028 and U+2029 escaped, the time as DRF's encoder gives it (ending in "Z" in UTC).
    A Response, its renderer and that encoder took 30 µs of the 370 µs of CPU a winning
    claim costs (docs/performance.md); test_api.py checks that both write the same bytes.
    """
    claimed_at = claim.claimed_at.isoformat()
    if claimed_at.endswith("+00:00"):
        claimed_at = claimed_at[:-6] + "Z"
    body = json.dumps(
        {"coupon_name": coupon_name, "user_id": claim.user_id, "claimed_at": claimed_at},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    body = body.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return HttpResponse(body.encode(), status=HTTPStatus.CREATED, content_type="application/json")


class CouponViewSet(viewsets.ViewSet):
    """Create coupons, claim them, and read their state."""

    lookup_field = "name"
    # Any name without "/", percent-encoded in the path.
    lookup_value_regex = "[^/]+"
    content_negotiation_class = AlwaysJSON
    parser_classes = [BoundedJSONParser]

    def perform_authentication(self, request: Request) -> None:
        """Leave `request.user` unresolved, as DRF suggests where it is not needed: the API
        authenticates nobody (settings.REST_FRAMEWORK), and a claim should not pay for it."""

    def create(self, request: Request) -> Response:
        serializer = CouponCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        coupon = services.create_coupon(**serializer.validated_data)
        return Response(
            {
                "name": coupon.name,
                "amount": coupon.amount,
                "remaining_amount": coupon.remaining_amount,
                "claimed_by": [],
            },
            status=HTTPStatus.CREATED,
        )

    def retrieve(self, request: Request, name: str) -> HttpResponse:
        # The database renders the document; passing it through avoids re-parsing it.
        details = Coupon.objects.details_json(name) if is_possible_coupon_name(name) else None
        if details is None:
            raise CouponNotFound()
        return HttpResponse(details, content_type="application/json")

    @action(detail=False, methods=["post"])
    def claim(self, request: Request) -> HttpResponse:
        fields = claim_fields(request)
        claim = services.claim_coupon(coupon_name=fields["coupon_name"], user_id=fields["user_id"])
        return claim_answer(fields["coupon_name"], claim)

    @claim.mapping.get
    def details_of_coupon_named_claim(self, request: Request) -> HttpResponse:
        # The claim route shadows GET /api/coupons/claim; a coupon may be named "claim".
        return self.retrieve(request, name="claim")
