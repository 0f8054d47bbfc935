"""Middleware of this site."""

from typing import Any

from django.http import HttpRequest, HttpResponse, HttpResponseBase


class HeadWithoutBody:
    """Answers HEAD with the headers GET would get, and no body.

    Django's handler leaves the body in, and gunicorn then drops it with a warning in the
    log for every HEAD request: a load balancer checking health with HEAD would fill the
    log. Placed first, this runs after CommonMiddleware has set Content-Length, which
    stays the length of the GET answer, as HTTP wants of HEAD.
    """

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase = self.get_response(request)
        if request.method == "HEAD" and isinstance(response, HttpResponse):
            response.content = b""
        return response
