"""Reads from a replica (DATABASE_REPLICA_URL): the details and the listing read from it, and
nothing else does; without it, one database and nothing changed.

Settings are read at import, so the tests that need a replica configured (WithAReplica) run
in a pytest process of their own with DATABASE_REPLICA_URL set, started by
test_with_a_replica_only_the_details_and_the_listing_read_from_it; the settings themselves
are read in a Python process of their own.
"""

import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from io import StringIO
from typing import Any
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.test import Client
from django.test.utils import CaptureQueriesContext
from pytest_django.fixtures import Settings as SettingsWrapper
from rest_framework.test import APIClient

from coupons import services
from coupons.models import ApiKey, ClaimHistory, Coupon
from coupons.tests import live
from couponsite.routers import REPLICA_DB_ALIAS, ReplicaRouter, reads_from_replica

without_a_replica = pytest.mark.skipif(
    REPLICA_DB_ALIAS in settings.DATABASES, reason="DATABASE_REPLICA_URL is set"
)

DETAILS = {"name": "PROMO", "amount": 3, "remaining_amount": 2, "claimed_by": ["alice"]}


def coupon_with_a_claim() -> None:
    services.create_coupon(name="PROMO", amount=3)
    services.claim_coupon(coupon_name="PROMO", user_id="alice")


def post_json(client: APIClient, path: str, body: Any, **headers: str) -> Any:
    return client.generic(
        "POST", path, json.dumps(body), content_type="application/json", headers=headers
    )


@contextmanager
def sql_sent_to_each_database() -> Iterator[dict[str, list[str]]]:
    """The SQL each database alias was sent inside the block, filled in as it ends."""
    sent: dict[str, list[str]] = {}
    with (
        CaptureQueriesContext(connections[DEFAULT_DB_ALIAS]) as primary,
        CaptureQueriesContext(connections[REPLICA_DB_ALIAS]) as replica,
    ):
        yield sent
    sent[DEFAULT_DB_ALIAS] = [query["sql"] for query in primary.captured_queries]
    sent[REPLICA_DB_ALIAS] = [query["sql"] for query in replica.captured_queries]


# Transactional: the replica's connection sees only what the primary's committed, as a real
# replica's would (TEST MIRROR points it at the same test database, on a connection of its own).
@pytest.mark.django_db(transaction=True, databases=[DEFAULT_DB_ALIAS, REPLICA_DB_ALIAS])
class WithAReplica:
    """Collected only by the process the next test starts with DATABASE_REPLICA_URL set (its
    `-o python_classes` names this class): pytest's own collection, in a process without a
    replica, leaves it out, where its tests could only be skipped."""

    def test_the_details_are_read_from_the_replica(self, api_client: APIClient) -> None:
        coupon_with_a_claim()
        services.create_coupon(name="claim", amount=1)

        with sql_sent_to_each_database() as sent:
            details = api_client.get("/api/coupons/PROMO")
            # The claim route's GET is the details of a coupon named "claim".
            of_claim = api_client.get("/api/coupons/claim")
            missing = api_client.get("/api/coupons/NOPE")

        assert details.json() == DETAILS
        assert (of_claim.status_code, missing.status_code) == (200, 404)
        assert sent[DEFAULT_DB_ALIAS] == []
        assert len(sent[REPLICA_DB_ALIAS]) == 3
        assert all("coupons_claimhistory" in sql for sql in sent[REPLICA_DB_ALIAS])

    def test_the_listing_is_read_from_the_replica(self, api_client: APIClient) -> None:
        coupon_with_a_claim()

        with sql_sent_to_each_database() as sent:
            listing = api_client.get("/api/coupons?live=true")

        assert [coupon["name"] for coupon in listing.json()["results"]] == ["PROMO"]
        assert sent[DEFAULT_DB_ALIAS] == []
        assert sent[REPLICA_DB_ALIAS]
        assert all("coupons_coupon" in sql for sql in sent[REPLICA_DB_ALIAS])

    def test_creating_claiming_retrying_and_claim_look_ups_use_only_the_primary(
        self, api_client: APIClient
    ) -> None:
        with sql_sent_to_each_database() as sent:
            created = post_json(api_client, "/api/coupons", {"name": "PROMO", "amount": 1})
            body = {"user_id": "alice", "coupon_name": "PROMO"}
            claimed = post_json(api_client, "/api/coupons/claim", body, **{"Idempotency-Key": "k1"})
            # A retry, answered from the key's look-up; a key reused by someone else.
            replayed = post_json(
                api_client, "/api/coupons/claim", body, **{"Idempotency-Key": "k1"}
            )
            other = {"user_id": "bob", "coupon_name": "PROMO"}
            reused = post_json(api_client, "/api/coupons/claim", other, **{"Idempotency-Key": "k1"})
            # Refused by the look before the lock: no stock left.
            sold_out = post_json(api_client, "/api/coupons/claim", other)
            looked_up = api_client.get("/api/coupons/PROMO/claims/alice")
            claims = api_client.get("/api/coupons/PROMO/claims")
            revoked = api_client.delete("/api/coupons/PROMO/claims/alice")

        statuses = [
            response.status_code
            for response in (created, claimed, replayed, reused, sold_out, looked_up, claims)
        ]
        assert statuses == [201, 201, 201, 422, 409, 200, 200]
        assert replayed.headers["Idempotent-Replayed"] == "true"
        assert revoked.status_code == 204
        assert sent[REPLICA_DB_ALIAS] == []
        assert sent[DEFAULT_DB_ALIAS]

    def test_the_admin_and_the_commands_use_only_the_primary(self, admin_client: Client) -> None:
        coupon_with_a_claim()
        coupon = Coupon.objects.get(name="PROMO")

        with sql_sent_to_each_database() as sent:
            changelist = admin_client.get("/admin/coupons/coupon/")
            change = admin_client.get(f"/admin/coupons/coupon/{coupon.pk}/change/")
            ledger = admin_client.get("/admin/coupons/claimhistory/")
            call_command("audit_coupons", stdout=StringIO())

        assert (changelist.status_code, change.status_code, ledger.status_code) == (200, 200, 200)
        assert sent[REPLICA_DB_ALIAS] == []
        assert sent[DEFAULT_DB_ALIAS]

    def test_an_api_key_is_looked_up_on_the_primary_before_a_details_read(
        self, api_client: APIClient, settings: SettingsWrapper
    ) -> None:
        settings.API_AUTH_REQUIRED = True
        coupon_with_a_claim()
        _, key = ApiKey.objects.create_key(name="shop", scope=ApiKey.Scope.CLIENT)

        with sql_sent_to_each_database() as sent:
            details = api_client.get(
                "/api/coupons/PROMO", headers={"Authorization": f"Bearer {key}"}
            )

        assert details.json() == DETAILS
        assert any("coupons_apikey" in sql for sql in sent[DEFAULT_DB_ALIAS])
        assert len(sent[REPLICA_DB_ALIAS]) == 1
        assert "coupons_apikey" not in sent[REPLICA_DB_ALIAS][0]


def test_with_a_replica_only_the_details_and_the_listing_read_from_it() -> None:
    server = urlsplit(os.environ["DATABASE_URL"])
    database = f"coupons_replica_{uuid.uuid4().hex[:8]}"
    environment = {
        **os.environ,
        "DATABASE_URL": server._replace(path=f"/{database}").geturl(),
        # A database name of its own, which does not exist: only TEST MIRROR lets the tests
        # read the primary's test database through it.
        "DATABASE_REPLICA_URL": server._replace(path=f"/{database}_standby").geturl(),
    }

    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"]
        + ["-o", "python_classes=WithAReplica", "coupons/tests/test_replica.py::WithAReplica"],
        cwd=live.PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )

    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert re.search(r"\b5 passed\b", done.stdout), output
    assert "skipped" not in done.stdout, output


@without_a_replica
@pytest.mark.django_db
def test_without_a_replica_the_details_and_the_listing_read_from_the_one_database(
    api_client: APIClient,
) -> None:
    coupon_with_a_claim()

    with CaptureQueriesContext(connection) as queries:
        details = api_client.get("/api/coupons/PROMO")
        listing = api_client.get("/api/coupons")

    assert list(connections) == [DEFAULT_DB_ALIAS]
    assert details.json() == DETAILS
    assert [coupon["name"] for coupon in listing.json()["results"]] == ["PROMO"]
    assert len(queries) >= 2


def settings_of(**environment: str) -> subprocess.CompletedProcess[str]:
    """Import the settings in a process of their own, with only these database variables set;
    print DATABASES and DATABASE_ROUTERS as JSON."""
    script = (
        "import json; from django.conf import settings; "
        "print(json.dumps([settings.DATABASES, settings.DATABASE_ROUTERS], default=str))"
    )
    database_variables = {
        "DATABASE_URL",
        "DATABASE_REPLICA_URL",
        "DB_POOLER",
        "PREPARE_THRESHOLD",
        "DB_CONNECT_TIMEOUT",
        "DB_STATEMENT_TIMEOUT_MS",
        "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS",
    }
    inherited = {key: value for key, value in os.environ.items() if key not in database_variables}
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=live.PROJECT_DIR,
        env={**inherited, "DJANGO_SETTINGS_MODULE": "couponsite.settings", **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def databases_and_routers(**environment: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    done = settings_of(**environment)
    assert done.returncode == 0, done.stderr
    databases, routers = json.loads(done.stdout)
    return databases, routers


PRIMARY_URL = "postgres://shop@primary.internal:5432/coupons"
REPLICA_URL = "postgres://shop@standby.internal:5433/coupons"


def test_without_a_replica_url_there_is_one_database_and_no_router() -> None:
    on_postgresql = databases_and_routers(DATABASE_URL=PRIMARY_URL)
    on_sqlite = databases_and_routers()

    for databases, routers in (on_postgresql, on_sqlite):
        assert list(databases) == [DEFAULT_DB_ALIAS]
        assert routers == []


@pytest.mark.parametrize(
    "environment",
    [{}, {"DB_POOLER": "pgbouncer"}, {"PREPARE_THRESHOLD": "", "DB_CONNECT_TIMEOUT": "7"}],
    ids=["defaults", "pgbouncer", "no-prepare"],
)
def test_the_replica_gets_the_primarys_options_and_mirrors_it_in_tests(
    environment: dict[str, str],
) -> None:
    databases, routers = databases_and_routers(
        DATABASE_URL=PRIMARY_URL, DATABASE_REPLICA_URL=REPLICA_URL, **environment
    )

    primary, replica = databases[DEFAULT_DB_ALIAS], databases[REPLICA_DB_ALIAS]
    assert list(databases) == [DEFAULT_DB_ALIAS, REPLICA_DB_ALIAS]
    assert routers == ["couponsite.routers.ReplicaRouter"]
    assert (replica["HOST"], replica["PORT"]) == ("standby.internal", 5433)
    assert replica["TEST"] == {"MIRROR": DEFAULT_DB_ALIAS}
    assert replica["OPTIONS"]["server_side_binding"] is True
    where = {"HOST", "PORT", "TEST"}
    assert {k: v for k, v in replica.items() if k not in where} == {
        k: v for k, v in primary.items() if k not in where
    }


def test_the_replicas_options_follow_db_pooler() -> None:
    direct, _ = databases_and_routers(DATABASE_URL=PRIMARY_URL, DATABASE_REPLICA_URL=REPLICA_URL)
    pooled, _ = databases_and_routers(
        DATABASE_URL=PRIMARY_URL, DATABASE_REPLICA_URL=REPLICA_URL, DB_POOLER="pgbouncer"
    )

    direct_options = direct[REPLICA_DB_ALIAS]["OPTIONS"]
    assert direct_options["prepare_threshold"] == 5
    assert "-c statement_timeout=5000" in direct_options["options"]
    assert direct[REPLICA_DB_ALIAS]["DISABLE_SERVER_SIDE_CURSORS"] is False
    pooled_options = pooled[REPLICA_DB_ALIAS]["OPTIONS"]
    assert pooled_options["prepare_threshold"] is None
    assert "options" not in pooled_options
    assert pooled[REPLICA_DB_ALIAS]["DISABLE_SERVER_SIDE_CURSORS"] is True


def test_a_replica_url_without_a_database_url_is_refused() -> None:
    done = settings_of(DATABASE_REPLICA_URL=REPLICA_URL)

    assert done.returncode != 0
    assert "DATABASE_REPLICA_URL names a replica of DATABASE_URL's PostgreSQL" in done.stderr


# The router itself


def test_reads_go_to_the_replica_only_inside_reads_from_replica() -> None:
    router = ReplicaRouter()

    assert router.db_for_read(Coupon) is None
    with reads_from_replica():
        assert router.db_for_read(Coupon) == REPLICA_DB_ALIAS
        assert router.db_for_read(ClaimHistory) == REPLICA_DB_ALIAS
    assert router.db_for_read(Coupon) is None
    with pytest.raises(ZeroDivisionError), reads_from_replica():
        1 / 0  # noqa: B018
    assert router.db_for_read(Coupon) is None


def test_reads_from_replica_is_one_threads_alone() -> None:
    router = ReplicaRouter()
    seen_by_another_thread: list[str | None] = []

    with reads_from_replica():
        other = threading.Thread(
            target=lambda: seen_by_another_thread.append(router.db_for_read(Coupon))
        )
        other.start()
        other.join()

    assert seen_by_another_thread == [None]


def test_writes_are_left_to_the_primary_and_only_the_primary_is_migrated() -> None:
    router = ReplicaRouter()

    assert not hasattr(router, "db_for_write")  # Django's default: the primary.
    assert router.allow_migrate(DEFAULT_DB_ALIAS, "coupons") is True
    assert router.allow_migrate(REPLICA_DB_ALIAS, "coupons") is False


def test_objects_of_the_primary_and_the_replica_may_be_related() -> None:
    router = ReplicaRouter()
    on_primary, on_replica, unsaved = Coupon(), Coupon(), Coupon()
    on_primary._state.db, on_replica._state.db = DEFAULT_DB_ALIAS, REPLICA_DB_ALIAS

    assert router.allow_relation(on_primary, on_replica) is True
    assert router.allow_relation(on_replica, on_replica) is True
    assert router.allow_relation(on_primary, unsaved) is None
