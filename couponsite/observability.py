"""What operators watch: health checks, Prometheus metrics and a log line per request.

Metrics go through prometheus_client. Under gunicorn each worker is a process of its own,
so gunicorn.conf.py points PROMETHEUS_MULTIPROC_DIR at a directory the workers share, and
/metrics adds up what every worker has counted; elsewhere (manage.py, the test client) the
process's own registry is read.
"""

import logging
import os
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from http import HTTPStatus
from typing import Any

from django.core.signals import got_request_exception
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

from coupons.errors import error_body, json_answer

request_log = logging.getLogger("coupons.requests")

REQUESTS = Counter(
    "coupons_http_requests", "HTTP requests answered, by route and status.", ["route", "status"]
)
CLAIMS = Counter(
    "coupons_claims",
    "Claims answered, by outcome: claimed, replayed or the refusal's code.",
    ["outcome"],
)
CLAIM_SECONDS = Histogram(
    "coupons_claim_duration_seconds",
    "Time to answer a claim, from the request reaching Django to its answer.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
DATABASE_ERRORS = Counter(
    "coupons_database_errors", "Requests that met a database error, by its kind.", ["kind"]
)

# An X-Request-ID worth echoing and logging: a caller's id of reasonable size.
_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
# The request being answered, for every log record written meanwhile (RequestIdFilter).
current_request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Puts the id of the request being answered on every log record (settings.LOGGING), so
    that an error's traceback can be matched with its request's line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


class HealthChecks:
    """Answers /healthz and /readyz before anything else runs, the Host header's check
    included: probes reach a server by its address (127.0.0.1 in the image's check, a pod's
    IP in Kubernetes), which ALLOWED_HOSTS rightly does not list. They are neither counted
    nor logged: a probe every few seconds would drown the requests that matter."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        if request.path == "/healthz":
            return healthz(request)
        if request.path == "/readyz":
            return readyz(request)
        return self.get_response(request)


class ObserveRequests:
    """Gives every request an id, and counts and logs it once answered.

    The id is the caller's X-Request-ID if it sends a sane one, else a new one; it is echoed
    in the answer's X-Request-ID. The log line is structured: method, route, status,
    duration, the claim's outcome and the id (settings.LOGGING formats it).
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        given = request.headers.get("X-Request-ID", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        token = current_request_id.set(request_id)
        try:
            response = self.get_response(request)
        finally:
            current_request_id.reset(token)
        seconds = time.perf_counter() - started
        response["X-Request-ID"] = request_id

        match = request.resolver_match
        route = match.view_name if match else "unmatched"
        REQUESTS.labels(route, response.status_code).inc()
        outcome = None
        if route == "coupon-claim" and request.method == "POST":
            outcome = claim_outcome(response)
            CLAIMS.labels(outcome).inc()
            CLAIM_SECONDS.observe(seconds)
        if error_code(response) == "service_unavailable":
            DATABASE_ERRORS.labels("unavailable").inc()
        request_log.info(
            "%s %s %s %.1f ms%s [%s]",
            request.method,
            request.path,
            response.status_code,
            seconds * 1000,
            f" {outcome}" if outcome else "",
            request_id,
            extra={
                "method": request.method,
                "route": route,
                "status": response.status_code,
                "duration_ms": round(seconds * 1000, 2),
                "claim_outcome": outcome,
                "request_id": request_id,
            },
        )
        return response


def error_code(response: HttpResponseBase) -> str | None:
    """The API error's code, when the answer is one (a DRF Response keeps its data)."""
    data = getattr(response, "data", None)
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
        return code if isinstance(code, str) else None
    return None


def claim_outcome(response: HttpResponseBase) -> str:
    if response.status_code == HTTPStatus.CREATED:
        return "replayed" if response.has_header("Idempotent-Replayed") else "claimed"
    return error_code(response) or str(response.status_code)


def _count_unhandled_database_error(sender: Any, request: Any = None, **kwargs: Any) -> None:
    # Faults that end in a 500; those the API answers with 503 are counted as answered.
    error = kwargs.get("exception")
    if isinstance(error, DatabaseError):
        DATABASE_ERRORS.labels(type(error).__name__).inc()


got_request_exception.connect(_count_unhandled_database_error)


def healthz(request: HttpRequest) -> HttpResponse:
    """The process answers. Nothing else is checked: no database."""
    return json_answer({"status": "ok"}, HTTPStatus.OK)


_migrated = False  # Once this process has seen every migration applied, it stays so.


def readyz(request: HttpRequest) -> HttpResponse:
    """Ready for traffic: the database answers and every migration is applied."""
    global _migrated
    try:
        connection.ensure_connection()
        if _migrated:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
            pending = []
        else:
            executor = MigrationExecutor(connection)
            pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
            _migrated = not pending
    except DatabaseError:
        body = error_body("service_unavailable", "The database is unreachable.")
        return json_answer(body, HTTPStatus.SERVICE_UNAVAILABLE)
    if pending:
        message = f"{len(pending)} migrations are not applied yet."
        return json_answer(error_body("not_ready", message), HTTPStatus.SERVICE_UNAVAILABLE)
    return json_answer({"status": "ok"}, HTTPStatus.OK)


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus's text format: every worker's counts added up."""
    registry = REGISTRY
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
