"""The HTTP API: parse, call the service, answer."""

from collections.abc import Iterable, Mapping, Sequence
from http import HTTPStatus
from typing import IO, Any

import django_filters
from django.core.exceptions import ValidationError
from django.db import router
from django.db.models import QuerySet
from django.http import HttpResponse
from django.utils import timezone
from django_filters.rest_framework import DjangoFilterBackend
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ParseError
from rest_framework.negotiation import BaseContentNegotiation, DefaultContentNegotiation
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import BaseParser, JSONParser
from rest_framework.renderers import BaseRenderer
from rest_framework.request import Request
from rest_framework.response import Response

from coupons import schema, services
from coupons.details_document import details_document
from coupons.errors import ClaimNotFound, CouponNotFound
from coupons.models import ClaimHistory, Coupon, CouponQuerySet
from coupons.serializers import (
    ClaimSerializer,
    CouponDetailsSerializer,
    CouponSerializer,
    idempotency_key,
)
from couponsite.routers import reads_from_replica


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


class NewestFirst(CursorPagination):
    """Coupons, newest first, a page at a time."""

    ordering = ("-created_at", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class InClaimOrder(CursorPagination):
    """A coupon's claims in the order they were made, a page at a time."""

    ordering = "id"
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class StrictBooleanFilter(django_filters.TypedChoiceFilter):
    """`true` or `false`; anything else is refused with 400, not ignored."""

    def __init__(self, **kwargs: Any) -> None:
        choices = [("true", "true"), ("false", "false")]
        super().__init__(choices=choices, coerce=lambda value: value == "true", **kwargs)


class CouponFilter(django_filters.FilterSet):
    sold_out = StrictBooleanFilter(
        method="filter_sold_out", label="true: no stock left; false: some stock left"
    )
    live = StrictBooleanFilter(
        method="filter_live", label="true: inside its sale window with stock left"
    )

    class Meta:
        model = Coupon
        fields: list[str] = []

    def filter_sold_out(self, queryset: CouponQuerySet, name: str, value: bool) -> CouponQuerySet:
        return queryset.sold_out(value)

    def filter_live(self, queryset: CouponQuerySet, name: str, value: bool) -> CouponQuerySet:
        now = timezone.now()
        return queryset.live(now) if value else queryset.not_live(now)


class JSONApi:
    """What every view of the API shares: JSON in, JSON out, API keys (coupons/access.py)."""

    content_negotiation_class: type[BaseContentNegotiation] = AlwaysJSON
    parser_classes: Sequence[type[BaseParser]] = [BoundedJSONParser]
    # The actions a client key may call when API_AUTH=required; an admin key calls them all.
    client_actions: frozenset[str] = frozenset()

    def perform_authentication(self, request: Request) -> None:
        """Leave the key unresolved until the permission or a throttle asks for it, as DRF
        suggests: while API_AUTH is off nothing asks, and a request pays nothing for keys."""


@extend_schema_view(list=extend_schema(**schema.LIST))
class CouponViewSet(JSONApi, mixins.ListModelMixin, viewsets.GenericViewSet[Coupon]):
    """Create coupons, list them, claim them, and read their state."""

    queryset = Coupon.objects.with_stock()
    serializer_class = CouponSerializer
    # Creating coupons is an admin's.
    client_actions = frozenset({"list", "retrieve", "claim", "details_of_coupon_named_claim"})
    pagination_class = NewestFirst
    filter_backends = [DjangoFilterBackend]
    filterset_class = CouponFilter
    lookup_field = "name"
    # Any name without "/", percent-encoded in the path.
    lookup_value_regex = "[^/]+"

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        # From the replica, if one is configured: the listing may lag the primary.
        with reads_from_replica():
            return super().list(request, *args, **kwargs)

    @extend_schema(**schema.CREATE)
    def create(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        coupon = services.create_coupon(**serializer.validated_data)
        return Response(CouponDetailsSerializer(coupon).data, HTTPStatus.CREATED)

    @extend_schema(**schema.DETAILS)
    def retrieve(self, request: Request, name: str) -> HttpResponse:
        refuse_impossible_name(name)
        # Written by the database, in CouponDetailsSerializer's shape (details_document.py),
        # from the replica if one is configured: the details may lag the primary.
        with reads_from_replica():
            document = details_document(name, using=router.db_for_read(Coupon))
        if document is None:
            raise CouponNotFound()
        return HttpResponse(document, content_type="application/json")

    @extend_schema(**schema.CLAIM)
    @action(detail=False, methods=["post"], serializer_class=ClaimSerializer)
    def claim(self, request: Request) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        claim = services.claim_coupon_idempotently(
            coupon_name=serializer.validated_data["coupon"]["name"],
            user_id=serializer.validated_data["user_id"],
            idempotency_key=idempotency_key(request.headers.get("Idempotency-Key")),
        )
        replayed = {"Idempotent-Replayed": "true"} if claim.replayed else None
        return Response(self.get_serializer(claim).data, HTTPStatus.CREATED, headers=replayed)

    @extend_schema(**schema.DETAILS_OF_CLAIM)
    @claim.mapping.get
    def details_of_coupon_named_claim(self, request: Request) -> HttpResponse:
        # The claim route shadows GET /api/coupons/claim; a coupon may be named "claim".
        return self.retrieve(request, name="claim")


@extend_schema_view(
    list=extend_schema(**schema.CLAIMS),
    retrieve=extend_schema(**schema.CLAIM_OF_USER),
    destroy=extend_schema(**schema.REVOKE),
)
class CouponClaimViewSet(
    JSONApi,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.DestroyModelMixin,
    viewsets.GenericViewSet[ClaimHistory],
):
    """A coupon's claims: listed in claim order (for coupons too big for claimed_by), one
    user's claim looked up (what a checkout asks before applying a discount), or revoked."""

    serializer_class = ClaimSerializer
    pagination_class = InClaimOrder
    # A checkout may look one claim up; listing a coupon's claims and revoking are operators'.
    client_actions = frozenset({"retrieve"})
    lookup_field = "user_id"
    # A user id may hold "/", percent-encoded in the path: the id runs to the path's end,
    # a trailing "/" included (this route tolerates none of its own).
    lookup_value_regex = ".+"

    def get_queryset(self) -> "QuerySet[ClaimHistory]":
        claims = ClaimHistory.objects.filter(coupon=coupon_named(self.kwargs["name"]))
        return claims.in_claim_order().select_related("coupon")

    def get_object(self) -> ClaimHistory:
        return claim_of(coupon_named(self.kwargs["name"]), self.kwargs["user_id"])

    def perform_destroy(self, instance: ClaimHistory) -> None:
        # One unit back to the stock, the user free to claim again: the admin's revocation.
        if not services.revoke_claim(claim_id=instance.pk):
            raise ClaimNotFound()  # Revoked by someone else meanwhile.


def refuse_impossible_name(name: str) -> None:
    """Raise CouponNotFound for a name no coupon could have (with a control character, say),
    before it reaches a query."""
    try:
        Coupon._meta.get_field("name").run_validators(name)
    except ValidationError:
        raise CouponNotFound() from None


def coupon_named(name: str) -> Coupon:
    """The coupon of this name, or CouponNotFound."""
    refuse_impossible_name(name)
    coupon = Coupon.objects.filter(name=name).first()
    if coupon is None:
        raise CouponNotFound()
    return coupon


def claim_of(coupon: Coupon, user_id: str) -> ClaimHistory:
    """The user's claim on the coupon, or ClaimNotFound."""
    try:
        ClaimHistory._meta.get_field("user_id").run_validators(user_id)
    except ValidationError:
        raise ClaimNotFound() from None
    claim = coupon.claims.filter(user_id=user_id).first()
    if claim is None:
        raise ClaimNotFound()
    claim.coupon = coupon
    return claim
