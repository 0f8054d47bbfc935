"""Middleware of this site."""

from django.contrib.messages.middleware import MessageMiddleware
from django.http import HttpRequest


class AdminMessageMiddleware(MessageMiddleware):
    """Django's MessageMiddleware, skipped for the API, which never shows messages.

    Setting up message storage was 7% of the cost of a claim answered from the sold-out
    memory (docs/performance.md); the admin still gets its messages.
    """

    def process_request(self, request: HttpRequest) -> None:
        if not request.path_info.startswith("/api/"):
            super().process_request(request)
