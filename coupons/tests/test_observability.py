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
from couponsite.observability import RequestIdFilter


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


def test_metrics_add_up_every_workers_claims(
    postgres_environment: dict[str, str], tmp_path: Path
) -> None:
    metrics_directory = tmp_path / "metrics"
    environment = {**postgres_environment, "PROMETHEUS_MULTIPROC_DIR": str(metrics_directory)}
    with live.gunicorn(environment, workers=3) as server:
        name = f"METRICS_{uuid.uuid4().hex[:8]}"
        server.create_coupon(name, 4)
        before = scrape(server)

        # Twelve claims at once, spread over the server's three workers: four won.
        claims = [live.claim_request(f"m{index}", name) for index in range(12)]
        live.concurrently([server], claims)
        after = scrape(server)
        counting_workers = {path.name for path in metrics_directory.glob("counter_*.db")}

    assert len(counting_workers) >= 2, counting_workers  # Several workers counted...
    assert grown(before, after, 'coupons_claims_total{outcome="claimed"}') == 4  # ...added up.
    assert grown(before, after, 'coupons_claims_total{outcome="out_of_stock"}') == 8
    assert grown(before, after, "coupons_claim_duration_seconds_count") == 12
    requests = 'coupons_http_requests_total{route="coupon-claim",status="409"}'
    assert grown(before, after, requests) == 8


def test_probes_answer_whatever_hosts_the_service_allows(
    postgres_environment: dict[str, str],
) -> None:
    # Probes reach a server by its address, which a production ALLOWED_HOSTS does not list.
    environment = {**postgres_environment, "ALLOWED_HOSTS": "coupons.example.com"}
    with live.gunicorn(environment, workers=1, ready_status=400) as server:
        healthy = server.request("GET", "/healthz")
        ready = server.request("GET", "/readyz")
        api = server.request("GET", "/api/coupons/NOPE")

    assert (healthy.status, ready.status) == (200, 200)
    assert (api.status, api.body["error"]["code"]) == (400, "bad_request")


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


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("given", "echoed"),
    [("trace-42", "trace-42"), ("has space", None), ("x" * 200, None), (None, None)],
    ids=["kept", "spaces", "too-long", "absent"],
)
def test_every_answer_carries_a_request_id(given: str | None, echoed: str | None) -> None:
    headers = {"X-Request-ID": given} if given is not None else {}

    response = Client().get("/api/coupons/NOPE", headers=headers)

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
    assert all(line["time"].endswith("+00:00") for line in lines)  # ISO 8601, with its zone.
    claims = [line for line in lines if line["route"] == "coupon-claim"]
    assert [(line["status"], line["claim_outcome"]) for line in claims] == [
        (201, "claimed"),
        (409, "already_claimed"),
    ]
    assert claims[0]["request_id"] == "checkout-7"
    assert claims[0]["method"] == "POST" and claims[0]["duration_ms"] > 0
    assert {"time", "level", "logger", "message"} <= set(claims[0])


@pytest.mark.django_db
def test_every_log_record_written_for_a_request_carries_its_id(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: Any) -> None:
        raise RuntimeError("a fault")

    monkeypatch.setattr("coupons.api.details_document", fail)
    Client(raise_request_exception=False).get("/api/coupons/P", headers={"X-Request-ID": "r-9"})

    fault = next(record for record in caplog.records if record.name == "django.request")
    assert RequestIdFilter().filter(fault) and getattr(fault, "request_id", None) == "r-9"


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
