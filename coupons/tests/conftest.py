import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
from rest_framework.test import APIClient

from coupons.tests import live


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture
def unique_name() -> str:
    return f"PROMO_{uuid.uuid4().hex[:10]}"


def _with_database(url: str, database: str) -> str:
    return urlsplit(url)._replace(path=f"/{database}").geturl()


@pytest.fixture(scope="session")
def postgres_environment() -> Iterator[dict[str, str]]:
    """A database of its own, migrated, for servers running in other processes."""
    server_url = os.environ["DATABASE_URL"]
    database = f"coupons_live_{os.getpid()}"
    with psycopg.connect(_with_database(server_url, "postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        admin.execute(f'CREATE DATABASE "{database}"')
    environment = live.environment_for(_with_database(server_url, database))
    live.migrate(environment)
    yield environment
    with psycopg.connect(_with_database(server_url, "postgres"), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def sqlite_environment(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A migrated SQLite file, as `make run` uses by default."""
    path: Path = tmp_path_factory.mktemp("sqlite") / "coupons.sqlite3"
    environment = live.environment_for(None, sqlite_path=path)
    live.migrate(environment)
    return environment


@pytest.fixture(scope="session")
def postgresql_servers(postgres_environment: dict[str, str]) -> Iterator[list[live.LiveServer]]:
    """Two app instances with several workers each, on one PostgreSQL database."""
    with live.gunicorn(postgres_environment) as first, live.gunicorn(postgres_environment) as second:
        yield [first, second]


@pytest.fixture(scope="session")
def sqlite_servers(sqlite_environment: dict[str, str]) -> Iterator[list[live.LiveServer]]:
    """Two app instances with several workers each, on one SQLite file."""
    with live.gunicorn(sqlite_environment) as first, live.gunicorn(sqlite_environment) as second:
        yield [first, second]
