"""The gunicorn worker: it closes a connection at once only when nothing can be reset, and
answers the requests gunicorn refuses by itself in JSON."""

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer


@pytest.fixture(scope="module")
def one_worker(sqlite_environment: dict[str, str]) -> Iterator[LiveServer]:
    """A server with a single worker, so a connection it lingers on blocks everyone else."""
    with live.gunicorn(sqlite_environment, workers=1) as server:
        yield server


def open_connection(server: LiveServer) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=10)


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def error_code_of_404(response: bytes) -> str:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head
    code: str = json.loads(body)["error"]["code"]
    return code


def test_the_worker_serves_the_next_client_while_the_last_one_keeps_its_connection(
    one_worker: LiveServer,
) -> None:
    idle_client = open_connection(one_worker)
    try:
        idle_client.sendall(b"GET /api/coupons/nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert error_code_of_404(read_until_closed(idle_client)) == "coupon_not_found"

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
    client = open_connection(one_worker)
    try:
        client.sendall(
            b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {body_length}\r\n\r\n".encode()
            + b" " * 1000
        )
        response = read_until_closed(client)
        assert error_code_of_404(response) == "not_found"
        # Closed at once, the worker's socket would answer the rest with a reset, and the
        # second send would fail; gunicorn's graceful close reads it instead.
        client.sendall(b" " * (body_length // 2))
        time.sleep(0.2)
        client.sendall(b" " * (body_length // 2 - 1000))
        client.shutdown(socket.SHUT_WR)
    finally:
        client.close()


def exchange(server: LiveServer, request: bytes) -> tuple[str, dict[str, str], Any]:
    """Send raw bytes; return the status line, the headers and the JSON body."""
    with open_connection(server) as connection:
        connection.sendall(request)
        head, _, body = read_until_closed(connection).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in header_lines)
    return status_line, headers, json.loads(body)


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (
            b"GET /api/coupons/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "414",
            "uri_too_long",
        ),
        (
            b"GET /api/coupons/x HTTP/1.1\r\nHost: 127.0.0.1\r\nno colon here\r\n\r\n",
            "400",
            "bad_request",
        ),
        (b"NOT HTTP AT ALL\r\n\r\n", "400", "bad_request"),
        (
            b"GET /api/coupons/x HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            + b"".join(b"X-Header-%d: y\r\n" % index for index in range(150))
            + b"\r\n",
            "431",
            "header_fields_too_large",
        ),
    ],
)
def test_requests_gunicorn_refuses_get_the_apis_json_error(
    one_worker: LiveServer, request_bytes: bytes, status: str, code: str
) -> None:
    status_line, headers, body = exchange(one_worker, request_bytes)

    assert status_line.split()[1] == status
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == code
    assert body["error"]["message"]
