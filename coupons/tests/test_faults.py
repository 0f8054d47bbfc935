"""Faults lose no data and never leave a half-made claim."""

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer, Response, claim_request, concurrently
from coupons.tests.test_concurrency import fresh_coupon


@pytest.fixture
def dedicated_postgres_server(postgres_environment: dict[str, str]) -> Iterator[LiveServer]:
    with live.gunicorn(postgres_environment, workers=3) as server:
        yield server


def test_workers_killed_mid_sale_leave_no_half_made_claim(
    dedicated_postgres_server: LiveServer,
) -> None:
    server = dedicated_postgres_server
    stock, shoppers = 1000, 800
    name = fresh_coupon(server, stock)
    results: list[Response] = []
    claims = [claim_request(f"survivor-{index}", name) for index in range(shoppers)]
    claiming = threading.Thread(target=lambda: results.extend(concurrently([server], claims)))
    claiming.start()
    # Kill every worker once the sale is under way, and remember how far it had got.
    deadline = time.monotonic() + 60
    while not (claimed := len(server.details(name)["claimed_by"])) and time.monotonic() < deadline:
        time.sleep(0.005)
    for pid in server.worker_pids():
        os.kill(pid, signal.SIGKILL)
    claiming.join()

    assert 0 < claimed < shoppers, "the workers were not killed during the sale"
    details = server.details(name)
    confirmed = {response.body["user_id"] for response in results if response.status == 201}
    assert details["remaining_amount"] == stock - len(details["claimed_by"])
    assert len(set(details["claimed_by"])) == len(details["claimed_by"])
    # Every claim the client was told about is recorded; no unit vanished.
    assert confirmed <= set(details["claimed_by"])
    assert all(response.status in {0, 201} for response in results)
    # gunicorn replaced the workers, and claims go on.
    after = server.request("POST", "/api/coupons/claim", {"user_id": "later", "coupon_name": name})
    assert after.status == 201


def test_an_unreachable_database_is_a_json_503_not_a_crash() -> None:
    nothing_listens = f"postgres://postgres@127.0.0.1:{live.free_port()}/coupons"
    environment = live.environment_for(nothing_listens)

    with live.gunicorn(environment, workers=1, ready_status=503) as server:
        claim = server.request("POST", "/api/coupons/claim", {"user_id": "u", "coupon_name": "P"})
        details = server.request("GET", "/api/coupons/P")

    for response in (claim, details):
        assert response.status == 503
        assert response.body["error"]["code"] == "service_unavailable"
