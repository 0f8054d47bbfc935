"""The gunicorn worker that serves the site (gunicorn.conf.py picks it)."""

import json
import socket
from http import HTTPStatus
from typing import Any

from gunicorn import util
from gunicorn.http.body import LengthReader
from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker

# The error of each status gunicorn answers by itself, before Django sees the request.
_ERRORS = {
    400: ("bad_request", "The request is not valid HTTP."),
    403: ("forbidden", "The request is forbidden."),
    414: ("uri_too_long", "The request line is too long."),
    417: ("expectation_failed", "The Expect header cannot be met."),
    431: ("header_fields_too_large", "The request headers are too large."),
    500: ("internal_error", "The server failed to handle the request."),
    501: ("not_implemented", "The transfer coding is not supported."),
}


class SyncWorker(GunicornSyncWorker):
    """gunicorn's sync worker with three changes: it closes a connection at once when the
    client has nothing left to send, it sends a response's head and body in one write, and
    it answers the requests gunicorn refuses by itself with the API's JSON errors.

    The sync worker answers one request per connection and then closes it gracefully: it
    sends its FIN and waits, up to 2 s, until the client closes too, reading whatever the
    client still sends. That wait protects responses from a TCP reset, which the kernel
    sends when a socket is closed with unread data. But the worker serves nobody while it
    waits, and waking up for the client's FIN costs CPU: without the wait a refusal took
    up to 20 % less worker CPU, and B1 answered 3-12 % more claims per second
    (docs/performance.md). When the request's body was read to the end and nothing else
    has arrived, there is nothing to reset, so the socket is closed now. Otherwise (a body
    left unread, chunked or pipelined data, TLS) gunicorn's own graceful close runs.
    """

    def handle_request(self, listener: Any, req: Any, client: socket.socket, addr: Any) -> None:
        response_socket = _HeadWithBody(client)
        super().handle_request(listener, req, response_socket, addr)
        response_socket.flush()  # A head with no body (HEAD, 204) is still held.
        # Reached only when the whole response went out; gunicorn's graceful close that
        # follows does nothing on a socket already closed.
        if not self.cfg.is_ssl and _request_fully_read(req) and not _has_unread_data(client):
            client.close()

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """Answer a request gunicorn refused (too long a request line, a malformed header…)
        with the API's JSON error rather than gunicorn's HTML page.

        gunicorn still decides the status and logs the refusal: its page is caught, and
        only its status line is kept.
        """
        page = _PageCatcher(client)
        super().handle_error(req, page, addr, exc)
        # The page starts with a status line such as "HTTP/1.1 414 URI Too Long".
        words = page.written.split(b"\r\n", 1)[0].split()
        status = int(words[1]) if len(words) > 1 and words[1].isdigit() else 400
        if status not in _ERRORS:
            status = 500 if status >= 500 else 400
        # Imported here: gunicorn's master imports this module before Django is set up.
        from coupons.errors import error_body

        body = json.dumps(error_body(*_ERRORS[status])).encode()
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        try:
            util.write_nonblock(client, head.encode("latin-1") + body)
        except OSError:
            self.log.debug("Failed to send error message.")


class _HeadWithBody:
    """The client's socket as gunicorn's response writer sees it: the status line and
    headers, which gunicorn sends on their own, are held back and sent with the first part
    of the body, in one write.

    Two writes cost a second system call and a second TCP segment, and woke the client
    twice; for a refusal's small answer that was about 3 % of a worker's CPU under load
    (docs/performance.md). gunicorn writes the head before anything else, so the first
    `sendall` is the head. Anything else done with the socket (`fileno()` for sendfile, a
    shutdown on error) sends the held head first.
    """

    def __init__(self, client: socket.socket) -> None:
        self._client = client
        self._head: bytes | None = None
        self._first_write = True

    def sendall(self, data: bytes) -> None:
        if self._first_write:
            self._first_write = False
            self._head = bytes(data)
            return
        head, self._head = self._head, None
        self._client.sendall(head + data if head else data)

    def flush(self) -> None:
        head, self._head = self._head, None
        if head:
            self._client.sendall(head)

    def __getattr__(self, name: str) -> Any:
        self.flush()
        return getattr(self._client, name)


class _PageCatcher:
    """Stands in for a client socket and keeps what is written to it."""

    def __init__(self, client: socket.socket) -> None:
        self._client = client
        self.written = b""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def gettimeout(self) -> float:
        return 0.0  # Already non-blocking, so gunicorn leaves the real socket's mode alone.

    def sendall(self, data: bytes) -> None:
        self.written += data


def _request_fully_read(req: Any) -> bool:
    reader = req.body.reader
    return isinstance(reader, LengthReader) and reader.length == 0


def _has_unread_data(client: socket.socket) -> bool:
    try:
        return bool(client.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except BlockingIOError:
        return False  # Nothing waiting, and the client has not closed its side.
    except OSError:
        return True  # Let the graceful close deal with whatever state the socket is in.
