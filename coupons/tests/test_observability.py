"""What operators watch: health checks, metrics added up across workers, request logs."""

import http.client
import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from coupons.tests import live
from coupons.tests.live import LiveServer


def scrape(server: LiveServer) -> dict[str, float]:
    """The server's /metrics, as {"name{labels}": value}."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    connection.request("GET", "/metrics")
    reply = connection.getresponse()
    assert reply.status == 200
    assert reply.getheader("Content-Type", "").startswith("text/plain")
    samples = {}
    for line in reply.read().decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    connection.close()
    return samples


def grown(before: dict[str, float], after: dict[str, float], sample: str) -> float:
    return after.get(sample, 0.0) - before.get(sample, 0.0)


def test_metrics_add_up_every_workers_claims(postgresql_servers: list[LiveServer]) -> None:
    server = postgresql_servers[0]
    name = f"METRICS_{uuid.uuid4().hex[:8]}"
    server.create_coupon(name, 4)
    before = scrape(server)

    # Ten claims, spread over the server's three workers: four won, six refused.
    for index in range(10):
        server.request("POST", "/api/coupons/claim", {"user_id": f"m{index}", "coupon_name": name})
    after = scrape(server)

    assert grown(before, after, 'coupons_claims_total{outcome="claimed"}') == 4
    assert grown(before, after, 'coupons_claims_total{outcome="out_of_stock"}') == 6
    assert grown(before, after, "coupons_claim_duration_seconds_count") == 10
    requests = 'coupons_http_requests_total{route="coupon-claim",status="409"}'
    assert grown(before, after, requests) == 6


def test_an_unreachable_database_is_not_ready_yet_healthy_and_counted() -> None:
    nothing_listens = f"postgres://postgres@127.0.0.1:{live.free_port()}/coupons"
    environment = live.environment_for(nothing_listens)

    with live.gunicorn(environment, workers=1, ready_status=503) as server:
        healthy = server.request("GET", "/healthz")
        ready = server.request("GET", "/readyz")
        server.request("POST", "/api/coupons/claim", {"user_id": "u", "coupon_name": "P"})
        metrics = scrape(server)

    assert (healthy.status, healthy.body) == (200, {"status": "ok"})
    assert ready.status == 503
    assert ready.body["error"]["code"] == "service_unavailable"
    assert metrics['coupons_database_errors_total{kind="unavailable"}'] >= 1


@pytest.mark.django_db
def test_pending_migrations_are_not_ready(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "couponsite.observability.MigrationExecutor.migration_plan",
        lambda self, targets: [("coupons", "0099_not_applied")],
    )

    response = Client().get("/readyz")

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"


@pytest.mark.django_db
def test_a_migrated_database_is_ready() -> None:
    response = Client().get("/readyz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.parametrize(
    ("given", "echoed"),
    [("trace-42", "trace-42"), ("has space", None), ("x" * 200, None), (None, None)],
    ids=["kept", "spaces", "too-long", "absent"],
)
def test_every_answer_carries_a_request_id(given: str | None, echoed: str | None) -> None:
    headers = {"X-Request-ID": given} if given is not None else {}

    response = Client().get("/healthz", headers=headers)

    request_id = response["X-Request-ID"]
    assert request_id == echoed if echoed else re.fullmatch(r"[0-9a-f]{32}", request_id)


def request_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if "coupons.requests" in line]


def test_a_server_on_postgresql_logs_a_json_line_per_request(
    postgres_environment: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with live.gunicorn(postgres_environment, workers=1, log=log) as server:
        name = f"LOG_{uuid.uuid4().hex[:8]}"
        server.create_coupon(name, 1)
        claim = {"user_id": "u", "coupon_name": name}
        server.request("POST", "/api/coupons/claim", claim, {"X-Request-ID": "checkout-7"})
        server.request("POST", "/api/coupons/claim", claim)

    lines: list[dict[str, Any]] = [json.loads(line) for line in request_lines(log)]
    claims = [line for line in lines if line["route"] == "coupon-claim"]
    assert [(line["status"], line["claim_outcome"]) for line in claims] == [
        (201, "claimed"),
        (409, "already_claimed"),
    ]
    assert claims[0]["request_id"] == "checkout-7"
    assert claims[0]["method"] == "POST" and claims[0]["duration_ms"] > 0
    assert {"time", "level", "logger", "message"} <= set(claims[0])


def test_the_embedded_run_logs_lines_to_read(
    sqlite_environment: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "server.log"
    with live.gunicorn(sqlite_environment, workers=1, log=log) as server:
        server.request("GET", "/api/coupons/NOPE", None, {"X-Request-ID": "look-1"})

    assert any(
        re.search(r"coupons\.requests: GET /api/coupons/NOPE 404 [\d.]+ ms \[look-1\]$", line)
        for line in request_lines(log)
    ), log.read_text()
