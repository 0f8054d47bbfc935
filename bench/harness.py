"""The service under test: its throwaway database, its gunicorn, its API, and what /proc
tells of its processes (their memory, and the CPU that other work takes beside them)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql as pgsql

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BENCH_DATABASE = "coupons_bench"
DEFAULT_SERVER_URL = "postgres://postgres@127.0.0.1:5432/postgres"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


class BenchError(Exception):
    """The bench could not run (as opposed to a run whose results failed verification)."""


# Database


def bench_database_url() -> str:
    """Return the URL of the bench database: DATABASE_URL's server, database coupons_bench.

    The database DATABASE_URL names is never touched: the bench drops and recreates its own.
    """
    parts = urlsplit(os.environ.get("DATABASE_URL") or DEFAULT_SERVER_URL)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise BenchError(f"the bench needs PostgreSQL; DATABASE_URL is {parts.scheme}://…")
    return urlunsplit(parts._replace(path=f"/{BENCH_DATABASE}"))


def _maintenance_url(database_url: str) -> str:
    """Return the URL of the server's `postgres` database, to create and drop others from."""
    return urlunsplit(urlsplit(database_url)._replace(path="/postgres"))


def _recreate_database(database_url: str, *, create: bool) -> None:
    """Drop the database of database_url (closing its sessions), and create it afresh if asked."""
    database = pgsql.Identifier(urlsplit(database_url).path.lstrip("/"))
    with psycopg.connect(_maintenance_url(database_url), autocommit=True) as connection:
        connection.execute(pgsql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(database))
        if create:
            connection.execute(pgsql.SQL("CREATE DATABASE {}").format(database))


@contextmanager
def fresh_database(database_url: str) -> Iterator[None]:
    """Provide an empty bench database for the duration of the block, then drop it."""
    _recreate_database(database_url, create=True)
    try:
        yield
    finally:
        _recreate_database(database_url, create=False)


def sql(database_url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one statement in its own committed transaction; return its rows, if any."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        cursor = connection.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


# Processes


@dataclass(frozen=True)
class Process:
    """What /proc/<pid>/stat tells of a process."""

    pid: int
    name: str
    parent: int
    started: int  # Clock ticks after boot: with the pid, names the process for good.
    cpu: int  # User and system time, in clock ticks.
    children_cpu: int  # The same, of its children that have ended and been waited for.


def process(pid: int) -> Process | None:
    """Return the process pid, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The name is in parentheses and may hold spaces: the other fields follow the last ")".
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat.rpartition(")")[2].split()
    return Process(
        pid=pid,
        name=name,
        parent=int(fields[1]),
        started=int(fields[19]),
        cpu=int(fields[11]) + int(fields[12]),
        children_cpu=int(fields[13]) + int(fields[14]),
    )


def processes() -> list[Process]:
    """Return every process of the machine."""
    found = (process(int(entry.name)) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [each for each in found if each is not None]


def worker_pids(master_pid: int) -> list[int]:
    """Return the pids of the master's children (its workers)."""
    return [each.pid for each in processes() if each.parent == master_pid]


# gunicorn


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def service_env(database_url: str, port: int) -> dict[str, str]:
    """Return the environment of a production-like service on database_url.

    WEB_CONCURRENCY and GUNICORN_THREADS pass through from the caller's environment, so
    other settings can be measured; by default gunicorn.conf.py decides.
    """
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        DEBUG="false",
        SECRET_KEY="bench-only-not-a-secret",
        HOST="127.0.0.1",
        PORT=str(port),
        ACCESS_LOG="false",
        LOG_LEVEL="WARNING",
    )
    return env


def run_python(arguments: list[str], env: dict[str, str]) -> str:
    """Run the project's Python with arguments in the repository; return its output."""
    done = subprocess.run(
        [sys.executable, *arguments],
        cwd=REPO_DIR,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(arguments)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def migrate(env: dict[str, str]) -> None:
    """Create the schema with the project's migrations."""
    run_python(["manage.py", "migrate", "--noinput"], env)


def gunicorn_settings(env: dict[str, str]) -> dict[str, str]:
    """Return the settings gunicorn resolves from gunicorn.conf.py and env (workers, threads…)."""
    output = run_python(["-m", "gunicorn", "-c", "gunicorn.conf.py", "--print-config"], env)
    settings = {}
    for line in output.splitlines():
        name, sep, value = line.partition("=")
        if sep:
            settings[name.strip()] = value.strip()
    return {name: settings.get(name, "?") for name in ("workers", "threads", "worker_class")}


@dataclass(frozen=True)
class Service:
    """A running gunicorn master serving the API on 127.0.0.1:port."""

    pid: int
    port: int


def _wait_until_ready(master: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Wait until the service answers HTTP; raise BenchError if it dies or takes too long."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    api = Api(port)
    while time.monotonic() < deadline:
        if master.poll() is not None:
            raise BenchError(f"gunicorn exited with {master.returncode}; see {log_path}")
        try:
            api.get("/api/coupons/bench-readiness-probe")
            return
        except OSError:
            time.sleep(0.2)
    raise BenchError(f"gunicorn did not answer within {READY_TIMEOUT_S:.0f} s; see {log_path}")


def _stop(master: subprocess.Popen[bytes]) -> None:
    """Stop the master gracefully (it stops its workers); kill it and them after a while."""
    # A worker is known by its pid and start time, so a pid reused meanwhile is left alone.
    workers = [each for each in processes() if each.parent == master.pid]
    master.send_signal(signal.SIGTERM)
    try:
        master.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        master.kill()
        master.wait()
    for worker in workers:
        still = process(worker.pid)
        if still is not None and still.started == worker.started:
            os.kill(worker.pid, signal.SIGKILL)


@contextmanager
def running_service(
    env: dict[str, str], log_path: Path, tree: Path = REPO_DIR, options: Sequence[str] = ()
) -> Iterator[Service]:
    """Run gunicorn from a checkout's gunicorn.conf.py (by default this one), with options
    of its command line on top, for the duration of the block; it imports that checkout's
    code."""
    port = int(env["PORT"])
    with log_path.open("wb") as log:
        master = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *options],
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_until_ready(master, port, log_path)
            yield Service(pid=master.pid, port=port)
        finally:
            _stop(master)


def log_problems(log_path: Path) -> list[str]:
    """Return the lines of the gunicorn log that tell of a failure (tracebacks, timeouts…)."""
    markers = ("Traceback", "[CRITICAL]", "[ERROR]", "WORKER TIMEOUT")
    lines = log_path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(marker in line for marker in markers)]


# Noise


def _machine_cpu() -> tuple[int, int]:
    """Return the clock ticks all CPUs spent so far in all, and running user or kernel code."""
    user, nice, system, *rest = (int(v) for v in Path("/proc/stat").read_text().split()[1:9])
    return user + nice + system + sum(rest), user + nice + system


def _own_cpu(master_pid: int) -> int:
    """Return the CPU ticks of the bench, its gunicorn and wrk or pgbench, and PostgreSQL."""
    own = 0
    for each in processes():
        # Ended children count too: wrk, pgbench, replaced workers, closed database sessions.
        if each.pid in {os.getpid(), master_pid} or each.name == "postgres":
            own += each.cpu + each.children_cpu
        elif each.parent == master_pid:
            own += each.cpu
    return own


class OtherWork:
    """Measures the share of the CPUs that other work took while the block ran.

    The machine is shared: a test suite running beside the bench lowers its figures.
    Everything but the bench's processes and PostgreSQL's counts as other work.
    """

    def __init__(self, master_pid: int) -> None:
        self.master_pid = master_pid
        self.share = 0.0
        self.busy_s = 0.0  # CPU time all processes took, in seconds of one CPU.

    def _sample(self) -> tuple[int, int, int]:
        """Clock ticks so far: of all CPUs, of them busy, and of the bench's own processes."""
        total, busy = _machine_cpu()
        return total, busy, _own_cpu(self.master_pid)

    def __enter__(self) -> OtherWork:
        self._start = self._sample()
        return self

    def __exit__(self, *_: object) -> None:
        total, busy, own = self._sample()
        start_total, start_busy, start_own = self._start
        other = (busy - start_busy) - (own - start_own)
        self.share = max(0, other) / max(1, total - start_total)
        self.busy_s = (busy - start_busy) / os.sysconf("SC_CLK_TCK")


# Memory


def reset_peak_rss(master_pid: int) -> None:
    """Reset the peak resident size (VmHWM) of every worker, to measure one scenario alone."""
    for pid in worker_pids(master_pid):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_worker_rss_kib(master_pid: int) -> int:
    """Return the largest peak resident size (VmHWM, KiB) of any worker since the last reset."""
    peaks = [0]
    for pid in worker_pids(master_pid):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]))
    return max(peaks)


# HTTP API


class Api:
    """A small client of the service's JSON API (one connection per call, as a shop's would)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, bytes]:
        """Send one request; return the status and the raw body."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            payload = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def get(self, path: str) -> tuple[int, bytes]:
        """GET a path."""
        return self.call("GET", path)

    def create_coupon(self, name: str, amount: int) -> None:
        """Create a coupon; raise BenchError unless the service answers 201."""
        status, body = self.call("POST", "/api/coupons", {"name": name, "amount": amount})
        if status != 201:
            raise BenchError(f"creating coupon {name} answered {status}: {body[:200]!r}")

    def coupon(self, name: str) -> tuple[dict[str, Any], int]:
        """Return a coupon's details and the size in bytes of the response body."""
        status, body = self.get(coupon_path(name))
        if status != 200:
            raise BenchError(f"reading coupon {name} answered {status}: {body[:200]!r}")
        return json.loads(body), len(body)


def coupon_path(name: str) -> str:
    """Return the details path of a coupon."""
    return f"/api/coupons/{quote(name, safe='')}"
