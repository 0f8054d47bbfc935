"""Scenarios B1–B4 of issue 3: each run uses a fresh coupon, measures, then verifies it."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers import PgbenchResult, Tools, WrkResult, run_pgbench, run_wrk
from harness import (
    BENCH_DIR,
    Api,
    Service,
    coupon_path,
    peak_worker_rss_kib,
    reset_peak_rss,
    running_service,
    sql,
)

CONNECTIONS = 64
WRK_THREADS = 2
CLAIMS_CAP_S = 60  # wrk's -d for a fixed number of claims: the run ends when they are answered.
PGBENCH_CLIENTS = 10
# Issue 3's figure for a bare Django view answering 409 on its reference machine.
YARDSTICK_REFERENCE_PER_S = 4_450


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is."""

    b1_stock: int
    b1_claims: int
    b2_stock: int
    b2_window_s: int
    b3_claims: int
    b3_read_s: int
    b4_stock: int
    b4_seconds: int
    yardstick_s: int


FULL = Sizes(
    b1_stock=1_000,
    b1_claims=20_000,
    b2_stock=200_000,
    b2_window_s=20,
    b3_claims=100_000,
    b3_read_s=10,
    b4_stock=2_000_000,
    b4_seconds=15,
    yardstick_s=5,
)
QUICK = Sizes(
    b1_stock=100,
    b1_claims=4_000,
    b2_stock=200_000,
    b2_window_s=5,
    b3_claims=20_000,
    b3_read_s=5,
    b4_stock=2_000_000,
    b4_seconds=5,
    yardstick_s=3,
)


@dataclass(frozen=True)
class Context:
    """What every scenario needs: the tools, the running service and its database."""

    tools: Tools
    service: Service
    database_url: str
    sizes: Sizes
    tag: str  # Digits unique to this invocation (pgbench puts it in SQL): names coupons, users.

    @property
    def api(self) -> Api:
        """A client of the service."""
        return Api(self.service.port)

    def url(self, path: str) -> str:
        """The service's URL of a path."""
        return f"http://127.0.0.1:{self.service.port}{path}"


@dataclass
class RunResult:
    """One run of one scenario: figures for the table, raw counts, verification failures."""

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    other_work: float = 0.0  # Share of the CPUs that work other than the bench's took.


# Verification


def snapshot_problems(doc: dict[str, Any]) -> list[str]:
    """Check that a details document is one consistent snapshot without duplicates."""
    problems = []
    claimed_by = doc["claimed_by"]
    if doc["remaining_amount"] != doc["amount"] - len(claimed_by):
        problems.append(
            f"remaining_amount {doc['remaining_amount']} != amount {doc['amount']} "
            f"- {len(claimed_by)} claimed"
        )
    if len(set(claimed_by)) != len(claimed_by):
        problems.append(f"{len(claimed_by) - len(set(claimed_by))} duplicate users in claimed_by")
    return problems


def answer_problems(results: list[WrkResult]) -> list[str]:
    """Check wrk's answers to claims by never-seen users: only 201 or 409 out_of_stock."""
    problems = []
    server_errors = sum(result.server_errors for result in results)
    socket_errors = sum(result.socket_errors for result in results)
    if server_errors:
        problems.append(f"{server_errors} answers were 5xx")
    if socket_errors:
        problems.append(f"{socket_errors} socket errors or timeouts: {[r.errors for r in results]}")
    unexpected = {
        status: count
        for result in results
        for status, count in result.statuses.items()
        if status not in {201, 409}
    }
    if unexpected:
        problems.append(f"unexpected statuses {unexpected}")
    wrong_codes = {
        code: count
        for result in results
        for code, count in result.codes.items()
        if code != "out_of_stock" and code != "none"
    }
    if wrong_codes:
        problems.append(f"unexpected error codes for never-seen users: {wrong_codes}")
    return problems


def claim_problems(api: Api, name: str, stock: int, results: list[WrkResult]) -> list[str]:
    """Read the coupon back and check it against what wrk saw.

    winners == min(stock, claims answered) when every claim sent was answered; claims in
    flight when wrk stopped (unanswered) may have won too, and are allowed for.
    """
    doc, _ = api.coupon(name)
    problems = answer_problems(results) + snapshot_problems(doc)
    winners = len(doc["claimed_by"])
    wins_seen = sum(result.statuses.get(201, 0) for result in results)
    answered = sum(result.answered for result in results)
    unanswered = sum(result.unanswered for result in results)
    if doc["amount"] != stock:
        problems.append(f"amount {doc['amount']} != stock {stock}")
    if not min(stock, answered) <= winners <= min(stock, answered + unanswered):
        problems.append(
            f"{winners} winners, expected min(stock {stock}, answered {answered}"
            f" + up to {unanswered} in flight)"
        )
    if not wins_seen <= winners <= wins_seen + unanswered:
        problems.append(f"{winners} winners recorded but {wins_seen} answered 201")
    return problems


# Helpers


def claim_load(
    tools: Tools, port: int, name: str, prefix: str, *, claims: int = 0, seconds: int
) -> WrkResult:
    """Claim the coupon with wrk on the service at 127.0.0.1:port: a number of claims
    (seconds is then a cap), or for seconds."""
    return run_wrk(
        tools,
        f"http://127.0.0.1:{port}/api/coupons/claim",
        connections=CONNECTIONS,
        threads=WRK_THREADS,
        duration_s=seconds,
        script="claim.lua",
        script_args=[name, prefix, str(claims)],
    )


def with_peak_rss(
    scenario: Callable[[Context, int], RunResult],
) -> Callable[[Context, int], RunResult]:
    """Wrap a scenario so that its result carries the workers' peak RSS during the run."""

    def measured(ctx: Context, run: int) -> RunResult:
        reset_peak_rss(ctx.service.pid)
        result = scenario(ctx, run)
        result.metrics["peak_rss_mib"] = peak_worker_rss_kib(ctx.service.pid) / 1024
        return result

    measured.__doc__ = scenario.__doc__
    return measured


def wrk_details(result: WrkResult) -> dict[str, Any]:
    """Raw counts of a wrk run, for the JSON results."""
    return {
        "requests": result.requests,
        "sent": result.sent,
        "duration_s": round(result.duration_s, 3),
        "latency_ms": result.latency_ms,
        "statuses": result.statuses,
        "codes": result.codes,
        "errors": result.errors,
    }


# Scenarios


def warm_up(ctx: Context) -> list[str]:
    """Claim for a few seconds so every worker has loaded its code and opened its connection."""
    name = f"warmup-{ctx.tag}"
    ctx.api.create_coupon(name, 1_000_000)
    result = claim_load(ctx.tools, ctx.service.port, name, f"w{ctx.tag}", seconds=3)
    return claim_problems(ctx.api, name, 1_000_000, [result])


@with_peak_rss
def hot_coupon(ctx: Context, run: int) -> RunResult:
    """B1: a fixed number of claims by distinct users on a small stock; most are refused."""
    stock, claims = ctx.sizes.b1_stock, ctx.sizes.b1_claims
    name = f"b1-{ctx.tag}-{run}"
    ctx.api.create_coupon(name, stock)
    result = claim_load(
        ctx.tools, ctx.service.port, name, f"b1{ctx.tag}r{run}", claims=claims, seconds=CLAIMS_CAP_S
    )
    problems = claim_problems(ctx.api, name, stock, [result])
    if result.requests < claims:
        problems.append(
            f"only {result.requests} of {claims} claims answered within {CLAIMS_CAP_S} s"
        )
    return RunResult(
        metrics={
            "answered_per_s": result.answered / result.duration_s,
            "p50_ms": result.latency_ms["p50"],
            "p99_ms": result.latency_ms["p99"],
            "winners": result.statuses.get(201, 0),
        },
        details=wrk_details(result),
        problems=problems,
    )


@with_peak_rss
def every_claim_wins(ctx: Context, run: int) -> RunResult:
    """B2: claims on a stock too big to run out, two windows back to back on one coupon."""
    stock, seconds = ctx.sizes.b2_stock, ctx.sizes.b2_window_s
    name = f"b2-{ctx.tag}-{run}"
    ctx.api.create_coupon(name, stock)
    first = claim_load(ctx.tools, ctx.service.port, name, f"b2{ctx.tag}r{run}a", seconds=seconds)
    second = claim_load(ctx.tools, ctx.service.port, name, f"b2{ctx.tag}r{run}b", seconds=seconds)
    first_rate = first.statuses.get(201, 0) / first.duration_s
    second_rate = second.statuses.get(201, 0) / second.duration_s
    return RunResult(
        metrics={
            "first_per_s": first_rate,
            "second_per_s": second_rate,
            "ratio": second_rate / first_rate if first_rate else 0.0,
            "p99_ms": max(first.latency_ms["p99"], second.latency_ms["p99"]),
        },
        details={"first": wrk_details(first), "second": wrk_details(second)},
        problems=claim_problems(ctx.api, name, stock, [first, second]),
    )


def seed_claims(database_url: str, name: str, claims: int) -> None:
    """Record `claims` claims (users user_1…user_N) on a coupon in one SQL statement."""
    sql(
        database_url,
        """
        WITH coupon AS (
            UPDATE coupons_coupon SET remaining_amount = amount - %s
            WHERE name = %s RETURNING id
        )
        INSERT INTO coupons_claimhistory (coupon_id, user_id, claimed_at)
        SELECT coupon.id, 'user_' || g, now() FROM coupon, generate_series(1, %s) AS g
        """,
        (claims, name, claims),
    )
    # As autovacuum would shortly after such a load: the planner sees the new rows.
    sql(database_url, "ANALYZE coupons_claimhistory")


@with_peak_rss
def big_read(ctx: Context, run: int) -> RunResult:
    """B3: read a coupon with many claims, one request at a time."""
    claims = ctx.sizes.b3_claims
    name = f"b3-{ctx.tag}-{run}"
    ctx.api.create_coupon(name, claims)
    seed_claims(ctx.database_url, name, claims)
    result = run_wrk(
        ctx.tools,
        ctx.url(coupon_path(name)),
        connections=1,
        threads=1,
        duration_s=ctx.sizes.b3_read_s,
        script="report.lua",
        script_args=[],
    )
    doc, size = ctx.api.coupon(name)
    problems = snapshot_problems(doc)
    if len(doc["claimed_by"]) != claims:
        problems.append(f"{len(doc['claimed_by'])} users in claimed_by, {claims} seeded")
    if result.errors["status"] or result.socket_errors or not result.requests:
        problems.append(f"reads failed: {result.requests} answered, errors {result.errors}")
    return RunResult(
        metrics={
            "median_ms": result.latency_ms["p50"],
            "p99_ms": result.latency_ms["p99"],
            "reads_per_s": result.requests / result.duration_s,
            "body_mb": size / 1e6,
        },
        details=wrk_details(result),
        problems=problems,
    )


def database_ceiling(ctx: Context, run: int) -> RunResult:
    """B4: pgbench runs a winning claim's transaction on one hot row, without the service."""
    stock = ctx.sizes.b4_stock
    name = f"b4-{ctx.tag}-{run}"
    ctx.api.create_coupon(name, stock)
    [(coupon_id,)] = sql(ctx.database_url, "SELECT id FROM coupons_coupon WHERE name = %s", (name,))
    result: PgbenchResult = run_pgbench(
        ctx.tools,
        ctx.database_url,
        clients=PGBENCH_CLIENTS,
        seconds=ctx.sizes.b4_seconds,
        variables={"coupon_id": str(coupon_id), "run": f"{ctx.tag}{run}", "n": "0"},
    )
    doc, _ = ctx.api.coupon(name)
    problems = snapshot_problems(doc)
    if result.failed or len(doc["claimed_by"]) != result.transactions:
        problems.append(
            f"pgbench: {result.transactions} transactions, {result.failed} failed, "
            f"{len(doc['claimed_by'])} claims recorded"
        )
    return RunResult(
        metrics={"tps": result.tps},
        details={"transactions": result.transactions, "failed": result.failed},
        problems=problems,
    )


def yardstick(
    tools: Tools, env: dict[str, str], log_path: Path, seconds: int
) -> tuple[float, list[str]]:
    """Requests per second of a bare Django view answering 409 (bench/yardstick_site.py),
    served by gunicorn's stock sync worker and driven as B1 drives claims; with the reasons
    the run does not count, if any."""
    env = {
        **env,
        "DJANGO_SETTINGS_MODULE": "yardstick_site",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")])),
    }
    with running_service(env, log_path, options=["--worker-class", "sync"]) as service:
        result = claim_load(tools, service.port, "yardstick", "y", seconds=seconds)
    problems = answer_problems([result])
    if result.statuses != {409: result.requests}:
        problems.append(f"the yardstick answered {result.statuses}, not only 409")
    return result.answered / result.duration_s, problems


SCENARIOS: dict[str, Callable[[Context, int], RunResult]] = {
    "B1": hot_coupon,
    "B2": every_claim_wins,
    "B3": big_read,
    "B4": database_ceiling,
}


def scenario_names(text: str) -> list[str]:
    """Parse a comma-separated list of scenarios (an argparse type), e.g. "b1, B3"."""
    names = [name.strip().upper() for name in text.split(",") if name.strip()]
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    return names
