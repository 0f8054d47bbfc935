"""HAProxy and PgBouncer for the tests, from Debian's packages, run with the repository's own
configuration (deploy/) moved onto free loopback ports."""

import configparser
import contextlib
import csv
import io
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from coupons.tests import live

DEPLOY_DIR = live.PROJECT_DIR / "deploy"
HAPROXY_CONFIG = DEPLOY_DIR / "haproxy.cfg"
PGBOUNCER_CONFIG = DEPLOY_DIR / "pgbouncer.ini"

# `name=value` pairs of a PgBouncer connection string, a value possibly quoted ('' inside).
CONNECTION_STRING_FIELD = re.compile(r"(\w+)=('(?:[^']|'')*'|\S+)")


def required_program(name: str) -> str:
    """The path of a program from Debian's packages; the test fails, never skips, without it."""
    # Debian puts both in /usr/sbin, which an unprivileged user's PATH may lack.
    search_path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=search_path)
    if found is None:
        pytest.fail(
            f"{name} is not installed. The topology tests run Debian's haproxy and pgbouncer: "
            "apt-get install haproxy pgbouncer (`make test` installs them when it may).",
            pytrace=False,
        )
    return found


def private_directory(prefix: str) -> Path:
    """A temporary directory that a program switched to the `postgres` user can read."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    directory.chmod(0o755)
    return directory


# PgBouncer


def pgbouncer_settings() -> configparser.ConfigParser:
    """deploy/pgbouncer.ini, parsed."""
    settings = configparser.ConfigParser(interpolation=None, comment_prefixes=(";", "#"))
    settings.read_string(PGBOUNCER_CONFIG.read_text())
    return settings


def pgbouncer_database(settings: configparser.ConfigParser) -> tuple[str, dict[str, str]]:
    """The one database PgBouncer serves: its name for clients and its connection fields."""
    (name, connection_string), *others = settings["databases"].items()
    assert not others, "deploy/pgbouncer.ini should serve one database"
    return name, dict(CONNECTION_STRING_FIELD.findall(connection_string))


@dataclass
class PgBouncer:
    port: int
    database: str  # The name clients connect to.
    user: str
    pool_size: int  # Server connections at most, per database and user.
    process: subprocess.Popen[bytes] = field(repr=False)
    log: Path = field(repr=False)

    def url(self, database: str | None = None) -> str:
        return f"postgres://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def show(self, what: str) -> list[dict[str, object]]:
        """Rows of a SHOW command of PgBouncer's admin console."""
        with psycopg.connect(self.url("pgbouncer"), autocommit=True) as console:
            cursor = console.execute(f"SHOW {what}")
            names = [column.name for column in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


@contextmanager
def pgbouncer(database_url: str, **overrides: str) -> Iterator[PgBouncer]:
    """Run PgBouncer with deploy/pgbouncer.ini in front of the database at database_url, on a
    free loopback port, trusting the local server's user; stop it on exit.

    Only where it listens, how it authenticates and where its database is are changed;
    `overrides` are further settings of its [pgbouncer] section.
    """
    server = urlsplit(database_url)
    user = server.username or "postgres"
    settings = pgbouncer_settings()
    name, fields = pgbouncer_database(settings)
    fields.update(host=server.hostname or "127.0.0.1", port=str(server.port or 5432))
    fields["dbname"] = server.path.lstrip("/")
    settings["databases"][name] = " ".join(f"{key}={value}" for key, value in fields.items())
    directory = private_directory("coupons-pgbouncer-")
    auth_file = directory / "userlist.txt"
    auth_file.write_text(f'"{user}" ""\n')
    port = live.free_port()
    settings["pgbouncer"].update(
        listen_addr="127.0.0.1",
        listen_port=str(port),
        unix_socket_dir="",
        auth_type="trust",
        auth_file=str(auth_file),
        admin_users=user,
        **overrides,
    )
    config = directory / "pgbouncer.ini"
    with config.open("w") as written:
        settings.write(written)
    for path in (auth_file, config):
        path.chmod(0o644)
    command = [required_program("pgbouncer")]
    if os.geteuid() == 0:
        command += ["-u", "postgres"]  # PgBouncer refuses to run as root.
    log = directory / "pgbouncer.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [*command, str(config)], stdout=log_file, stderr=subprocess.STDOUT
        )
    bouncer = PgBouncer(
        port, name, user, int(settings["pgbouncer"].get("default_pool_size", "20")), process, log
    )
    try:
        wait_until_accepting(bouncer)
        yield bouncer
    finally:
        live.stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def wait_until_accepting(bouncer: PgBouncer, timeout: float = 30) -> None:
    """Wait until a query through PgBouncer reaches the database."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bouncer.process.poll() is not None:
            raise RuntimeError(f"pgbouncer exited: {bouncer.log.read_text(errors='replace')}")
        with contextlib.suppress(psycopg.OperationalError):
            with psycopg.connect(bouncer.url(), connect_timeout=2, autocommit=True) as client:
                client.execute("SELECT 1")
            return
        time.sleep(0.1)
    raise RuntimeError(f"pgbouncer did not accept within {timeout} s: {bouncer.log.read_text()}")


# HAProxy


def haproxy_configuration(port: int, servers: Sequence[live.LiveServer], stats: Path) -> str:
    """deploy/haproxy.cfg, listening on 127.0.0.1:port and balancing over these servers
    instead of the replicas Docker's DNS finds, with an admin socket at `stats`."""
    text = HAPROXY_CONFIG.read_text()
    text, resolvers = re.subn(r"^resolvers .*?(?=^\S|\Z)", "", text, flags=re.M | re.S)
    text, binds = re.subn(r"^(\s+)bind \S+$", rf"\g<1>bind 127.0.0.1:{port}", text, flags=re.M)
    listed = "\n".join(
        f"    server app-{number} {server.host}:{server.port}"
        for number, server in enumerate(servers, start=1)
    )
    text, templates = re.subn(r"^\s+server-template .*$", listed, text, flags=re.M)
    assert (resolvers, binds, templates) == (1, 1, 1), "deploy/haproxy.cfg changed its shape"
    return f"global\n    stats socket {stats} level admin\n\n{text}"


def haproxy_servers(stats: Path) -> list[dict[str, str]]:
    """The backend servers as HAProxy's admin socket reports them (`show stat`)."""
    with socket.socket(socket.AF_UNIX) as admin:
        admin.settimeout(10)
        admin.connect(str(stats))
        admin.sendall(b"show stat\n")
        answer = live.read_until_closed(admin).decode()
    rows = csv.DictReader(io.StringIO(answer.removeprefix("# ")))
    return [row for row in rows if row["svname"] not in {"FRONTEND", "BACKEND"}]


@contextmanager
def haproxy(servers: Sequence[live.LiveServer]) -> Iterator[live.LiveServer]:
    """Run HAProxy in the foreground with deploy/haproxy.cfg over these servers, on a free
    loopback port; yield it once its health checks found every server ready; stop it."""
    directory = private_directory("coupons-haproxy-")
    port = live.free_port()
    stats = directory / "admin.sock"
    config = directory / "haproxy.cfg"
    config.write_text(haproxy_configuration(port, servers, stats))
    log = directory / "haproxy.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [required_program("haproxy"), "-db", "-f", str(config)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not all_servers_ready(stats, len(servers)):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"HAProxy did not get ready: {log.read_text()}")
            time.sleep(0.1)
        yield live.LiveServer("127.0.0.1", port, process)
    finally:
        live.stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def all_servers_ready(stats: Path, count: int) -> bool:
    """Whether HAProxy has checked `count` servers and found each ready."""
    try:
        servers = haproxy_servers(stats)
    except OSError:
        return False  # Not listening yet.
    ready = [row for row in servers if row["status"] == "UP" and row["check_status"] == "L7OK"]
    return len(ready) == count
