"""Who may call the API, and how often: API keys with scopes, and rate limits.

Both are DRF's own extension points, named in settings.REST_FRAMEWORK: an authentication
class, a permission class and two throttles. With API_AUTH unset or `off` the API stays open,
as the contract describes it; with the rates unset nobody is throttled.
"""

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any, cast

from django.conf import settings
from django.core.checks import CheckMessage, Tags, register
from django.core.checks import Warning as CheckWarning
from django.http import HttpRequest
from redis.exceptions import RedisError
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.permissions import BasePermission
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import BaseThrottle, SimpleRateThrottle

if TYPE_CHECKING:
    from rest_framework.views import APIView

    from coupons.models import ApiKey

logger = logging.getLogger(__name__)

OPEN_API_WARNING = (
    "API_AUTH is off: anyone who can reach the service can create coupons and claim them. "
    "Set API_AUTH=required and give each shop backend a key (manage.py create_api_key)."
)


def api_key_model() -> "type[ApiKey]":
    # Imported on first use, as DRF's own TokenAuthentication does: DRF imports this module
    # while it loads its views, which can happen before the models are ready.
    from coupons.models import ApiKey

    return ApiKey


class ApiKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer <key>` names an ApiKey; nothing is checked while API_AUTH is off.

    The key is looked up on every request, so a revoked key is refused at once by every
    worker of every instance.
    """

    keyword = b"bearer"

    def authenticate(self, request: Request) -> "tuple[None, ApiKey] | None":
        if not settings.API_AUTH_REQUIRED:
            return None
        words = get_authorization_header(request).split()
        if not words or words[0].lower() != self.keyword:
            return None  # The permission then answers 401, with WWW-Authenticate.
        if len(words) != 2:
            raise AuthenticationFailed("Send the key as `Authorization: Bearer <key>`.")
        keys = api_key_model()
        try:
            api_key = cast("ApiKey", keys.objects.get_from_key(words[1].decode("latin-1")))
        except keys.DoesNotExist:
            raise AuthenticationFailed("The API key is unknown or revoked.") from None
        if api_key.has_expired:
            raise AuthenticationFailed("The API key has expired.")
        # No Django user stands behind a key: request.user stays None (UNAUTHENTICATED_USER).
        return None, api_key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'


class ScopeRequired(BasePermission):
    """An admin key may call everything; a client key only the view's `client_actions` (claim
    and read): an action added later is an admin's until it is listed there."""

    message = "This API key's scope does not allow this call."

    def has_permission(self, request: Request, view: "APIView") -> bool:
        if not settings.API_AUTH_REQUIRED:
            return True
        api_key = cast("ApiKey | None", request.auth)
        if api_key is None:
            return False  # No key: DRF answers 401, as no authenticator succeeded.
        if api_key.scope == api_key_model().Scope.ADMIN:
            return True
        return getattr(view, "action", None) in getattr(view, "client_actions", ())


class FixedWindowThrottle(SimpleRateThrottle):
    """DRF's rate throttle, counted with the cache's atomic increment.

    DRF's own keeps each client's recent request times in one cache value that every request
    reads and writes back, so concurrent workers overwrite each other's writes and let more
    through than the rate. Here each window of the rate's period has one counter that every
    worker of every instance increments atomically (Redis INCR); at most the rate passes in
    a window, up to twice the rate across the edge between two windows.
    """

    # After the cache fails, the limits are not counted for this long: a Redis that does not
    # answer would otherwise cost every request its socket timeout.
    cache_rest_seconds = 5.0
    cache_failed_at = float("-inf")
    cache_failure_reported_at = float("-inf")

    def get_rate(self) -> str | None:
        # Read at every request, so that a test's override_settings takes effect.
        rates = cast("dict[str, str | None]", api_settings.DEFAULT_THROTTLE_RATES)
        return rates.get(self.scope or "")

    def allow_request(self, request: Request, view: "APIView") -> bool:
        if self.rate is None:
            return True
        ident = self.get_cache_key(request, view)
        if ident is None:
            return True
        limit, period = self.parse_rate(self.rate)
        assert limit is not None and period is not None
        now = self.timer()
        if now - FixedWindowThrottle.cache_failed_at < self.cache_rest_seconds:
            return True
        window = int(now // period)
        key = f"{ident}:{window}"
        try:
            count = self.count(key, period)
        except (RedisError, OSError) as error:
            # The cache is unreachable: let requests through rather than fail a sale because
            # the limits cannot be counted, try it again after a rest, and say so (at most
            # once a minute).
            FixedWindowThrottle.cache_failed_at = now
            if now - FixedWindowThrottle.cache_failure_reported_at >= 60:
                FixedWindowThrottle.cache_failure_reported_at = now
                logger.warning("Rate limits not applied: the cache failed (%r).", error)
            return True
        self.wait_seconds = (window + 1) * period - now
        return count <= limit

    def count(self, key: str, period: int) -> int:
        """Add one to the window's counter, made if missing; return its new value."""
        self.cache.add(key, 0, timeout=period + 1)
        try:
            return int(self.cache.incr(key))
        except ValueError:  # The counter expired between the two calls.
            self.cache.add(key, 1, timeout=period + 1)
            return 1

    def wait(self) -> float:
        return float(self.wait_seconds)


class ClientRateThrottle(FixedWindowThrottle):
    """Every API request, per API key, else per client address (RATE_LIMIT_CLIENT)."""

    scope = "client"

    def get_cache_key(self, request: Request, view: "APIView") -> str:
        api_key = cast("ApiKey | None", request.auth)
        ident = f"key-{api_key.prefix}" if api_key is not None else self.get_ident(request)
        return self.cache_format % {"scope": self.scope, "ident": ident}


class ShopperRateThrottle(FixedWindowThrottle):
    """Claims per (coupon, user id), so one shopper's script cannot hammer a sale
    (RATE_LIMIT_SHOPPER)."""

    scope = "shopper"

    def get_cache_key(self, request: Request, view: "APIView") -> str | None:
        if getattr(view, "action", None) != "claim":
            return None
        body: Any = request.data
        if not isinstance(body, dict):
            return None  # Not a claim: the serializer answers 400.
        pair = json.dumps([body.get("coupon_name"), body.get("user_id")], default=str)
        ident = hashlib.sha256(pair.encode()).hexdigest()
        return self.cache_format % {"scope": self.scope, "ident": ident}


@register(Tags.security, deploy=True)
def check_api_auth(app_configs: Any, **kwargs: Any) -> list[CheckMessage]:
    """`manage.py check --deploy` warns while the API is open to anyone."""
    if settings.API_AUTH_REQUIRED:
        return []
    return [CheckWarning(OPEN_API_WARNING, id="coupons.W001")]


def client_address(request: HttpRequest) -> str:
    """The client's address, as the rate limits count it (NUM_PROXIES): also the admin's
    login lockout's (AXES_CLIENT_IP_CALLABLE)."""
    return BaseThrottle().get_ident(request)  # type: ignore[arg-type]
