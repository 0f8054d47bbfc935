from collections.abc import Iterator
from pathlib import Path

import pytest
from rest_framework.test import APIClient

from coupons import services
from coupons.tests import live


@pytest.fixture
def api_client() -> APIClient:
    return APIClient()


@pytest.fixture(scope="session")
def postgres_environment() -> Iterator[dict[str, str]]:
    """A database of its own, migrated, for servers running in other processes."""
    with live.postgres_database("coupons_live") as database_url:
        environment = live.environment_for(database_url)
        live.migrate(environment)
        yield environment


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
    with (
        live.gunicorn(postgres_environment) as first,
        live.gunicorn(postgres_environment) as second,
    ):
        yield [first, second]


@pytest.fixture(scope="session")
def sqlite_servers(sqlite_environment: dict[str, str]) -> Iterator[list[live.LiveServer]]:
    """Two app instances with several workers each, on one SQLite file."""
    with live.gunicorn(sqlite_environment) as first, live.gunicorn(sqlite_environment) as second:
        yield [first, second]


@pytest.fixture(params=["postgresql", "sqlite"])
def all_servers(request: pytest.FixtureRequest) -> list[live.LiveServer]:
    """The two app instances of one database, each database in turn."""
    servers: list[live.LiveServer] = request.getfixturevalue(f"{request.param}_servers")
    return servers


@pytest.fixture(params=[1, 16], ids=lambda shards: f"K={shards}")
def stock_shards(request: pytest.FixtureRequest) -> int:
    """A coupon's stock on its own row, or split over 16 stock shards, each locked by one
    claim: the scenarios that take it run on both."""
    shards: int = request.param
    return shards


@pytest.fixture(autouse=True)
def forget_coupons_seen() -> Iterator[None]:
    """Each test starts with empty coupon memories: its coupons are new."""
    services.sold_out_memory.clear()
    services.on_sale_memory.clear()
    yield
    services.sold_out_memory.clear()
    services.on_sale_memory.clear()
