"""What K stock shards buy one hot coupon at the database, against the network's round trip:
pgbench alone, without the service.

    .venv/bin/python bench/shards_db.py [--delays 0,0.5,2] [--shard-counts 1,4,16]
                                        [--seconds 10] [--clients 32]

It creates the throwaway database coupons_bench_shards on DATABASE_URL's server (default
127.0.0.1:5432; the database DATABASE_URL names is never touched) and migrates it (the
service's tables). Then for each one-way delay D (the round trip is 2 × D) it runs, with
pgbench's prepared protocol, --clients clients and 2 threads, for --seconds each, for
each K of --shard-counts:

- K = 1, bench/claim_rtt.pgbench: a winning claim as the service sends it, on the coupon's
  row, with a \\sleep of one round trip for each of the two the lock is held across;
- K > 1, bench/claim_shard.pgbench: the claim of a coupon with K stock shards
  (coupons_stockshard), each transaction locking one shard with SKIP LOCKED (waiting for
  the first when all are held), as the service does.

Every run gets a coupon of its own, with a stock it cannot use up, and is verified: no
failed transaction, one claim recorded per transaction, the stock left equal to the stock
less the claims. Then it drops the database, prints the table and writes
bench/results/shards-db.json and docs/scaling-shards.svg (bench/latency.py runs this too,
after its app part, and writes both parts to bench/results/latency.json). Exits 1 if a
verification failed, 2 if it could not run. docs/scaling.md reports it.
"""

from __future__ import annotations

import argparse
import datetime
import io
import sys
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cpu_share import CpuShare, children_ticks, postgres_ticks
from drivers import Tools, find_tools, run_pgbench
from harness import (
    BENCH_DIR,
    REPO_DIR,
    BenchError,
    bench_database_url,
    fresh_database,
    migrate,
    service_env,
    sql,
)
from output import grouped_bar_chart, write_json

DATABASE = "coupons_bench_shards"
DELAYS_MS = "0,0.5,2"
SHARD_COUNTS = "1,4,16"
SECONDS = 10
CLIENTS = 32  # Enough to keep 16 shards busy with the lock held across two 4 ms round trips.
STOCK = 100_000_000  # Far more than 10 s of claims can take, at any K.
RESULTS = BENCH_DIR / "results" / "shards-db.json"
CHART = REPO_DIR / "docs" / "scaling-shards.svg"
NOISY = 0.1  # A run during which other work took more of the CPUs than this is flagged.


def numbers(text: str) -> list[float]:
    """Parse a comma-separated list of numbers (an argparse type), e.g. "0,0.5,2"."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"give numbers of at least 0: {text!r}")
    return values


def database_url(name: str) -> str:
    """A throwaway database of that name on the bench's server."""
    return urlunsplit(urlsplit(bench_database_url())._replace(path=f"/{name}"))


def _create_coupon(url: str, name: str, stock: int, shards: int) -> int:
    """A coupon with its stock on its row (shards 1) or split evenly over its shards, as
    services.create_coupon stores it."""
    [(coupon_id,)] = sql(
        url,
        "INSERT INTO coupons_coupon"
        " (name, amount, remaining_amount, stock_shards, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, now(), now()) RETURNING id",
        (name, stock, stock if shards == 1 else 0, shards),
    )
    if shards > 1:
        sql(
            url,
            "INSERT INTO coupons_stockshard (coupon_id, number, remaining_amount) "
            "SELECT %s, number, %s FROM generate_series(0, %s - 1) AS number",
            (coupon_id, stock // shards, shards),
        )
    return int(coupon_id)


def _claims(url: str, coupon_id: int) -> tuple[int, int]:
    """The claims recorded on a coupon, and how many of them waited for a shard."""
    [(claims, waited)] = sql(
        url,
        "SELECT count(*), count(*) FILTER (WHERE split_part(user_id, '-', 2) = '1') "
        "FROM coupons_claimhistory WHERE coupon_id = %s",
        (coupon_id,),
    )
    return int(claims), int(waited)


def run_one(
    tools: Tools,
    url: str,
    *,
    delay_ms: float,
    shards: int,
    seconds: int,
    clients: int,
    run: str,
) -> dict[str, Any]:
    """Run the claim of a coupon with K stock shards at one delay (K = 1: on the coupon's
    row, as the service does); verify it."""
    stock = STOCK // shards * shards
    coupon_id = _create_coupon(url, f"shards-db-{run}", stock, shards)
    variables = {
        "coupon_id": str(coupon_id),
        "run": run,
        "n": "0",
        "rtt_us": str(round(2 * delay_ms * 1000)),
    }
    groups = {"postgres": lambda: postgres_ticks(url), "pgbench": children_ticks}
    with CpuShare(groups) as cpu:
        result = run_pgbench(
            tools,
            url,
            clients=clients,
            seconds=seconds,
            variables=variables,
            script="claim_rtt.pgbench" if shards == 1 else "claim_shard.pgbench",
            protocol="prepared",
        )
    claims, waited = _claims(url, coupon_id)
    problems = []
    if result.failed or claims != result.transactions:
        problems.append(
            f"{result.transactions} transactions, {result.failed} failed, {claims} claims"
        )
    [(left,)] = sql(
        url,
        "SELECT c.remaining_amount + coalesce((SELECT sum(s.remaining_amount)"
        " FROM coupons_stockshard s WHERE s.coupon_id = c.id), 0)"
        " FROM coupons_coupon c WHERE c.id = %s",
        (coupon_id,),
    )
    if left != stock - claims:
        problems.append(f"stock left {left} != stock {stock} - {claims} claims")
    return {
        "delay_ms": delay_ms,
        "rtt_ms": 2 * delay_ms,
        "shards": shards,
        "tps": round(result.tps, 1),
        "latency_ms": result.latency_ms,
        "transactions": result.transactions,
        "waited_share": round(waited / claims, 3) if shards > 1 and claims else None,
        "cpu": {name: round(share, 3) for name, share in cpu.shares.items()},
        "problems": problems,
    }


def label(run: dict[str, Any]) -> str:
    """What a run measured, for the tables."""
    if run["shards"] == 1:
        return "K = 1: the coupon's row"
    return f"K = {run['shards']} shards"


def print_run(run: dict[str, Any]) -> None:
    """Print one run's figures as they come, and its verification failures loudly."""
    cpu = run["cpu"]
    waited = "" if run["waited_share"] is None else f", waited {run['waited_share']:.0%}"
    print(
        f"  {run['delay_ms']:g} ms one-way, {label(run)}: {run['tps']:,.0f} transactions/s, "
        f"latency {run['latency_ms']:.2f} ms{waited}; CPU busy {cpu['busy']:.0%} "
        f"(PostgreSQL {cpu['postgres']:.0%}, pgbench {cpu['pgbench']:.0%}, "
        f"other {cpu['other']:.0%}, steal {cpu['steal']:.0%})"
    )
    if cpu["other"] > NOISY:
        print(f"  !!! other work took {cpu['other']:.0%} of the CPUs during this run")
    for problem in run["problems"]:
        print(f"  !!! VERIFICATION FAILED: {problem}")


def measure(
    tools: Tools, delays: list[float], shard_counts: list[int], seconds: int, clients: int
) -> dict[str, Any]:
    """Create the throwaway database, run every configuration, drop it; return the results."""
    url = database_url(DATABASE)
    tag = str(int(time.time()))
    runs = []
    print(
        f"database alone: pgbench, {clients} clients, {seconds} s a run, prepared protocol, "
        f"in {DATABASE}"
    )
    with fresh_database(url):
        migrate(service_env(url, port=8080))
        for delay_index, delay_ms in enumerate(delays):
            for shards in shard_counts:
                run = run_one(
                    tools,
                    url,
                    delay_ms=delay_ms,
                    shards=shards,
                    seconds=seconds,
                    clients=clients,
                    run=f"{tag}{delay_index}{shards}",
                )
                print_run(run)
                runs.append(run)
    return {
        "clients": clients,
        "seconds": seconds,
        "protocol": "prepared",
        "stock": STOCK,
        "runs": runs,
        "problems": [
            f"{run['delay_ms']:g} ms, {label(run)}: {problem}"
            for run in runs
            for problem in run["problems"]
        ],
    }


def table(database: dict[str, Any]) -> str:
    """The runs as a Markdown table: transactions/s of each configuration against delay."""
    delays = sorted({run["delay_ms"] for run in database["runs"]})
    rows: dict[str, dict[float, dict[str, Any]]] = {}
    for run in database["runs"]:
        rows.setdefault(label(run), {})[run["delay_ms"]] = run
    header = " | ".join(f"{delay:g} ms one-way (RTT {2 * delay:g} ms)" for delay in delays)
    lines = [f"| lock taken on | {header} |", "|---|" + "---:|" * len(delays)]
    for name, by_delay in rows.items():
        cells = []
        for delay in delays:
            run = by_delay.get(delay)
            cells.append(
                "—" if run is None else f"{run['tps']:,.0f} ({run['cpu']['busy']:.0%} CPU)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(database: dict[str, Any], caption: str) -> str:
    """An SVG of transactions/s against the delay, a bar per configuration."""
    delays = sorted({run["delay_ms"] for run in database["runs"]})
    series: dict[str, list[float | None]] = {}
    for run in database["runs"]:
        series.setdefault(label(run), [None] * len(delays))[delays.index(run["delay_ms"])] = run[
            "tps"
        ]
    return grouped_bar_chart(
        f"One hot coupon at the database alone: pgbench, {database['clients']} clients",
        [f"{delay:g} ms one-way (RTT {2 * delay:g} ms)" for delay in delays],
        series,
        "transactions (claims) per second",
        caption,
    )


def caption(date: str) -> str:
    """Where and when the figures were measured, for a chart."""
    return f"{date[:10]}, 2 shared cores; \\sleep stands in for the network while a row is locked"


def main(argv: list[str]) -> int:
    """Run the database part alone; return the exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delays", type=numbers, default=DELAYS_MS, help="one-way, in ms")
    parser.add_argument("--shard-counts", type=numbers, default=SHARD_COUNTS, help="K values")
    parser.add_argument("--seconds", type=int, default=SECONDS, help="per run")
    parser.add_argument("--clients", type=int, default=CLIENTS, help="pgbench clients")
    args = parser.parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        tools = find_tools()
        database = measure(
            tools, args.delays, [int(k) for k in args.shard_counts], args.seconds, args.clients
        )
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    document = {"date": date, "database": database, "passed": not database["problems"]}
    print()
    print(table(database))
    write_json(RESULTS, document)
    CHART.write_text(chart(database, caption(date)))
    print(f"results: {RESULTS.relative_to(REPO_DIR)}, chart: {CHART.relative_to(REPO_DIR)}")
    if database["problems"]:
        print("\n!!! VERIFICATION FAILED:", *database["problems"], sep="\n!!!   ", file=sys.stderr)
        return 1
    print("\nall verifications passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
