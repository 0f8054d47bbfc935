"""What only a real gunicorn server shows: HEAD, 100-continue, bodies left unread, and the
requests gunicorn refuses before Django sees them."""

import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import pytest
from rest_framework.renderers import JSONRenderer

from coupons.tests import live
from coupons.tests.live import LiveServer


@pytest.fixture(scope="module")
def one_worker(sqlite_environment: dict[str, str]) -> Iterator[LiveServer]:
    """A server with a single worker: whatever a request leaves behind, the next one meets."""
    with live.gunicorn(sqlite_environment, workers=1) as server:
        yield server


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
    ("request_bytes", "status"),
    [
        (b"GET /api/coupons/" + b"x" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ],
    ids=["request-line-too-long", "not-http"],
)
def test_requests_gunicorn_refuses_are_answered_and_the_worker_serves_on(
    one_worker: LiveServer, request_bytes: bytes, status: int
) -> None:
    # gunicorn answers these itself, with its own page: they never reach Django.
    with one_worker.connect() as connection:
        connection.sendall(request_bytes)
        answer = live.read_until_closed(connection)

    assert answer.startswith(b"HTTP/1.1 %d " % status)
    assert one_worker.request("GET", "/api/coupons/nothing-here").status == 404


def test_a_head_request_gets_the_whole_head_and_no_body(one_worker: LiveServer) -> None:
    client = one_worker.connect()
    try:
        client.sendall(b"HEAD /api/coupons/nothing-here HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = live.read_until_closed(client)
    finally:
        client.close()

    head, separator, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 ")
    assert separator and body == b""
    assert b"\r\nContent-Type: application/json" in head


def test_an_interim_100_continue_comes_before_the_answer(one_worker: LiveServer) -> None:
    body = b'{"user_id": "u", "coupon_name": "nothing-here"}'
    client = one_worker.connect()
    try:
        client.sendall(
            b"POST /api/coupons/claim HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        assert client.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        client.sendall(body)
        answer = live.parse_raw(live.read_until_closed(client))
    finally:
        client.close()

    assert (answer.status, answer.body["error"]["code"]) == (404, "coupon_not_found")


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_details_are_written_as_drfs_renderer_writes_them(
    request: pytest.FixtureRequest, database: str
) -> None:
    # The database writes the details document (details_document.py); every other answer
    # is DRF's. Names and ids that JSON must escape, or that a renderer might.
    server: LiveServer = request.getfixturevalue(f"{database}_servers")[0]
    name = f'Sale "50%" \\ 券 🎟 \u2028 {uuid.uuid4().hex[:6]}'
    users = ["plain", 'quote " back\\slash', "ünïcødé 券 \U0001f600", "line\u2028para\u2029end"]
    server.create_coupon(name, 10)
    for user_id in users:
        claim = {"user_id": user_id, "coupon_name": name}
        assert server.request("POST", "/api/coupons/claim", claim).status == 201

    with server.connect() as connection:
        connection.sendall(
            f"GET /api/coupons/{quote(name, safe='')} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        )
        answer = live.read_until_closed(connection)

    expected = {"name": name, "amount": 10, "remaining_amount": 6, "claimed_by": users}
    assert answer.partition(b"\r\n\r\n")[2] == JSONRenderer().render(expected)
