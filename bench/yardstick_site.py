"""The yardstick: a bare Django view, in a project as `startproject` makes it.

Issue 3 gives its reference machine's figure for scale: a bare Django view that parses a
JSON body and answers 409 served about 4,450 requests/s under gunicorn. bench/run.py
serves this view with gunicorn's stock sync worker and drives it as B1 drives claims, so
every result says how fast the host of the moment runs gunicorn and Django themselves, in
the reference's own terms. This module is both the settings and the URLconf: this site's
settings, with the middleware a new project has (the site's own list adds only HEAD
handling and WhiteNoise's static files).
"""

import json

from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from couponsite.settings import *  # noqa: F403

ROOT_URLCONF = "yardstick_site"
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]


@csrf_exempt
def refuse(request: HttpRequest) -> JsonResponse:
    fields = json.loads(request.body)
    return JsonResponse(
        {"error": {"code": "out_of_stock", "message": f"Sold out for {fields['user_id']}."}},
        status=409,
    )


# At the claim's path, where B1's wrk script sends its requests.
urlpatterns = [path("api/coupons/claim", refuse)]
