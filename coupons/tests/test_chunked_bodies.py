"""Claims sent with a chunked body, through a real gunicorn server."""

import json
import uuid
from typing import Any

from coupons.tests.live import LiveServer


def post_chunked(server: LiveServer, path: str, chunks: list[bytes]) -> tuple[int, Any]:
    """POST a body in the given chunks (Transfer-Encoding: chunked); return status and JSON."""
    encoded = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    request = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode() + encoded
    answer = server.send_raw(request)
    return answer.status, answer.body


def test_a_claim_sent_in_chunks_is_made(sqlite_servers: list[LiveServer]) -> None:
    server = sqlite_servers[0]
    name = f"chunked-{uuid.uuid4().hex[:8]}"
    server.create_coupon(name, 5)
    body = json.dumps({"user_id": "alice", "coupon_name": name}).encode()

    status, answer = post_chunked(server, "/api/coupons/claim", [body[:10], body[10:]])

    assert status == 201, answer
    assert answer["user_id"] == "alice"
    assert server.details(name)["claimed_by"] == ["alice"]


def test_a_chunked_body_over_the_limit_is_refused_with_413(
    sqlite_servers: list[LiveServer],
) -> None:
    server = sqlite_servers[0]
    name = f"chunked-{uuid.uuid4().hex[:8]}"
    server.create_coupon(name, 5)
    padding = " " * (64 * 1024)  # MAX_BODY_BYTES is 64 KiB by default.
    body = json.dumps({"user_id": "bob", "coupon_name": name, "padding": padding}).encode()

    status, answer = post_chunked(server, "/api/coupons/claim", [body[:40_000], body[40_000:]])

    assert status == 413
    assert answer["error"]["code"] == "payload_too_large"
    assert server.details(name)["claimed_by"] == []
