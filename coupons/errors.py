"""Domain errors, and the one place where every error becomes a JSON response."""

import logging
import math
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import InternalError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse
from rest_framework import exceptions
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import set_rollback

logger = logging.getLogger(__name__)


class CouponError(Exception):
    """A rule of the product refused the request; carries its code and HTTP status."""

    code = "coupon_error"
    status = HTTPStatus.BAD_REQUEST
    message = "The request was refused."

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)
        self.message = message or self.message


class CouponNotFound(CouponError):
    code = "coupon_not_found"
    status = HTTPStatus.NOT_FOUND
    message = "No coupon has this name."


class CouponExists(CouponError):
    code = "coupon_exists"
    status = HTTPStatus.CONFLICT
    message = "A coupon with this name already exists."


class SaleNotStarted(CouponError):
    code = "sale_not_started"
    status = HTTPStatus.CONFLICT
    message = "This coupon's sale has not started yet."


class SaleEnded(CouponError):
    code = "sale_ended"
    status = HTTPStatus.CONFLICT
    message = "This coupon's sale has ended."


class AlreadyClaimed(CouponError):
    code = "already_claimed"
    status = HTTPStatus.CONFLICT
    message = "This user has already claimed this coupon."


class OutOfStock(CouponError):
    code = "out_of_stock"
    status = HTTPStatus.CONFLICT
    message = "This coupon has no stock left."


class ClaimNotFound(CouponError):
    code = "claim_not_found"
    status = HTTPStatus.NOT_FOUND
    message = "This user holds no claim on this coupon."


class IdempotencyKeyReused(CouponError):
    code = "idempotency_key_reused"
    status = HTTPStatus.UNPROCESSABLE_ENTITY
    message = "This Idempotency-Key was used for a claim by another user or on another coupon."


class AmountBelowClaimed(CouponError):
    code = "amount_below_claimed"
    status = HTTPStatus.CONFLICT
    message = "The amount cannot be lower than the number of claims already made."


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """Build the JSON body every error response shares."""
    return {"error": {"code": code, "message": message, **extra}}


# A body over MAX_BODY_BYTES, whether an API view or Django's handler400 meets it.
PAYLOAD_TOO_LARGE = error_body("payload_too_large", "The request body is too large.")


# DRF's own exceptions, by the code we publish for them.
_API_EXCEPTION_CODES: dict[type[exceptions.APIException], str] = {
    exceptions.ParseError: "invalid_json",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotFound: "not_found",
    exceptions.NotAcceptable: "not_acceptable",
}


# PostgreSQL ended the session itself, rolling its transaction back whole: idle too long
# inside a transaction (25P03, DB_IDLE_IN_TRANSACTION_TIMEOUT_MS), or past
# transaction_timeout (25P04). psycopg raises these as InternalError.
SESSION_ENDED_BY_THE_SERVER = {"25P03", "25P04"}


def database_unavailable(exc: Exception) -> bool:
    """Whether the database failed the request in a way a retry may not meet again."""
    return isinstance(exc, OperationalError) or (
        isinstance(exc, InternalError)
        and getattr(exc.__cause__, "sqlstate", None) in SESSION_ENDED_BY_THE_SERVER
    )


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """Render every error raised in an API view as `{"error": {"code", "message", ...}}`."""
    if isinstance(exc, CouponError):
        return Response(error_body(exc.code, exc.message), status=exc.status)
    if isinstance(exc, RequestDataTooBig):
        return Response(PAYLOAD_TOO_LARGE, status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    if database_unavailable(exc):
        # The database is unreachable, restarting, timed out on a lock or ended the session.
        # A claim either committed whole or not at all, so a retry is safe: one that did
        # commit is answered already_claimed.
        logger.error("Database unavailable: %s", exc, exc_info=exc)
        return Response(
            error_body("service_unavailable", "The database is unavailable; retry shortly."),
            status=HTTPStatus.SERVICE_UNAVAILABLE,
            headers={"Retry-After": "1"},
        )
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    if not isinstance(exc, exceptions.APIException):
        return None  # A fault, not the client's: Django logs it and handler500 answers.

    set_rollback()
    if isinstance(exc, exceptions.ValidationError):
        body = error_body("invalid", "The request is not valid.", fields=_field_errors(exc.detail))
    else:
        code = _API_EXCEPTION_CODES.get(type(exc), str(exc.default_code))
        body = error_body(code, str(exc.detail))
    headers = {}
    # As DRF's own handler does: how to authenticate with a 401, when to retry with a 429.
    if auth_header := getattr(exc, "auth_header", None):
        headers["WWW-Authenticate"] = auth_header
    if (wait := getattr(exc, "wait", None)) is not None:
        headers["Retry-After"] = str(max(1, math.ceil(wait)))
    return Response(body, status=exc.status_code, headers=headers)


def _field_errors(detail: Any) -> dict[str, list[str]]:
    """Flatten DRF's validation detail to {field: [messages]}; body-level errors go under "body"."""
    if isinstance(detail, dict):
        return {
            ("body" if field == "non_field_errors" else field): [
                str(message) for message in messages
            ]
            for field, messages in detail.items()
        }
    return {"body": [str(message) for message in detail]}


def json_answer(body: dict[str, Any], status: HTTPStatus) -> HttpResponse:
    """An answer given outside DRF's views, written as DRF's renderer writes the API's."""
    return HttpResponse(JSONRenderer().render(body), status=status, content_type="application/json")


def _json_error_view(status: HTTPStatus, code: str, message: str) -> Callable[..., HttpResponse]:
    def view(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
        if isinstance(exception, RequestDataTooBig):
            return json_answer(PAYLOAD_TOO_LARGE, HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return json_answer(error_body(code, message), status)

    return view


# Django-level handlers, for requests that never reach an API view (unknown paths,
# a disallowed Host header, a crash): JSON too, never an HTML page or a stack trace.
bad_request = _json_error_view(HTTPStatus.BAD_REQUEST, "bad_request", "The request is not valid.")
permission_denied = _json_error_view(HTTPStatus.FORBIDDEN, "forbidden", "Permission denied.")
page_not_found = _json_error_view(HTTPStatus.NOT_FOUND, "not_found", "No such path.")


def server_error(request: HttpRequest) -> HttpResponse:
    """Answer an unexpected fault; the details go to the log, not to the client."""
    return json_answer(
        error_body("internal_error", "The server failed to handle the request."),
        HTTPStatus.INTERNAL_SERVER_ERROR,
    )
