"""The HTTP API: parse, call the service, answer."""

from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import IO, Any

from django.core.exceptions import ValidationError
from django.http import HttpResponse
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ParseError
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from coupons import services
from coupons.details_document import details_document
from coupons.errors import CouponNotFound
from coupons.models import Coupon
from coupons.serializers import ClaimSerializer, CouponSerializer


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


class CouponViewSet(viewsets.GenericViewSet[Coupon]):
    """Create coupons, claim them, and read their state."""

    queryset = Coupon.objects.all()
    serializer_class = CouponSerializer
    lookup_field = "name"
    # Any name without "/", percent-encoded in the path.
    lookup_value_regex = "[^/]+"
    content_negotiation_class = AlwaysJSON
    parser_classes = [BoundedJSONParser]

    def perform_authentication(self, request: Request) -> None:
        """Leave `request.user` unresolved, as DRF suggests where it is not needed: the API
        authenticates nobody (settings.REST_FRAMEWORK)."""

    def create(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        coupon = services.create_coupon(**serializer.validated_data)
        return Response(self.get_serializer(coupon).data, HTTPStatus.CREATED)

    def retrieve(self, request: Request, name: str) -> HttpResponse:
        try:
            # A name no coupon could have (with a control character, say) is not looked up.
            Coupon._meta.get_field("name").run_validators(name)
        except ValidationError:
            raise CouponNotFound() from None
        # Written by the database, in CouponSerializer's shape (details_document.py).
        document = details_document(name)
        if document is None:
            raise CouponNotFound()
        return HttpResponse(document, content_type="application/json")

    @action(detail=False, methods=["post"], serializer_class=ClaimSerializer)
    def claim(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        claim = services.claim_coupon(
            coupon_name=serializer.validated_data["coupon"]["name"],
            user_id=serializer.validated_data["user_id"],
        )
        return Response(self.get_serializer(claim).data, HTTPStatus.CREATED)

    @claim.mapping.get
    def details_of_coupon_named_claim(self, request: Request) -> HttpResponse:
        # The claim route shadows GET /api/coupons/claim; a coupon may be named "claim".
        return self.retrieve(request, name="claim")
