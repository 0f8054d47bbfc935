"""One hot coupon against the database's round-trip time: claims through the service with
every message to PostgreSQL delayed by a proxy, then pgbench's K-shard lock at the same
delays (bench/shards_db.py).

    .venv/bin/python bench/latency.py [--delays 0,0.5,2] [--stock-shards 1,4,16]
                                      [--seconds 15] [--workers 4] [--shard-workers 16]
                                      [--shard-threads 1] [--no-direct] [--app-only]
                                      [--db-seconds 10] [--shard-counts 1,4,16] [--clients 32]

First it counts a winning claim's round trips, and those it holds the coupon's lock
across, with libpq's trace (bench/claim_round_trips.py). Then, on the throwaway database
coupons_bench_latency (DATABASE_URL's server, default 127.0.0.1:5432; the database
DATABASE_URL names is never touched), first without the proxy (the reference that shows
its cost; --no-direct skips it), then for each one-way delay D of --delays, in ms, and each
K of --stock-shards (the coupon's stock_shards):

1. starts bench/latency_proxy.py in front of PostgreSQL with delay D, and times 200
   `SELECT 1` through it at rest: the round trip the service will see (2 × D + loopback);
2. starts gunicorn from gunicorn.conf.py (production settings) with its DATABASE_URL
   through the proxy: --workers sync workers for K = 1, --shard-workers for K > 1 (each
   with --shard-threads threads, gthread, if above 1), one connection per worker thread
   (see WORKERS, SHARD_WORKERS and SHARD_THREADS);
3. warms up with 3 s of claims, then runs "every claim wins" (as B2): wrk, 2 threads,
   64 connections, for --seconds, every claim by a user never seen before on one coupon
   whose stock cannot run out, split over K rows;
4. verifies it as bench/run.py does: no 5xx, socket error or timeout, every answer a 201,
   remaining_amount == amount − claims with no user twice, the winners those answered,
   gunicorn's log clean;
5. reports claims/s, latency p50 and p99, the round trips per claim the proxy saw, how
   far the proxy's delays strayed from D under the load, and the CPU: the machine's busy
   share (user + system, of both cores), its stolen share, and the share of gunicorn,
   PostgreSQL, wrk and the proxy; "other" is the rest (other work on the host);
6. and, from the proxy's timing of each claim's transaction, how long the lock was held
   and where that time went: the network (4 × D), the service between an answer and its
   next statement, PostgreSQL's write and COMMIT. 1 / that time is the coupon's ceiling.

Every coupon is created from coupon_body(), the one place its fields are set.

Writes bench/results/latency.json, docs/scaling-latency.svg and (unless --app-only)
docs/scaling-shards.svg. Exits 1 if a verification failed, 2 if it could not run.
docs/scaling.md reports it.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import shards_db
from cpu_share import CpuShare, children_ticks, postgres_ticks
from drivers import Tools, WrkResult, find_tools
from harness import (
    BENCH_DIR,
    REPO_DIR,
    Api,
    BenchError,
    free_port,
    fresh_database,
    gunicorn_settings,
    log_problems,
    migrate,
    process,
    processes,
    run_python,
    running_service,
    service_env,
)
from latency_proxy import RunningProxy, running_proxy
from output import grouped_bar_chart, write_json
from scenarios import CONNECTIONS, WRK_THREADS, claim_load, claim_problems, wrk_details

DATABASE = "coupons_bench_latency"
SECONDS = 15
WARM_UP_S = 3
# Sync workers, one database connection each. A claim keeps its worker through four round
# trips, two of them outside the lock, so with the database 1 or 4 ms away 2 workers leave
# the lock idle between claims; 4 keep a claim waiting at it. More do not raise the rate:
# they share the 2 cores with the claim that holds the lock, which then takes longer to
# send its next statement (docs/scaling.md has the sweep of 2, 4, 8 and 16).
WORKERS = 4
# With K stock shards up to K claims hold a lock at once: each worker has one claim in
# flight, so K workers at least keep every shard busy while the network is the limit. 16
# is the most this 2-core machine runs before its CPU is (docs/scaling.md).
SHARD_WORKERS = 16
# Threads per worker for K > 1 (gthread above 1): 4 workers x 4 threads made the same
# claims/s as 16 sync workers, with a worse p99 (docs/scaling.md).
SHARD_THREADS = 1
STOCK_SHARDS = "1,4,16"
STOCK = 100_000_000  # Far more than --seconds of claims can take at any delay.
PROBES = 200
RESULTS = BENCH_DIR / "results" / "latency.json"
CHART = REPO_DIR / "docs" / "scaling-latency.svg"
LOG_PATH = BENCH_DIR / "results" / "latency-gunicorn.log"
NOISY = 0.1  # A run during which other work took more of the CPUs than this is flagged.


def coupon_body(name: str, stock: int, shards: int = 1) -> dict[str, Any]:
    """The body of POST /api/coupons for the scenario's coupons: the one place their fields
    are set."""
    return {"name": name, "amount": stock, "stock_shards": shards}


def create_coupon(api: Api, name: str, stock: int, shards: int) -> None:
    """Create a coupon from coupon_body(); raise BenchError unless the service answers 201."""
    status, body = api.call("POST", "/api/coupons", coupon_body(name, stock, shards))
    if status != 201:
        raise BenchError(f"creating coupon {name} answered {status}: {body[:200]!r}")


def count_round_trips(database_url: str) -> dict[str, Any]:
    """A winning claim's round trips, from bench/claim_round_trips.py (in a process of its
    own: it imports the service)."""
    arguments = ["bench/claim_round_trips.py", "--database-url", database_url, "--json"]
    return dict(json.loads(run_python(arguments, dict(os.environ))))


def probe_round_trip(database_url: str) -> dict[str, float]:
    """The median and 90th percentile time of `SELECT 1` on one connection at rest, in ms."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        for _ in range(20):
            connection.execute("SELECT 1")
        times = []
        for _ in range(PROBES):
            started = time.perf_counter()
            connection.execute("SELECT 1").fetchone()
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"median": statistics.median(times), "p90": times[int(len(times) * 0.9)]}


def _ticks_of(pid: int) -> Callable[[], int]:
    """CPU ticks of a process and its children that are alive (gunicorn and its workers)."""

    def ticks() -> int:
        return sum(each.cpu for each in processes() if pid in {each.pid, each.parent})

    return ticks


def _proxy_ticks(pid: int) -> Callable[[], int]:
    def ticks() -> int:
        found = process(pid)
        return 0 if found is None else found.cpu

    return ticks


def transaction_times(
    before: dict[str, Any], after: dict[str, Any], turns: int
) -> dict[str, Any] | None:
    """The proxy's mean times (ms) of the transactions of that many turns during a run."""
    start = before["transactions"].get(str(turns), {"count": 0, "client_s": [], "server_s": []})
    end = after["transactions"].get(str(turns))
    count = end["count"] - start["count"] if end else 0
    if not end or count <= 0:
        return None

    def means(key: str) -> list[float]:
        earlier = start[key] or [0.0] * len(end[key])
        return [round((e - b) / count * 1000, 3) for e, b in zip(end[key], earlier, strict=True)]

    return {
        "count": count,
        "client_ms": means("client_s"),
        "server_ms": means("server_s"),
        "held_ms": round((end["held_s"] - start.get("held_s", 0.0)) / count * 1000, 3),
    }


def only_wins(result: WrkResult) -> list[str]:
    """Every claim must win: the stock cannot run out and every user is new."""
    refused = {status: n for status, n in result.statuses.items() if status != 201}
    return [f"answers other than 201: {refused}"] if refused else []


@contextmanager
def link(database_url: str, delay_ms: float | None) -> Iterator[RunningProxy | None]:
    """The proxy with that delay in front of database_url's server; None: no proxy."""
    if delay_ms is None:
        yield None
        return
    server = urlsplit(database_url)
    with running_proxy(
        f"{server.hostname or '127.0.0.1'}:{server.port or 5432}", delay_ms
    ) as proxy:
        yield proxy


def workers_for(args: argparse.Namespace, shards: int) -> tuple[int, int]:
    """gunicorn's workers and threads per worker for a coupon of `shards` stock shards."""
    if shards == 1:
        return args.workers, 1
    return args.shard_workers, args.shard_threads


def workers_label(run: dict[str, Any]) -> str:
    threads = run.get("threads", 1)
    return f"{run['workers']} workers" + (f" × {threads} threads" if threads > 1 else "")


def run_delay(
    tools: Tools,
    database_url: str,
    delay_ms: float | None,
    shards: int,
    index: int,
    args: argparse.Namespace,
    round_trips: dict[str, Any],
) -> dict[str, Any]:
    """Measure and verify the claims at one delay on a coupon of `shards` stock shards
    (steps 1–5 of the module's docstring); None: straight to PostgreSQL, the reference that
    shows the proxy's own cost."""
    tag = f"{int(time.time())}d{index}"
    workers, threads = workers_for(args, shards)
    with link(database_url, delay_ms) as proxy:
        through = proxy.database_url(database_url) if proxy else database_url
        at_rest = probe_round_trip(through)
        env = service_env(through, free_port())
        env.update(WEB_CONCURRENCY=str(workers), GUNICORN_THREADS=str(threads))
        with running_service(env, LOG_PATH) as service:
            api = Api(service.port)
            create_coupon(api, f"warm-up-{tag}", STOCK, shards)
            warm = claim_load(tools, service.port, f"warm-up-{tag}", f"w{tag}", seconds=WARM_UP_S)
            problems = [
                f"warm-up: {problem}"
                for problem in claim_problems(api, f"warm-up-{tag}", STOCK, [warm])
            ]
            name = f"latency-{tag}"
            create_coupon(api, name, STOCK, shards)
            groups = {
                "gunicorn": _ticks_of(service.pid),
                "postgres": lambda: postgres_ticks(database_url),
                "wrk": children_ticks,
                "proxy": _proxy_ticks(proxy.process.pid) if proxy else lambda: 0,
            }
            before = proxy.counters() if proxy else None
            with CpuShare(groups) as cpu:
                result = claim_load(tools, service.port, name, f"l{tag}", seconds=args.seconds)
            after = proxy.counters() if proxy else None
            problems += claim_problems(api, name, STOCK, [result]) + only_wins(result)
    problems += [f"gunicorn log: {line}" for line in log_problems(LOG_PATH)]
    run: dict[str, Any] = {
        "delay_ms": delay_ms,
        "stock_shards": shards,
        "workers": workers,
        "threads": threads,
        "rtt_ms": None if delay_ms is None else 2 * delay_ms,
        "rtt_at_rest_ms": {key: round(value, 3) for key, value in at_rest.items()},
        "claims_per_s": round(result.statuses.get(201, 0) / result.duration_s, 1),
        "p50_ms": result.latency_ms["p50"],
        "p99_ms": result.latency_ms["p99"],
        "round_trips_per_claim": None,
        "transactions": None,
        "proxy_error_under_load_us": None,
        "cpu": {name: round(share, 3) for name, share in cpu.shares.items()},
        "wrk": wrk_details(result),
        "problems": problems,
    }
    if before is not None and after is not None:
        delayed = max(1, after["delayed_chunks"] - before["delayed_chunks"])
        run["round_trips_per_claim"] = round(
            (after["turns"] - before["turns"]) / max(1, result.requests), 2
        )
        run["transactions"] = transaction_times(before, after, round_trips["round_trips"])
        run["proxy_error_under_load_us"] = {
            "mean": round((after["error_total_us"] - before["error_total_us"]) / delayed, 1),
            "abs_mean": round(
                (after["error_abs_total_us"] - before["error_abs_total_us"]) / delayed, 1
            ),
        }
    return run


def delay_label(delay_ms: float | None) -> str:
    """How a delay is named in tables and charts."""
    return "no proxy" if delay_ms is None else f"{delay_ms:g} ms one-way (RTT {2 * delay_ms:g} ms)"


def print_run(run: dict[str, Any]) -> None:
    """Print one delay's figures as they come, and its verification failures loudly."""
    cpu, at_rest = run["cpu"], run["rtt_at_rest_ms"]["median"]
    trips = run["round_trips_per_claim"]
    print(
        f"  {delay_label(run['delay_ms'])}, K = {run['stock_shards']}, {workers_label(run)}, "
        f"round trip at rest {at_rest:.2f} ms: "
        f"{run['claims_per_s']:,.0f} claims/s, p50 {run['p50_ms']:.1f} ms, "
        f"p99 {run['p99_ms']:.1f} ms"
        + ("" if trips is None else f", {trips:.2f} round trips per claim")
        + f"; CPU busy {cpu['busy']:.0%} (gunicorn {cpu['gunicorn']:.0%}, PostgreSQL "
        f"{cpu['postgres']:.0%}, wrk {cpu['wrk']:.0%}, proxy {cpu['proxy']:.0%}, other "
        f"{cpu['other']:.0%}, steal {cpu['steal']:.0%})"
    )
    times = run["transactions"]
    if times:
        print(
            f"    per claim, at the proxy: lock held {times['held_ms']:.2f} ms (from the lock's "
            f"answer to COMMIT's); PostgreSQL per statement "
            f"{', '.join(f'{t:.2f}' for t in times['server_ms'])} ms (the lock statement's "
            f"includes its wait for the lock); the service before each next one "
            f"{', '.join(f'{t:.2f}' for t in times['client_ms'][1:])} ms; the proxy's delays "
            f"{run['proxy_error_under_load_us']['mean']:+.0f} µs off on average"
        )
    if cpu["other"] > NOISY:
        print(f"  !!! other work took {cpu['other']:.0%} of the CPUs during this run")
    for problem in run["problems"]:
        print(f"  !!! VERIFICATION FAILED: {problem}")


def lock_ceiling(under_lock: int, delay_ms: float | None) -> float | None:
    """The model's limit of one coupon's claims/s from the network alone: one claim per
    lock hold, the lock held across under_lock round trips of 2 × delay_ms (None without
    a delay: the network sets no limit)."""
    return 1000 / (under_lock * 2 * delay_ms) if delay_ms and under_lock else None


def speed_up(document: dict[str, Any], run: dict[str, Any]) -> float | None:
    """A run's claims/s over those of K = 1 at the same delay."""
    single = next(
        (
            other["claims_per_s"]
            for other in document["app"]
            if other["delay_ms"] == run["delay_ms"] and other["stock_shards"] == 1
        ),
        None,
    )
    return run["claims_per_s"] / single if single else None


def app_table(document: dict[str, Any]) -> str:
    """The app's runs as Markdown tables: figures and CPU, then where the lock's time went
    (K = 1: with shards the proxy cannot tell a shard's lock from another's)."""
    under_lock = document["round_trips"]["under_lock"]
    lines = [
        "| delay | K | workers | round trip at rest | claims/s | × K = 1 | p50 | p99 "
        f"| round trips per claim | network's limit K / ({under_lock} × RTT) | CPU busy "
        "| gunicorn | PostgreSQL | wrk | proxy | other | steal |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in document["app"]:
        cpu = run["cpu"]
        ceiling = lock_ceiling(under_lock, run["delay_ms"])
        trips = run["round_trips_per_claim"]
        ratio = speed_up(document, run)
        cells = [
            delay_label(run["delay_ms"]),
            str(run["stock_shards"]),
            workers_label(run),
            f"{run['rtt_at_rest_ms']['median']:.2f} ms",
            f"{run['claims_per_s']:,.0f}",
            "—" if ratio is None else f"{ratio:.1f}×",
            f"{run['p50_ms']:.1f} ms",
            f"{run['p99_ms']:.1f} ms",
            "—" if trips is None else f"{trips:.2f}",
            "—" if ceiling is None else f"{ceiling * run['stock_shards']:,.0f}",
            *(
                f"{cpu[name]:.0%}"
                for name in ("busy", "gunicorn", "postgres", "wrk", "proxy", "other", "steal")
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| delay (K = 1) | lock held per claim | of it: network (4 × one-way) | the service "
        "between answers | PostgreSQL's write and COMMIT | the rest | 1 / lock held | claims/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in document["app"]:
        times = run["transactions"]
        if not times or run["stock_shards"] != 1:
            continue
        network = 4 * run["delay_ms"]
        service = sum(times["client_ms"][2:])
        database = sum(times["server_ms"][2:])
        rest = times["held_ms"] - network - service - database
        cells = [
            delay_label(run["delay_ms"]),
            *(f"{value:.2f} ms" for value in (times["held_ms"], network, service, database, rest)),
            f"{1000 / times['held_ms']:,.0f}",
            f"{run['claims_per_s']:,.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def app_chart(document: dict[str, Any], caption: str) -> str:
    """Claims/s against the delay and K: through the service, pgbench's one row, the model."""
    delays = list(dict.fromkeys(run["delay_ms"] for run in document["app"]))
    under_lock = document["round_trips"]["under_lock"]
    series: dict[str, list[float | None]] = {}
    for shards in dict.fromkeys(run["stock_shards"] for run in document["app"]):
        runs = {run["delay_ms"]: run for run in document["app"] if run["stock_shards"] == shards}
        label = f"through the service, K = {shards} ({workers_label(next(iter(runs.values())))})"
        series[label] = [runs[delay]["claims_per_s"] if delay in runs else None for delay in delays]
    database_runs = {
        run["delay_ms"]: run["tps"]
        for run in (document.get("database") or {}).get("runs", [])
        if run["shards"] == 1
    }
    if database_runs:
        series["one row by pgbench, the database alone"] = [
            database_runs.get(delay) for delay in delays
        ]
    series[f"the network's limit for one row: 1 / ({under_lock} round trips × RTT)"] = [
        lock_ceiling(under_lock, delay) for delay in delays
    ]
    return grouped_bar_chart(
        "Claims/s on one hot coupon against the database's distance and its stock shards K",
        [delay_label(delay) for delay in delays],
        series,
        "winning claims per second",
        caption,
    )


def measure(args: argparse.Namespace, tools: Tools) -> dict[str, Any]:
    """Run the app part (and the database part unless --app-only); return the results."""
    database_url = shards_db.database_url(DATABASE)
    LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    with fresh_database(database_url):
        direct_env = service_env(database_url, free_port())
        migrate(direct_env)
        round_trips = count_round_trips(database_url)
        print(
            f"a winning claim: {round_trips['round_trips']} round trips "
            f"({', '.join(round_trips['statements'])}); the lock held across "
            f"{round_trips['under_lock']}"
        )
        settings = gunicorn_settings({**direct_env, "GUNICORN_THREADS": "1"})
        direct = probe_round_trip(database_url)
        print(
            f"through the service: gunicorn {settings}, {args.workers} workers for K = 1, "
            f"{args.shard_workers} for K > 1; wrk {WRK_THREADS} threads, "
            f"{CONNECTIONS} connections, {args.seconds} s a delay; loopback round trip "
            f"{direct['median']:.3f} ms"
        )
        app = []
        delays = [None, *args.delays] if args.direct else args.delays
        shard_counts = [int(k) for k in args.stock_shards]
        combinations = [(delay, shards) for delay in delays for shards in shard_counts]
        for index, (delay_ms, shards) in enumerate(combinations):
            run = run_delay(tools, database_url, delay_ms, shards, index, args, round_trips)
            print_run(run)
            app.append(run)
    database = None
    if not args.app_only:
        database = shards_db.measure(
            tools, args.delays, [int(k) for k in args.shard_counts], args.db_seconds, args.clients
        )
    problems = [
        f"{run['delay_ms']:g} ms: {problem}" for run in app for problem in run["problems"]
    ] + (database["problems"] if database else [])
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "revision": _revision(),
        "machine": {"nproc": os.cpu_count(), "cpu_model": _cpu_model()},
        "settings": {
            "gunicorn": settings,
            "workers": args.workers,
            "shard_workers": args.shard_workers,
            "shard_threads": args.shard_threads,
            "wrk_threads": WRK_THREADS,
            "connections": CONNECTIONS,
            "seconds": args.seconds,
            "stock": STOCK,
            "coupon_body": coupon_body("<name>", STOCK, 16),
        },
        "loopback_rtt_ms": {key: round(value, 3) for key, value in direct.items()},
        "round_trips": round_trips,
        "app": app,
        "database": database,
        "problems": problems,
        "passed": not problems,
    }


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _revision() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "no git revision"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--delays", type=shards_db.numbers, default=shards_db.DELAYS_MS, help="one-way, in ms"
    )
    parser.add_argument("--seconds", type=int, default=SECONDS, help="claims at each delay")
    parser.add_argument(
        "--stock-shards",
        type=shards_db.numbers,
        default=STOCK_SHARDS,
        help="the coupon's stock_shards, K, through the service",
    )
    parser.add_argument(
        "--workers", type=int, default=WORKERS, help="gunicorn sync workers for K = 1"
    )
    parser.add_argument(
        "--shard-workers", type=int, default=SHARD_WORKERS, help="gunicorn sync workers for K > 1"
    )
    parser.add_argument(
        "--shard-threads",
        type=int,
        default=SHARD_THREADS,
        help="threads per gunicorn worker for K > 1 (gthread above 1)",
    )
    parser.add_argument(
        "--no-direct",
        dest="direct",
        action="store_false",
        help="skip the reference run without the proxy",
    )
    parser.add_argument("--app-only", action="store_true", help="skip pgbench's part")
    parser.add_argument(
        "--db-seconds", type=int, default=shards_db.SECONDS, help="each pgbench run"
    )
    parser.add_argument(
        "--shard-counts",
        type=shards_db.numbers,
        default=shards_db.SHARD_COUNTS,
        help="K values of pgbench's part",
    )
    parser.add_argument("--clients", type=int, default=shards_db.CLIENTS, help="pgbench clients")
    args = parser.parse_args(argv)
    if min(args.seconds, args.db_seconds, args.workers, args.shard_workers, args.shard_threads) < 1:
        parser.error("--seconds, --db-seconds, the workers and the threads must be at least 1")
    if not all(k == int(k) and 1 <= k <= 64 for k in args.stock_shards):
        parser.error("--stock-shards must be whole numbers from 1 to 64")
    return args


def main(argv: list[str]) -> int:
    """Run the bench; return the exit status."""
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    try:
        tools = find_tools()
        document = measure(args, tools)
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    caption = shards_db.caption(document["date"])
    print()
    print(app_table(document))
    CHART.write_text(
        app_chart(
            document,
            f"{document['date'][:10]}, 2 shared cores, gunicorn sync workers: {args.workers} "
            f"for K = 1, {args.shard_workers} for K > 1",
        )
    )
    if document["database"]:
        print()
        print(shards_db.table(document["database"]))
        shards_db.CHART.write_text(shards_db.chart(document["database"], caption))
    write_json(RESULTS, document)
    print(f"\nresults: {RESULTS.relative_to(REPO_DIR)}, charts: docs/scaling-*.svg")
    if document["problems"]:
        print("\n!!! VERIFICATION FAILED:", *document["problems"], sep="\n!!!   ", file=sys.stderr)
        return 1
    print("\nall verifications passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
