"""Middleware of this site."""

from typing import Any

from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.http import HttpRequest, HttpResponseBase
from django.middleware.csrf import CsrfViewMiddleware


class SkippedForTheApi:
    """Lets API requests pass a middleware that only the admin needs.

    The API keeps no session, authenticates nobody (it is called by a shop's backend on
    a private network), exempts its views from CSRF checks and shows no messages; yet
    each of these middleware did work on every claim. Without them a sold-out refusal
    takes 14 % less CPU and a winning claim 4 % less (docs/performance.md). The admin
    still gets all four.
    """

    get_response: Any

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path_info.startswith("/api/"):
            response: HttpResponseBase = self.get_response(request)
        else:
            response = super().__call__(request)  # type: ignore[misc]
        return response


class AdminSessionMiddleware(SkippedForTheApi, SessionMiddleware):
    pass


class AdminCsrfViewMiddleware(SkippedForTheApi, CsrfViewMiddleware):
    pass


class AdminAuthenticationMiddleware(SkippedForTheApi, AuthenticationMiddleware):
    pass


class AdminMessageMiddleware(SkippedForTheApi, MessageMiddleware):
    pass
