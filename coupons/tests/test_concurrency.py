"""The promises of SPEC §7, over real HTTP against real gunicorn workers and instances.

Races are probabilistic, so every scenario runs for many rounds on fresh coupons.
"""

import threading
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from coupons.tests import live
from coupons.tests.live import LiveServer, Response, claim_request, concurrently, status_counts

ROUNDS = 20


@pytest.fixture(params=["postgresql", "sqlite"])
def all_servers(request: pytest.FixtureRequest) -> list[LiveServer]:
    servers: list[LiveServer] = request.getfixturevalue(f"{request.param}_servers")
    return servers


@pytest.fixture(params=["one instance", "two instances"])
def servers(request: pytest.FixtureRequest, all_servers: list[LiveServer]) -> list[LiveServer]:
    return all_servers[:1] if request.param == "one instance" else all_servers


def fresh_coupon(server: LiveServer, amount: int) -> str:
    name = f"FLASH_{uuid.uuid4().hex[:12]}"
    server.create_coupon(name, amount)
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


def run_flash_sale(servers: Sequence[LiveServer], *, stock: int, shoppers: int) -> list[str]:
    name = fresh_coupon(servers[0], stock)
    responses = concurrently(
        servers, [claim_request(f"shopper-{index}", name) for index in range(shoppers)]
    )
    return flash_sale_violations(servers[0], name, stock, responses)


def test_flash_sale_of_50_shoppers_on_stock_5_has_exactly_5_winners(
    servers: list[LiveServer],
) -> None:
    for round_number in range(ROUNDS):
        assert run_flash_sale(servers, stock=5, shoppers=50) == [], f"round {round_number}"


@pytest.mark.parametrize("stock", [10, 1])
def test_ten_concurrent_claims_by_one_user_give_one_unit(
    servers: list[LiveServer], stock: int
) -> None:
    for round_number in range(ROUNDS):
        name = fresh_coupon(servers[0], stock)
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


def test_hundreds_of_concurrent_shoppers_never_oversell(all_servers: list[LiveServer]) -> None:
    for round_number in range(3):
        violations = run_flash_sale(all_servers, stock=100, shoppers=400)
        assert violations == [], f"round {round_number}"


def test_shoppers_retrying_concurrently_get_one_unit_each(all_servers: list[LiveServer]) -> None:
    name = fresh_coupon(all_servers[0], 15)
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
    all_servers: list[LiveServer],
) -> None:
    name = fresh_coupon(all_servers[0], 300)
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
        # Claims only accumulate, in the order they were recorded.
        assert claimed_by[: len(previous)] == previous
        previous = claimed_by
    assert snapshots[-1]["remaining_amount"] == 0


def test_the_flash_sale_check_catches_a_claim_without_a_lock(
    postgres_environment: dict[str, str],
) -> None:
    with live.gunicorn(
        postgres_environment, application="coupons.tests.unsafe_claim_wsgi:application"
    ) as unsafe_server:
        rounds = [run_flash_sale([unsafe_server], stock=5, shoppers=50) for _ in range(5)]

    assert any(violations for violations in rounds), "the unsafe claim was never caught"
    assert any("succeeded on stock 5" in problem for violations in rounds for problem in violations)
