"""Real gunicorn servers and real concurrent HTTP clients, for the end-to-end tests."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import psycopg

PROJECT_DIR = Path(__file__).resolve().parents[2]


@dataclass
class Response:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)  # Names in lower case.


@dataclass
class LiveServer:
    host: str
    port: int
    process: subprocess.Popen[bytes] = field(repr=False)

    def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            return send(connection, method, path, body, headers)
        finally:
            connection.close()

    def create_coupon(self, name: str, amount: int, stock_shards: int = 1) -> None:
        body = {"name": name, "amount": amount, "stock_shards": stock_shards}
        response = self.request("POST", "/api/coupons", body)
        assert response.status == 201, response

    def details(self, name: str) -> dict[str, Any]:
        response = self.request("GET", f"/api/coupons/{quote(name, safe='')}")
        assert response.status == 200, response
        body: dict[str, Any] = response.body
        return body

    def connect(self) -> socket.socket:
        return socket.create_connection((self.host, self.port), timeout=30)

    def send_raw(self, request: bytes) -> Response:
        """Send these bytes on a connection of their own; return the answer, JSON parsed."""
        with self.connect() as connection:
            connection.sendall(request)
            return parse_raw(read_until_closed(connection))

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


def send(
    connection: http.client.HTTPConnection,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> Response:
    sent = {"Content-Type": "application/json"} if body is not None else {}
    payload = json.dumps(body) if body is not None else None
    connection.request(method, path, body=payload, headers={**sent, **(headers or {})})
    reply = connection.getresponse()
    raw = reply.read()
    answered = {name.lower(): value for name, value in reply.getheaders()}
    return Response(reply.status, json.loads(raw) if raw else None, answered)


def read_until_closed(connection: socket.socket) -> bytes:
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def parse_raw(response: bytes) -> Response:
    """Parse an HTTP answer read off a socket, with its body as JSON."""
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    name_values = (line.split(": ", 1) for line in header_lines)
    headers = {name.lower(): value for name, value in name_values}
    return Response(int(status_line.split()[1]), json.loads(body), headers)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def migrate(environment: dict[str, str]) -> None:
    """Create the schema in the database the environment points at."""
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=PROJECT_DIR,
        env=environment,
        check=True,
    )


@contextmanager
def gunicorn(
    environment: dict[str, str],
    *,
    workers: int = 3,
    application: str | None = None,
    ready_status: int = 404,
    log: Path | None = None,
) -> Iterator[LiveServer]:
    """Run gunicorn with the project's config on a free loopback port; stop it on exit.

    Its log goes to `log` with a line per request; without it, to stderr without them.
    """
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"]
    if application:
        command.append(application)
    log_file = log.open("w") if log else None
    process = subprocess.Popen(
        command,
        cwd=PROJECT_DIR,
        env={
            "LOG_REQUESTS": "true" if log else "false",
            **environment,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "WEB_CONCURRENCY": str(workers),
        },
        stdout=subprocess.DEVNULL,
        stderr=log_file,
    )
    server = LiveServer("127.0.0.1", port, process)
    try:
        wait_until_serving(server, ready_status=ready_status)
        yield server
    finally:
        stop(process)
        if log_file:
            log_file.close()


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process a test started, by its pid, waiting for it; kill it if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_manage(
    environment: dict[str, str], *arguments: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `manage.py` with the service's settings from environment; its output as text."""
    return subprocess.run(
        [sys.executable, "manage.py", *arguments],
        cwd=PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def wait_until_serving(server: LiveServer, *, timeout: float = 30, ready_status: int = 404) -> None:
    """Wait until the server answers a probe for an unknown coupon with ready_status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with code {server.process.returncode}")
        try:
            if server.request("GET", "/api/coupons/readiness-probe").status == ready_status:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"gunicorn did not answer on port {server.port} within {timeout} s")


@contextmanager
def postgres_database(prefix: str) -> Iterator[str]:
    """Create an empty database on the suite's PostgreSQL server; yield its URL; drop it."""
    server_url = urlsplit(os.environ["DATABASE_URL"])
    maintenance_url = server_url._replace(path="/postgres").geturl()
    database = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(maintenance_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{database}"')
    try:
        yield server_url._replace(path=f"/{database}").geturl()
    finally:
        with psycopg.connect(maintenance_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def environment_for(database_url: str | None, sqlite_path: Path | None = None) -> dict[str, str]:
    """The environment of a server process: PostgreSQL at database_url, or a SQLite file."""
    environment = {key: value for key, value in os.environ.items() if key != "DATABASE_URL"}
    environment["SECRET_KEY"] = "test-secret-key"
    if database_url:
        environment["DATABASE_URL"] = database_url
    if sqlite_path:
        environment["SQLITE_PATH"] = str(sqlite_path)
    return environment


Request = tuple[str, str, Any] | tuple[str, str, Any, dict[str, str]]


def concurrently(servers: Sequence[LiveServer], requests: Sequence[Request]) -> list[Response]:
    """Send every request at once, each on its own connection, spread across the servers.

    Every thread connects first and waits at a barrier, so the requests leave together.
    A request whose connection breaks is answered with status 0.
    """
    barrier = threading.Barrier(len(requests))
    responses: list[Response] = [Response(0, None)] * len(requests)

    def run(
        index: int, method: str, path: str, body: Any, headers: dict[str, str] | None = None
    ) -> None:
        server = servers[index % len(servers)]
        connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
        try:
            connection.connect()
            barrier.wait(timeout=60)
            responses[index] = send(connection, method, path, body, headers)
        except (OSError, http.client.HTTPException):
            responses[index] = Response(0, None)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=run, args=(index, *request))
        for index, request in enumerate(requests)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return responses


def claim_request(user_id: str, coupon_name: str, idempotency_key: str | None = None) -> Request:
    body = {"user_id": user_id, "coupon_name": coupon_name}
    if idempotency_key is None:
        return ("POST", "/api/coupons/claim", body)
    return ("POST", "/api/coupons/claim", body, {"Idempotency-Key": idempotency_key})


def status_counts(responses: Sequence[Response]) -> Counter[int]:
    return Counter(response.status for response in responses)


def error_codes(responses: Sequence[Response]) -> Counter[str]:
    return Counter(
        response.body["error"]["code"] for response in responses if response.status >= 400
    )


def details_once_answered(server: LiveServer, name: str, attempts: int = 20) -> dict[str, Any]:
    """A coupon's details, asked again while the answer is a 503 (a worker whose database
    connection broke answers one request with it, as a client would retry)."""
    for _ in range(attempts - 1):
        response = server.request("GET", f"/api/coupons/{quote(name, safe='')}")
        if response.status != 503:
            break
        time.sleep(0.1)
    else:
        response = server.request("GET", f"/api/coupons/{quote(name, safe='')}")
    assert response.status == 200, response
    body: dict[str, Any] = response.body
    return body


def claim_history_problems(
    server: LiveServer,
    coupon_name: str,
    attempts: Sequence[tuple[str, Response]],
    environment: dict[str, str],
    *,
    run_audit: bool = True,
) -> list[str]:
    """Everything wrong between what claimants were told and what the service recorded.

    `attempts` are (user_id, answer) for every claim of the coupon ever sent, status 0 for
    one left unanswered. An answer of 2xx must be recorded; a 4xx must not have taken a
    unit; an answer lost, or a 5xx, may have or not (the commit's outcome was unknown to
    whoever answered). Then `audit_coupons`, run against the database of `environment`,
    must find every coupon consistent (unless `run_audit` is false: a caller checking many
    coupons of one database audits them all once, with its last).
    """
    details = details_once_answered(server, coupon_name)
    claimed_by: list[str] = details["claimed_by"]
    recorded = set(claimed_by)
    granted = {user for user, answer in attempts if 200 <= answer.status < 300}
    uncertain = {user for user, answer in attempts if answer.status == 0 or answer.status >= 500}
    problems = []
    if granted - recorded:
        problems.append(f"told they hold it but not recorded: {sorted(granted - recorded)}")
    if len(recorded) != len(claimed_by):
        twice = sorted(user for user, count in Counter(claimed_by).items() if count > 1)
        problems.append(f"recorded more than once: {twice}")
    if not len(granted) <= len(claimed_by) <= len(granted | uncertain):
        problems.append(
            f"{len(claimed_by)} claims recorded, for {len(granted)} users told they hold it "
            f"and {len(uncertain - granted)} left without a clear answer"
        )
    if recorded - granted - uncertain:
        problems.append(f"recorded though refused: {sorted(recorded - granted - uncertain)}")
    if not details["remaining_amount"] == details["amount"] - len(claimed_by) >= 0:
        problems.append(
            f"remaining_amount {details['remaining_amount']} with amount {details['amount']} "
            f"and {len(claimed_by)} claims"
        )
    if not run_audit:
        return problems
    audit = run_manage(environment, "audit_coupons", timeout=120)
    if audit.returncode != 0:
        problems.append(f"audit_coupons exited with {audit.returncode}: {audit.stderr.strip()}")
    return problems
