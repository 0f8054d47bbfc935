"""The gunicorn worker: it closes a connection at once only when nothing can be reset, sends
a response's head with its body, and answers the requests gunicorn refuses by itself in
JSON."""

import socket
import time
from collections.abc import Iterator

import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer
from couponsite.workers import _HeadWithBody


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


class RecordingSocket:
    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []

    def sendall(self, data: bytes) -> None:
        self.calls.append(("sendall", data))

    def fileno(self) -> int:
        self.calls.append(("fileno", b""))
        return 99


def test_the_head_goes_out_with_the_first_part_of_the_body() -> None:
    client = RecordingSocket()
    response_socket = _HeadWithBody(client)  # type: ignore[arg-type]

    response_socket.sendall(b"HTTP/1.1 409 Conflict\r\n\r\n")
    assert client.calls == []
    response_socket.sendall(b"{}")
    response_socket.sendall(b"more")
    response_socket.flush()

    assert client.calls == [
        ("sendall", b"HTTP/1.1 409 Conflict\r\n\r\n{}"),
        ("sendall", b"more"),
    ]


def test_a_head_without_body_goes_out_when_flushed_or_before_anything_else() -> None:
    flushed, used = RecordingSocket(), RecordingSocket()
    head_only = _HeadWithBody(flushed)  # type: ignore[arg-type]
    head_only.sendall(b"head")
    head_only.flush()
    before_sendfile = _HeadWithBody(used)  # type: ignore[arg-type]
    before_sendfile.sendall(b"head")

    assert before_sendfile.fileno() == 99
    assert flushed.calls == [("sendall", b"head")]
    assert used.calls == [("sendall", b"head"), ("fileno", b"")]


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
