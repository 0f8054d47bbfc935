"""The promises of SPEC §7, over real HTTP against real gunicorn workers and instances.

Races are probabilistic, so every scenario runs for many rounds on fresh coupons.
"""

import datetime
import random
import subprocess
import sys
import threading
import uuid
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer, Response, claim_request, concurrently, status_counts

ROUNDS = 20


@pytest.fixture(params=["one instance", "two instances"])
def servers(request: pytest.FixtureRequest, all_servers: list[LiveServer]) -> list[LiveServer]:
    return all_servers[:1] if request.param == "one instance" else all_servers


def fresh_coupon(server: LiveServer, amount: int, stock_shards: int = 1) -> str:
    name = f"FLASH_{uuid.uuid4().hex[:12]}"
    server.create_coupon(name, amount, stock_shards)
    return name


def flash_sale_violations(
    server: LiveServer, name: str, stock: int, responses: Sequence[Response]
) -> list[str]:
    """Everything wrong with the outcome of concurrent claims by distinct users."""
    problems = []
    winners = [response.body["user_id"] for response in responses if response.status == 201]
    losers = [response for response in responses if response.status != 201]
    expected_winners = min(stock, len(responses))
    if len(winners) != expected_winners:
        problems.append(f"{len(winners)} claims succeeded on stock {stock}")
    for response in losers:
        if response.status != 409 or response.body["error"]["code"] != "out_of_stock":
            problems.append(f"a losing claim was answered {response.status} {response.body}")
    details = server.details(name)
    if details["remaining_amount"] != stock - len(details["claimed_by"]):
        problems.append(f"inconsistent details {details}")
    if details["remaining_amount"] < 0 or len(set(details["claimed_by"])) != len(
        details["claimed_by"]
    ):
        problems.append(f"impossible details {details}")
    if sorted(details["claimed_by"]) != sorted(winners):
        problems.append(f"claimed_by {details['claimed_by']} is not the winners {winners}")
    return problems


def run_flash_sale(
    servers: Sequence[LiveServer], *, stock: int, shoppers: int, stock_shards: int = 1
) -> list[str]:
    name = fresh_coupon(servers[0], stock, stock_shards)
    responses = concurrently(
        servers, [claim_request(f"shopper-{index}", name) for index in range(shoppers)]
    )
    return flash_sale_violations(servers[0], name, stock, responses)


def test_flash_sale_of_50_shoppers_on_stock_5_has_exactly_5_winners(
    servers: list[LiveServer], stock_shards: int
) -> None:
    for round_number in range(ROUNDS):
        violations = run_flash_sale(servers, stock=5, shoppers=50, stock_shards=stock_shards)
        assert violations == [], f"round {round_number}"


@pytest.mark.parametrize("stock", [10, 1])
def test_ten_concurrent_claims_by_one_user_give_one_unit(
    servers: list[LiveServer], stock: int, stock_shards: int
) -> None:
    for round_number in range(ROUNDS):
        name = fresh_coupon(servers[0], stock, stock_shards)
        responses = concurrently(servers, [claim_request("same-user", name)] * 10)

        assert status_counts(responses) == {201: 1, 409: 9}, f"round {round_number}"
        # Even when that one claim took the last unit: holding it is checked first.
        assert live.error_codes(responses) == {"already_claimed": 9}
        assert servers[0].details(name) == {
            "name": name,
            "amount": stock,
            "remaining_amount": stock - 1,
            "claimed_by": ["same-user"],
        }


def test_hundreds_of_concurrent_shoppers_never_oversell(
    all_servers: list[LiveServer], stock_shards: int
) -> None:
    for round_number in range(3):
        violations = run_flash_sale(all_servers, stock=100, shoppers=400, stock_shards=stock_shards)
        assert violations == [], f"round {round_number}"


def test_shoppers_retrying_concurrently_get_one_unit_each(
    all_servers: list[LiveServer], stock_shards: int
) -> None:
    name = fresh_coupon(all_servers[0], 15, stock_shards)
    users = [f"retrier-{index}" for index in range(20)]
    responses = concurrently(all_servers, [claim_request(user, name) for user in users * 10])

    winners = [response.body["user_id"] for response in responses if response.status == 201]
    assert len(winners) == 15
    assert len(set(winners)) == 15
    assert set(live.error_codes(responses)) <= {"already_claimed", "out_of_stock"}
    details = all_servers[0].details(name)
    assert sorted(details["claimed_by"]) == sorted(winners)
    assert details["remaining_amount"] == 0


def test_every_read_is_one_consistent_snapshot_while_claims_commit(
    all_servers: list[LiveServer], stock_shards: int
) -> None:
    name = fresh_coupon(all_servers[0], 300, stock_shards)
    claims = [claim_request(f"reader-test-{index}", name) for index in range(300)]
    claiming = threading.Thread(target=concurrently, args=(all_servers, claims))
    claiming.start()
    snapshots: list[dict[str, Any]] = []
    while claiming.is_alive() or not snapshots:
        snapshots.append(all_servers[-1].details(name))
    claiming.join()
    snapshots.append(all_servers[0].details(name))

    previous: list[str] = []
    for details in snapshots:
        claimed_by = details["claimed_by"]
        assert details["remaining_amount"] == details["amount"] - len(claimed_by), details
        assert len(set(claimed_by)) == len(claimed_by)
        # Claims only accumulate, each where it stands in the order the units were taken.
        assert [user for user in claimed_by if user in set(previous)] == previous
        if stock_shards == 1:
            # One lock: claims commit in the order they take their units, so the list only
            # grows at its end. With shards, a claim may commit after one that took its unit
            # later, on another shard, and then shows up before it.
            assert claimed_by[: len(previous)] == previous
        previous = claimed_by
    assert snapshots[-1]["remaining_amount"] == 0


def test_the_flash_sale_check_catches_a_claim_without_a_lock() -> None:
    # A database of its own: the unsafe claim oversells, which other tests' audits would see.
    with live.postgres_database("coupons_unsafe") as database_url:
        environment = live.environment_for(database_url)
        live.migrate(environment)
        with live.gunicorn(
            environment, application="coupons.tests.unsafe_claim_wsgi:application"
        ) as unsafe_server:
            rounds = [run_flash_sale([unsafe_server], stock=5, shoppers=50) for _ in range(5)]

    assert any(violations for violations in rounds), "the unsafe claim was never caught"
    assert any("succeeded on stock 5" in problem for violations in rounds for problem in violations)


# Beyond the contract: retried claims, revocations and sale windows, under the same load.


def test_concurrent_retries_of_one_claim_take_one_unit(
    servers: list[LiveServer], stock_shards: int
) -> None:
    for round_number in range(ROUNDS // 2):
        name = fresh_coupon(servers[0], 5, stock_shards)
        retries = [claim_request("retrier", name, f"order-{name}")] * 10

        responses = concurrently(servers, retries)

        assert status_counts(responses) == {201: 10}, f"round {round_number}"
        replayed = [response.headers.get("idempotent-replayed") for response in responses]
        assert sorted(replayed, key=str) == [None] + ["true"] * 9
        assert all(response.body == responses[0].body for response in responses)
        details = servers[0].details(name)
        assert (details["remaining_amount"], details["claimed_by"]) == (4, ["retrier"])


def test_one_key_sent_by_many_users_at_once_claims_for_one(
    servers: list[LiveServer], stock_shards: int
) -> None:
    for round_number in range(ROUNDS // 4):
        name = fresh_coupon(servers[0], 5, stock_shards)
        key = f"shared-{name}"
        responses = concurrently(servers, [claim_request(f"u{n}", name, key) for n in range(10)])

        assert status_counts(responses) == {201: 1, 422: 9}, f"round {round_number}"
        assert live.error_codes(responses) == {"idempotency_key_reused": 9}
        winner = next(response.body["user_id"] for response in responses if response.status == 201)
        assert servers[0].details(name)["claimed_by"] == [winner]


@pytest.fixture(params=["postgresql", "sqlite"])
def servers_and_environment(
    request: pytest.FixtureRequest,
) -> tuple[list[LiveServer], dict[str, str]]:
    servers: list[LiveServer] = request.getfixturevalue(f"{request.param}_servers")
    prefix = {"postgresql": "postgres", "sqlite": "sqlite"}[request.param]
    environment: dict[str, str] = request.getfixturevalue(f"{prefix}_environment")
    return servers, environment


def test_revocations_racing_claims_keep_every_counter_true(
    servers_and_environment: tuple[list[LiveServer], dict[str, str]], stock_shards: int
) -> None:
    servers, environment = servers_and_environment
    name = fresh_coupon(servers[0], 10, stock_shards)
    users = [f"storm-{index}" for index in range(20)]
    claims = [claim_request(user, name) for user in users] * 3
    path = f"/api/coupons/{quote(name, safe='')}/claims"
    revocations = [("DELETE", f"{path}/{user}", None) for user in users] * 2
    storm: list[live.Request] = [*claims, *revocations]
    random.Random(7).shuffle(storm)

    responses = concurrently(servers, storm)

    assert set(status_counts(responses)) <= {201, 204, 404, 409}, status_counts(responses)
    assert set(live.error_codes(responses)) <= {
        "already_claimed",
        "out_of_stock",
        "claim_not_found",
    }
    details = servers[0].details(name)
    assert details["remaining_amount"] == 10 - len(details["claimed_by"]) >= 0
    assert len(set(details["claimed_by"])) == len(details["claimed_by"])
    audit = subprocess.run(
        [sys.executable, "manage.py", "audit_coupons"],
        cwd=live.PROJECT_DIR,
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    assert audit.returncode == 0, audit.stderr


def test_claims_racing_the_edges_of_a_sale_window_are_made_only_inside_it(
    all_servers: list[LiveServer],
) -> None:
    name = f"WINDOW_{uuid.uuid4().hex[:12]}"
    starts = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1)
    ends = starts + datetime.timedelta(seconds=1)
    created = all_servers[0].request(
        "POST",
        "/api/coupons",
        {
            "name": name,
            "amount": 100_000,
            "starts_at": starts.isoformat(),
            "ends_at": ends.isoformat(),
        },
    )
    assert created.status == 201, created
    responses: list[Response] = []

    def shopper(number: int) -> None:
        server = all_servers[number % len(all_servers)]
        for attempt in range(2_000):  # Bounded; the sale is over well before.
            response = server.request(
                "POST", "/api/coupons/claim", claim_body(number, attempt, name)
            )
            responses.append(response)
            if response.status == 409 and response.body["error"]["code"] == "sale_ended":
                return

    shoppers = [threading.Thread(target=shopper, args=(number,)) for number in range(6)]
    for thread in shoppers:
        thread.start()
    for thread in shoppers:
        thread.join(timeout=60)

    codes = live.error_codes(responses)
    winners = [response.body for response in responses if response.status == 201]
    assert codes["sale_not_started"] and codes["sale_ended"] and winners, codes
    assert set(codes) == {"sale_not_started", "sale_ended"}
    for claim in winners:
        assert starts <= datetime.datetime.fromisoformat(claim["claimed_at"]) < ends, claim
    details = all_servers[0].details(name)
    assert sorted(details["claimed_by"]) == sorted(claim["user_id"] for claim in winners)
    assert details["remaining_amount"] == 100_000 - len(winners)


def claim_body(number: int, attempt: int, coupon_name: str) -> dict[str, str]:
    return {"user_id": f"shopper-{number}-{attempt}", "coupon_name": coupon_name}
