"""URL routes: the API under /api/, the operators' admin under /admin/."""

from django.contrib import admin
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from coupons.api import CouponClaimViewSet, CouponViewSet
from couponsite import observability

router = SimpleRouter()
# Every API path answers with or without a trailing slash (no redirect for a POST to lose).
router.trailing_slash = "/?"
router.register("api/coupons", CouponViewSet, basename="coupon")
router.register(
    f"api/coupons/(?P<name>{CouponViewSet.lookup_value_regex})/claims",
    CouponClaimViewSet,
    basename="coupon-claim",
)

urlpatterns = [
    path("api/schema", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
    *router.urls,
    path("admin/", admin.site.urls),
    path("metrics", observability.metrics, name="metrics"),
]

handler400 = "coupons.errors.bad_request"
handler403 = "coupons.errors.permission_denied"
handler404 = "coupons.errors.page_not_found"
handler500 = "coupons.errors.server_error"
