"""The gunicorn worker: it closes a connection at once only when nothing can be reset, and
answers the requests gunicorn refuses by itself in JSON."""

import socket
import time
from collections.abc import Iterator

import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer


@pytest.fixture(scope="module")
def one_worker(sqlite_environment: dict[str, str]) -> Iterator[LiveServer]:
    """A server with a single worker, so a connection it lingers on blocks everyone else."""
    with live.gunicorn(sqlite_environment, workers=1) as server:
        yield server


def test_the_worker_serves_the_next_client_while_the_last_one_keeps_its_connection(
    one_worker: LiveServer,
) -> None:
    idle_client = one_worker.connect()
    try:
        idle_client.sendall(b"GET /api/coupons/nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = live.parse_raw(live.read_until_closed(idle_client))
        assert (answer.status, answer.body["error"]["code"]) == (404, "coupon_not_found")

        # gunicorn's own sync worker would now wait up to 2 s for this client to close.
        started = time.monotonic()
        assert one_worker.request("GET", "/api/coupons/nothing-here").status == 404
        assert time.monotonic() - started < 1.5
    finally:
        idle_client.close()


def test_a_client_still_sending_an_unread_body_gets_the_answer_and_no_reset(
    one_worker: LiveServer,
) -> None:
    # A 404 is answered without reading the body; the client is still sending it.
    body_length = 48_000
    client = one_worker.connect()
    try:
        client.sendall(
            b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {body_length}\r\n\r\n".encode()
            + b" " * 1000
        )
        answer = live.parse_raw(live.read_until_closed(client))
        assert (answer.status, answer.body["error"]["code"]) == (404, "not_found")
        # Closed at once, the worker's socket would answer the rest with a reset, and the
        # second send would fail; gunicorn's graceful close reads it instead.
        client.sendall(b" " * (body_length // 2))
        time.sleep(0.2)
        client.sendall(b" " * (body_length // 2 - 1000))
        client.shutdown(socket.SHUT_WR)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"GET /api/coupons/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            414,
            "uri_too_long",
        ),
        (
            b"GET /api/coupons/x HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
            400,
            "bad_request",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "bad_request"),
        (
            b"GET /api/coupons/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"".join(b"X-Header-%d: y\r\n" % index for index in range(150))
            + b"\r\n",
            431,
            "header_fields_too_large",
        ),
    ],
)
def test_requests_gunicorn_refuses_get_the_apis_json_error(
    one_worker: LiveServer, request_bytes: bytes, status: int, code: str
) -> None:
    answer = one_worker.send_raw(request_bytes)

    assert answer.status == status
    assert answer.headers["content-type"] == "application/json"
    assert answer.body["error"]["code"] == code
    assert answer.body["error"]["message"]
