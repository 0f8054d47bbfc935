"""The gunicorn worker that serves the site (gunicorn.conf.py picks it)."""

import socket
from typing import Any

from gunicorn.http.body import LengthReader
from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker


class SyncWorker(GunicornSyncWorker):
    """gunicorn's sync worker, closing a connection at once when the client has nothing
    left to send.

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
        super().handle_request(listener, req, client, addr)
        # Reached only when the whole response went out; gunicorn's graceful close that
        # follows does nothing on a socket already closed.
        if not self.cfg.is_ssl and _request_fully_read(req) and not _has_unread_data(client):
            client.close()


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
