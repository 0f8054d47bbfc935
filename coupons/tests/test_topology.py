"""Many app instances behind a real balancer, on one database, directly and through a real
transaction-pooling PgBouncer: the promises of SPEC §7 hold across instances, and the
service's settings behind PgBouncer are what it needs.

Two gunicorn instances run behind Debian's HAProxy with deploy/haproxy.cfg (round robin,
health checks on /readyz); through PgBouncer, Debian's, with deploy/pgbouncer.ini, fewer
server connections than app workers and each transaction handed to the server connection
idle longest, so that anything left on a session by one transaction is missed by the next.
"""

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import psycopg
import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer, claim_history_problems, claim_request, concurrently
from coupons.tests.test_concurrency import flash_sale_violations, fresh_coupon
from coupons.tests.topology import PgBouncer, haproxy, pgbouncer, required_program

ROUNDS = 5
WORKERS = 2  # Per instance.
POOL_SIZE = 2  # PgBouncer's server connections, fewer than the instances' workers.


@dataclass
class Topology:
    balancer: LiveServer
    instances: list[LiveServer]
    environment: dict[str, str]  # The app's.
    database_url: str  # The database itself, not through PgBouncer.
    pgbouncer: PgBouncer | None


@contextmanager
def running_topology(*, through_pgbouncer: bool) -> Iterator[Topology]:
    """Two instances behind HAProxy on a new database, through PgBouncer if asked."""
    for program in ("haproxy", "pgbouncer"):
        required_program(program)
    with ExitStack() as stack:
        database_url = stack.enter_context(live.postgres_database("coupons_topology"))
        environment = live.environment_for(database_url)
        live.migrate(environment)
        bouncer = None
        if through_pgbouncer:
            bouncer = stack.enter_context(
                pgbouncer(database_url, default_pool_size=str(POOL_SIZE), server_round_robin="1")
            )
            environment = {**environment, "DATABASE_URL": bouncer.url(), "DB_POOLER": "pgbouncer"}
        instances = [
            stack.enter_context(live.gunicorn(environment, workers=WORKERS)) for _ in range(2)
        ]
        balancer = stack.enter_context(haproxy(instances))
        yield Topology(balancer, instances, environment, database_url, bouncer)


@pytest.fixture(scope="module")
def direct_topology() -> Iterator[Topology]:
    with running_topology(through_pgbouncer=False) as topology:
        yield topology


@pytest.fixture(scope="module")
def pooled_topology() -> Iterator[Topology]:
    with running_topology(through_pgbouncer=True) as topology:
        yield topology


@pytest.fixture(params=["direct", "through PgBouncer"])
def topology(request: pytest.FixtureRequest) -> Topology:
    name = "direct_topology" if request.param == "direct" else "pooled_topology"
    chosen: Topology = request.getfixturevalue(name)
    return chosen


def claims_answered(instance: LiveServer) -> float:
    """Claims this instance answered, whatever the outcome, from its own /metrics."""
    connection = http.client.HTTPConnection(instance.host, instance.port, timeout=30)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("coupons_claims_total{")
    )


def test_a_flash_sale_through_the_balancer_has_exactly_its_stock_in_winners(
    topology: Topology, stock_shards: int
) -> None:
    balancer = topology.balancer
    before = [claims_answered(instance) for instance in topology.instances]

    for round_number in range(ROUNDS):
        name = fresh_coupon(balancer, 5, stock_shards)
        shoppers = [f"shopper-{index}" for index in range(50)]
        responses = concurrently([balancer], [claim_request(user, name) for user in shoppers])

        assert flash_sale_violations(balancer, name, 5, responses) == [], f"round {round_number}"
        problems = claim_history_problems(
            balancer,
            name,
            list(zip(shoppers, responses, strict=True)),
            topology.environment,
            run_audit=round_number == ROUNDS - 1,
        )
        assert problems == [], f"round {round_number}"

    # Round robin: each instance answered its share of the claims.
    answered = [
        claims_answered(instance) - earlier
        for instance, earlier in zip(topology.instances, before, strict=True)
    ]
    assert sum(answered) == ROUNDS * 50
    assert min(answered) >= sum(answered) / 4, answered


@pytest.mark.parametrize("stock", [10, 1])
def test_one_user_claiming_ten_times_at_once_through_the_balancer_gets_one_unit(
    topology: Topology, stock: int, stock_shards: int
) -> None:
    balancer = topology.balancer
    for round_number in range(ROUNDS):
        name = fresh_coupon(balancer, stock, stock_shards)

        responses = concurrently([balancer], [claim_request("same-user", name)] * 10)

        assert live.status_counts(responses) == {201: 1, 409: 9}, f"round {round_number}"
        assert live.error_codes(responses) == {"already_claimed": 9}
        assert balancer.details(name) == {
            "name": name,
            "amount": stock,
            "remaining_amount": stock - 1,
            "claimed_by": ["same-user"],
        }
        problems = claim_history_problems(
            balancer,
            name,
            [("same-user", response) for response in responses],
            topology.environment,
            run_audit=round_number == ROUNDS - 1,
        )
        assert problems == [], f"round {round_number}"


def test_pgbouncer_serves_every_app_worker_on_fewer_server_connections(
    pooled_topology: Topology,
) -> None:
    bouncer = pooled_topology.pgbouncer
    assert bouncer is not None
    name = fresh_coupon(pooled_topology.balancer, 10)
    shoppers = [claim_request(f"pooled-{index}", name) for index in range(40)]

    responses = concurrently([pooled_topology.balancer], shoppers)

    assert live.status_counts(responses) == {201: 10, 409: 30}
    # Every worker keeps its connection to PgBouncer; PostgreSQL sees only the pool.
    clients = [row for row in bouncer.show("CLIENTS") if row["database"] == bouncer.database]
    assert len(clients) > POOL_SIZE, clients
    with psycopg.connect(pooled_topology.database_url, autocommit=True) as direct:
        database = direct.execute("SELECT current_database()").fetchone()
        sessions = direct.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s"
            " AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
            database,
        ).fetchone()
    assert sessions is not None and sessions[0] <= POOL_SIZE, sessions


# What the app's own connections see: its settings in a process of its own, as a server has.
SESSION_SETTINGS = """
import json
from django.db import connection
with connection.cursor() as cursor:
    seen = []
    for _ in range(6):
        cursor.execute(
            "SELECT current_setting('statement_timeout'),"
            " current_setting('idle_in_transaction_session_timeout'), pg_backend_pid()"
        )
        seen.append(cursor.fetchone())
print(json.dumps(seen))
"""


def app_sessions(environment: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return live.run_manage(environment, "shell", "-c", SESSION_SETTINGS)


def test_behind_pgbouncer_every_session_the_app_lands_on_has_its_timeouts(
    pooled_topology: Topology,
) -> None:
    bouncer = pooled_topology.pgbouncer
    assert bouncer is not None
    # given: PgBouncer holds as many server connections as it may, all idle
    with ExitStack() as held:
        for _ in range(POOL_SIZE):
            # Inside a transaction, committed on leaving: each holds a server connection.
            held.enter_context(psycopg.connect(bouncer.url())).execute("SELECT 1")
    idle = [row for row in bouncer.show("SERVERS") if row["database"] == bouncer.database]
    assert len(idle) == POOL_SIZE, idle
    direct = app_sessions(live.environment_for(pooled_topology.database_url))

    pooled = app_sessions(pooled_topology.environment)

    assert (direct.returncode, pooled.returncode) == (0, 0), direct.stderr + pooled.stderr
    direct_rows = json.loads(direct.stdout.splitlines()[-1])
    pooled_rows = json.loads(pooled.stdout.splitlines()[-1])
    timeouts = {(statement, idle) for statement, idle, _ in direct_rows}
    assert timeouts == {("5s", "10s")}
    # One app connection, its statements on several server sessions, each with the timeouts.
    assert len({pid for *_, pid in pooled_rows}) > 1, pooled_rows
    assert {(statement, idle) for statement, idle, _ in pooled_rows} == timeouts


def test_without_the_pooler_switch_pgbouncer_refuses_the_apps_connection(
    pooled_topology: Topology,
) -> None:
    environment = {**pooled_topology.environment}
    del environment["DB_POOLER"]

    refused = app_sessions(environment)

    assert refused.returncode != 0
    assert "unsupported startup parameter: options" in refused.stderr


def database_settings(**environment: str) -> subprocess.CompletedProcess[str]:
    """The DATABASES the settings make of this environment, as JSON, or their error."""
    code = "import json; from couponsite import settings; print(json.dumps(settings.DATABASES))"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=live.PROJECT_DIR,
        env={**live.environment_for("postgres://app@pgbouncer:6432/coupons"), **environment},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_pooler_switch_turns_off_what_cannot_outlive_a_transaction() -> None:
    direct = json.loads(database_settings().stdout)["default"]
    pooled = json.loads(database_settings(DB_POOLER="pgbouncer").stdout)["default"]

    assert direct["OPTIONS"]["prepare_threshold"] == 5
    assert "statement_timeout" in direct["OPTIONS"]["options"]
    assert direct["DISABLE_SERVER_SIDE_CURSORS"] is False
    assert pooled["OPTIONS"]["prepare_threshold"] is None
    assert "options" not in pooled["OPTIONS"]
    assert pooled["DISABLE_SERVER_SIDE_CURSORS"] is True
    # Unchanged: parameters sent apart from the SQL, the connection kept, the connect timeout.
    for name in ("server_side_binding", "connect_timeout"):
        assert pooled["OPTIONS"][name] == direct["OPTIONS"][name]
    assert pooled["CONN_MAX_AGE"] == direct["CONN_MAX_AGE"]


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"DB_POOLER": "pgpool"}, "DB_POOLER must be none or pgbouncer"),
        (
            {"DB_POOLER": "pgbouncer", "DB_STATEMENT_TIMEOUT_MS": "1000"},
            "cannot reach PostgreSQL through PgBouncer",
        ),
    ],
    ids=["an unknown pooler", "a timeout PgBouncer would drop"],
)
def test_the_pooler_switch_refuses_what_it_cannot_honour(
    environment: dict[str, str], message: str
) -> None:
    refused = database_settings(**environment)

    assert refused.returncode != 0
    assert message in refused.stderr
