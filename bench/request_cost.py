"""The CPU cost of one request, measured in-process: the bench's steady gauge.

Throughput under wrk moves with the shared host by up to 30% between runs; the time one
thread takes to serve a request through Django's WSGI handler (no HTTP, no gunicorn, the
real PostgreSQL) moves far less, so it shows what a change to the claim path buys.

    .venv/bin/python bench/request_cost.py [--requests N] [--api-key]

It creates the bench database (as bench/run.py does), then reports the median of 5
batches of N requests, in microseconds per request, for: a claim answered from the
sold-out memory, a winning claim, and a coupon's details. With --api-key the service runs
with API_AUTH=required and every request carries a client key.
"""

import argparse
import io
import os
import statistics
import sys
import time
from collections.abc import Callable
from itertools import count
from pathlib import Path
from typing import Any

import harness

# The service itself is imported from the repository, beside bench/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def wsgi_call(
    application: Callable[..., Any],
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> str:
    """Serve one request through the WSGI application; return its status line."""
    environ = {
        **(headers or {}),
        "REQUEST_METHOD": method,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
    }
    statuses: list[str] = []
    response = application(environ, lambda status, headers: statuses.append(status))
    b"".join(response)
    response.close()
    return statuses[0]


def microseconds_per_request(request: Callable[[], str], expected: str, requests: int) -> float:
    """Return the median over 5 batches of the time per request, after a warm-up batch."""
    batches = []
    for batch in range(6):
        started = time.perf_counter()
        for _ in range(requests):
            status = request()
        if not status.startswith(expected):
            raise harness.BenchError(f"expected {expected}, got {status}")
        if batch:  # The first batch warms up connections and prepared statements.
            batches.append((time.perf_counter() - started) / requests * 1e6)
    return statistics.median(batches)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="requests per batch")
    parser.add_argument(
        "--api-key", action="store_true", help="API_AUTH=required, each request with a key"
    )
    args = parser.parse_args(argv)

    database_url = harness.bench_database_url()
    with harness.fresh_database(database_url):
        environment = harness.service_env(database_url, port=8080)
        harness.migrate(environment)
        os.environ.update(environment)
        if args.api_key:
            os.environ["API_AUTH"] = "required"
        os.environ["DJANGO_SETTINGS_MODULE"] = "couponsite.settings"
        from couponsite.wsgi import application  # Sets Django up first.

        # isort: split
        from coupons import services
        from coupons.models import ApiKey

        headers = {}
        if args.api_key:
            _, key = ApiKey.objects.create_key(name="bench", scope="client")
            headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
        services.create_coupon(name="SOLD_OUT", amount=1)
        services.create_coupon(name="ENDLESS", amount=2_000_000_000)
        users = count()

        def claim(coupon: str) -> str:
            body = f'{{"user_id": "u{next(users)}", "coupon_name": "{coupon}"}}'.encode()
            return wsgi_call(application, "POST", "/api/coupons/claim", body, headers)

        cases = [
            ("claim on a sold-out coupon", lambda: claim("SOLD_OUT"), "409"),
            ("winning claim", lambda: claim("ENDLESS"), "201"),
            (
                "details of a coupon",
                lambda: wsgi_call(application, "GET", "/api/coupons/SOLD_OUT", b"", headers),
                "200",
            ),
        ]
        print(f"{'request':32} µs per request (median of 5 × {args.requests})")
        for label, request, expected in cases:
            print(f"{label:32} {microseconds_per_request(request, expected, args.requests):8.0f}")
        from django.db import connection

        connection.close()  # Let the bench database be dropped.
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
