"""The service against a model of it: hypothesis drives random sequences of creating
coupons (on one stock row or over several stock shards), claiming, revoking claims and
changing amounts and stock shards, on gunicorn and PostgreSQL, and a few lines of plain
Python that say what each step should answer and leave behind.

After every step, every coupon's details must be the model's (amount, remaining_amount and
claimed_by, in claim order) and keep the invariants: remaining_amount == amount - claims
>= 0, each user at most once; and its stock must be where its stock shards say (on its row
with one, else in shards numbered 0 to K - 1).

Amounts and stock shards change as an operator changes them in the admin: through
services.change_coupon_amount and services.change_stock_shards, called in this process on
the server's database, since no endpoint offers them. Driving the admin's HTML forms would
test the forms as much as the rule. A change of stock shards changes nothing a client sees:
the model keeps its stock, claimants and amount, and the server's workers, which remember
where a coupon's stock was, must find it where it now is. The server runs without its
sold-out memory (SOLD_OUT_MEMORY_SECONDS=0): a change made outside its processes reaches
that memory only after a second, as documented, which a step-by-step model cannot wait
for (test_services.py covers the memory).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import pytest
from django.db import DEFAULT_DB_ALIAS, connections
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from pytest_django import DjangoDbBlocker

from coupons import services
from coupons.errors import AmountBelowClaimed
from coupons.models import Coupon, StockShard
from coupons.tests import live

# Few names and users, so that steps keep meeting the same coupons and claims. "claim" is
# also the claim route's last segment; a space, non-ASCII or "/" is percent-encoded.
COUPON_NAMES = ["PROMO", "Sale 券", "claim"]
USER_IDS = ["ana", "bo", "Zoë 7", "team/42"]
# Small stocks, so that coupons sell out within a few claims.
AMOUNTS = st.integers(min_value=1, max_value=4)
# One stock row, or shards: fewer, as many as or more than the stock.
SHARD_COUNTS = [1, 2, 4, 16]
STOCK_SHARDS = st.sampled_from(SHARD_COUNTS)

# Sequences and steps: a few thousand requests in all, some tens of seconds.
SEQUENCES = 30
STEPS_PER_SEQUENCE = 35


@dataclass
class ModelCoupon:
    amount: int
    stock_shards: int = 1
    claimed_by: list[str] = field(default_factory=list)

    @property
    def remaining_amount(self) -> int:
        return self.amount - len(self.claimed_by)


def path_of(name: str, *rest: str) -> str:
    return "/".join(["/api/coupons", *(quote(part, safe="") for part in (name, *rest))])


class CouponService(RuleBasedStateMachine):
    """Each step is sent to the server and applied to the model; their answers must agree."""

    server: ClassVar[live.LiveServer]

    def __init__(self) -> None:
        super().__init__()
        self.coupons: dict[str, ModelCoupon] = {}
        # Coupons whose stock shards changed since they were last claimed: a worker may
        # still remember where their stock was.
        self.reshaped: set[str] = set()

    @initialize(
        coupons=st.lists(st.tuples(AMOUNTS, STOCK_SHARDS), min_size=1, max_size=len(COUPON_NAMES))
    )
    def start_with_some_coupons(self, coupons: list[tuple[int, int]]) -> None:
        for coupon_id in Coupon.objects.values_list("pk", flat=True):
            services.delete_coupon(coupon_id=coupon_id)
        for name, (amount, stock_shards) in zip(COUPON_NAMES, coupons, strict=False):
            self.create_coupon(name, amount, stock_shards)

    def send(self, method: str, path: str, body: Any = None) -> live.Response:
        return self.server.request(method, path, body)

    def details_of(self, name: str) -> dict[str, Any]:
        coupon = self.coupons[name]
        return {
            "name": name,
            "amount": coupon.amount,
            "remaining_amount": coupon.remaining_amount,
            "claimed_by": coupon.claimed_by,
        }

    def holders(self) -> list[tuple[str, str]]:
        """Every (coupon name, user id) of a claim, in a stable order."""
        return [(name, user) for name, coupon in self.coupons.items() for user in coupon.claimed_by]

    def claimants(self) -> list[list[str]]:
        return [coupon.claimed_by for coupon in self.coupons.values()]

    def sold_out(self) -> list[str]:
        return [name for name, coupon in self.coupons.items() if coupon.remaining_amount == 0]

    @rule(name=st.sampled_from(COUPON_NAMES), amount=AMOUNTS, stock_shards=STOCK_SHARDS)
    def create_coupon(self, name: str, amount: int, stock_shards: int) -> None:
        body = {"name": name, "amount": amount, "stock_shards": stock_shards}
        response = self.send("POST", "/api/coupons", body)

        if name in self.coupons:
            assert_refused(response, 409, "coupon_exists")
        else:
            self.coupons[name] = ModelCoupon(amount, stock_shards)
            assert response.status == 201, response
            assert response.body == self.details_of(name)

    @rule(user=st.sampled_from(USER_IDS), name=st.sampled_from(COUPON_NAMES))
    def claim(self, user: str, name: str) -> None:
        response = self.send("POST", "/api/coupons/claim", {"user_id": user, "coupon_name": name})

        self.reshaped.discard(name)
        coupon = self.coupons.get(name)
        if coupon is None:
            assert_refused(response, 404, "coupon_not_found")
        elif user in coupon.claimed_by:
            assert_refused(response, 409, "already_claimed")
        elif coupon.remaining_amount == 0:
            assert_refused(response, 409, "out_of_stock")
        else:
            coupon.claimed_by.append(user)
            assert response.status == 201, response
            assert response.body["user_id"] == user
            assert response.body["coupon_name"] == name

    @precondition(lambda self: bool(self.coupons))
    @rule(data=st.data(), user=st.sampled_from(USER_IDS))
    def claim_a_coupon(self, data: st.DataObject, user: str) -> None:
        self.claim(user, data.draw(st.sampled_from(sorted(self.coupons)), label="coupon"))

    @precondition(lambda self: bool(self.holders()))
    @rule(data=st.data())
    def claim_again(self, data: st.DataObject) -> None:
        name, user = data.draw(st.sampled_from(self.holders()), label="holder")
        self.claim(user, name)  # The model answers already_claimed, even when sold out.

    @precondition(lambda self: bool(self.sold_out()))
    @rule(data=st.data())
    def claim_sold_out(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(self.sold_out()), label="sold out")
        newcomers = [user for user in USER_IDS if user not in self.coupons[name].claimed_by]
        if newcomers:
            self.claim(data.draw(st.sampled_from(newcomers), label="newcomer"), name)

    @rule(user=st.sampled_from(USER_IDS), name=st.sampled_from(COUPON_NAMES))
    def revoke(self, user: str, name: str) -> None:
        response = self.send("DELETE", path_of(name, "claims", user))

        coupon = self.coupons.get(name)
        if coupon is None:
            assert_refused(response, 404, "coupon_not_found")
        elif user not in coupon.claimed_by:
            assert_refused(response, 404, "claim_not_found")
        else:
            coupon.claimed_by.remove(user)
            assert response.status == 204, response
            assert response.body is None

    @precondition(lambda self: bool(self.holders()))
    @rule(data=st.data())
    def revoke_a_claim(self, data: st.DataObject) -> None:
        name, user = data.draw(st.sampled_from(self.holders()), label="holder")
        self.revoke(user, name)

    @precondition(lambda self: bool(self.coupons))
    @rule(data=st.data())
    def revoke_a_claim_never_made(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.coupons)), label="coupon")
        outsiders = [user for user in USER_IDS if user not in self.coupons[name].claimed_by]
        if outsiders:
            self.revoke(data.draw(st.sampled_from(outsiders), label="outsider"), name)

    @precondition(lambda self: bool(self.coupons))
    @rule(data=st.data(), amount=st.integers(min_value=1, max_value=6))
    def change_amount(self, data: st.DataObject, amount: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.coupons)), label="coupon")
        self.change_amount_of(name, amount)

    @precondition(lambda self: bool(self.holders()))
    @rule(data=st.data())
    def lower_amount_to_the_claims(self, data: st.DataObject) -> None:
        name, _ = data.draw(st.sampled_from(self.holders()), label="coupon")
        self.change_amount_of(name, len(self.coupons[name].claimed_by))

    @precondition(lambda self: any(len(users) > 1 for users in self.claimants()))
    @rule(data=st.data())
    def lower_amount_below_the_claims(self, data: st.DataObject) -> None:
        names = [name for name, coupon in self.coupons.items() if len(coupon.claimed_by) > 1]
        name = data.draw(st.sampled_from(names), label="coupon")
        self.change_amount_of(name, len(self.coupons[name].claimed_by) - 1)

    @precondition(lambda self: bool(self.sold_out()))
    @rule(data=st.data(), more=st.integers(min_value=1, max_value=3))
    def raise_amount_after_a_sell_out(self, data: st.DataObject, more: int) -> None:
        name = data.draw(st.sampled_from(self.sold_out()), label="sold out")
        self.change_amount_of(name, self.coupons[name].amount + more)

    def change_amount_of(self, name: str, amount: int) -> None:
        """Change the amount as the admin does, through the service, in this process."""
        coupon = self.coupons[name]
        refused = False
        try:
            services.change_coupon_amount(coupon_id=Coupon.objects.get(name=name).pk, amount=amount)
        except AmountBelowClaimed:
            refused = True

        assert refused == (amount < len(coupon.claimed_by)), (name, amount, coupon)
        if not refused:
            coupon.amount = amount

    @precondition(lambda self: bool(self.coupons))
    @rule(data=st.data())
    def change_stock_shards(self, data: st.DataObject) -> None:
        """Split the stock anew as the admin does, through the service, in this process:
        what clients see stays as it was."""
        name = data.draw(st.sampled_from(sorted(self.coupons)), label="coupon")
        coupon = self.coupons[name]
        others = [count for count in SHARD_COUNTS if count != coupon.stock_shards]
        stock_shards = data.draw(st.sampled_from(others), label="stock shards")

        services.change_stock_shards(
            coupon_id=Coupon.objects.get(name=name).pk, stock_shards=stock_shards
        )

        coupon.stock_shards = stock_shards
        self.reshaped.add(name)

    @precondition(lambda self: bool(self.reshaped))
    @rule(data=st.data(), user=st.sampled_from(USER_IDS))
    def claim_a_reshaped_coupon(self, data: st.DataObject, user: str) -> None:
        self.claim(user, data.draw(st.sampled_from(sorted(self.reshaped)), label="reshaped"))

    @rule(user=st.sampled_from(USER_IDS), name=st.sampled_from(COUPON_NAMES))
    def look_up_claim(self, user: str, name: str) -> None:
        response = self.send("GET", path_of(name, "claims", user))

        coupon = self.coupons.get(name)
        if coupon is None:
            assert_refused(response, 404, "coupon_not_found")
        elif user not in coupon.claimed_by:
            assert_refused(response, 404, "claim_not_found")
        else:
            assert response.status == 200, response
            assert (response.body["user_id"], response.body["coupon_name"]) == (user, name)

    @precondition(lambda self: bool(self.coupons))
    @rule(data=st.data())
    def list_claims(self, data: st.DataObject) -> None:
        name = data.draw(st.sampled_from(sorted(self.coupons)), label="coupon")
        response = self.send("GET", path_of(name, "claims"))

        assert response.status == 200, response
        listed = [claim["user_id"] for claim in response.body["results"]]
        assert listed == self.coupons[name].claimed_by

    @invariant()
    def every_coupon_is_as_the_model_says(self) -> None:
        for name in COUPON_NAMES:
            response = self.send("GET", path_of(name))
            if name not in self.coupons:
                assert_refused(response, 404, "coupon_not_found")
                continue
            details = response.body
            assert response.status == 200, response
            assert details == self.details_of(name)
            # The service's own promises, whatever the model says.
            assert details["remaining_amount"] >= 0
            assert details["remaining_amount"] == details["amount"] - len(details["claimed_by"])
            assert len(set(details["claimed_by"])) == len(details["claimed_by"])

    @invariant()
    def every_coupons_stock_is_where_its_stock_shards_say(self) -> None:
        shards: dict[str, list[int]] = {}
        for name, number in StockShard.objects.values_list("coupon__name", "number"):
            shards.setdefault(name, []).append(number)
        stored = {
            coupon.name: (
                coupon.stock_shards,
                coupon.remaining_amount,
                coupon.stock_left - coupon.remaining_amount,
                sorted(shards.get(coupon.name, [])),
            )
            for coupon in Coupon.objects.with_stock()
        }
        assert stored == {
            name: (
                coupon.stock_shards,
                coupon.remaining_amount if coupon.stock_shards == 1 else 0,
                0 if coupon.stock_shards == 1 else coupon.remaining_amount,
                list(range(coupon.stock_shards)) if coupon.stock_shards > 1 else [],
            )
            for name, coupon in self.coupons.items()
        }


def assert_refused(response: live.Response, status: int, code: str) -> None:
    assert (response.status, response.body["error"]["code"]) == (status, code), response


@pytest.fixture(scope="module")
def model_server() -> Iterator[tuple[live.LiveServer, str]]:
    """gunicorn on a PostgreSQL database of its own, without the sold-out memory; and the
    database's URL."""
    with live.postgres_database("coupons_model") as database_url:
        environment = live.environment_for(database_url)
        environment["SOLD_OUT_MEMORY_SECONDS"] = "0"
        live.migrate(environment)
        with live.gunicorn(environment, workers=2) as server:
            yield server, database_url


@contextmanager
def services_on(database_url: str, django_db_blocker: DjangoDbBlocker) -> Iterator[None]:
    """Point this process's default connection at the server's database, for the service
    functions an operator calls there; then back where it was."""
    connection = connections[DEFAULT_DB_ALIAS]
    saved = dict(connection.settings_dict)
    connection.close()
    connection.settings_dict["NAME"] = urlsplit(database_url).path.lstrip("/")
    try:
        with django_db_blocker.unblock():
            yield
    finally:
        connection.close()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)


def test_the_service_answers_and_keeps_what_its_model_says(
    model_server: tuple[live.LiveServer, str], django_db_blocker: DjangoDbBlocker
) -> None:
    server, database_url = model_server
    CouponService.server = server

    with services_on(database_url, django_db_blocker):
        run_state_machine_as_test(
            CouponService,
            settings=settings(
                max_examples=SEQUENCES,
                stateful_step_count=STEPS_PER_SEQUENCE,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
