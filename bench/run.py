"""Flash-sale benchmark of the coupon service (issue 3): scenarios B1–B4, verified.

    .venv/bin/python bench/run.py [--quick] [--runs N] [--scenarios B1,B2,...]

Creates a throwaway PostgreSQL database (coupons_bench, on DATABASE_URL's server or
127.0.0.1:5432), migrates it, serves it with gunicorn from gunicorn.conf.py, drives it
with wrk and pgbench, reads every coupon back to verify it, and drops the database.
First it measures the yardstick (bench/yardstick_site.py): what the host of the moment
serves with a bare Django view, the figure issue 3 gives for its reference machine.
Prints a table, writes bench/results/latest.json and docs/bench-results.svg (--quick:
bench/results/quick.json and quick.svg, so a quick look never replaces the full
figures). Exits 1 if any verification failed, 2 if the bench could not run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import io
import os
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path
from typing import Any

from drivers import Tools, find_tools, tool_version
from harness import (
    BENCH_DIR,
    REPO_DIR,
    BenchError,
    OtherWork,
    bench_database_url,
    free_port,
    fresh_database,
    gunicorn_settings,
    log_problems,
    migrate,
    running_service,
    service_env,
    sql,
)
from output import medians, spreads, table, write_chart, write_json
from scenarios import (
    CONNECTIONS,
    FULL,
    PGBENCH_CLIENTS,
    QUICK,
    SCENARIOS,
    WRK_THREADS,
    YARDSTICK_REFERENCE_PER_S,
    Context,
    RunResult,
    Sizes,
    scenario_names,
    warm_up,
    yardstick,
)

RESULTS_DIR = BENCH_DIR / "results"
NOISY = 0.1  # A run during which other work took more of the CPUs than this is flagged.
FULL_CHART = REPO_DIR / "docs" / "bench-results.svg"


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller sizes and 1 run, for a fast look"
    )
    parser.add_argument("--runs", type=int, help="runs of each scenario (default 3, --quick 1)")
    parser.add_argument(
        "--scenarios",
        type=scenario_names,
        default=",".join(SCENARIOS),
        help="comma-separated, e.g. B1,B3",
    )
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 1 if args.quick else 3
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def machine_info(database_url: str, tools: Tools) -> dict[str, Any]:
    """Describe the machine, the database server and the tools the figures come from."""
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_kib = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1])
    [(pg_version, max_connections, shared_buffers, synchronous_commit)] = sql(
        database_url,
        "SELECT current_setting('server_version'), current_setting('max_connections'), "
        "current_setting('shared_buffers'), current_setting('synchronous_commit')",
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024**2, 1),
        "postgresql": pg_version,
        "postgresql_settings": {
            "max_connections": max_connections,
            "shared_buffers": shared_buffers,
            "synchronous_commit": synchronous_commit,
        },
        "python": sys.version.split()[0],
        "django": importlib.metadata.version("django"),
        "gunicorn": importlib.metadata.version("gunicorn"),
        "wrk": tool_version([tools.wrk, "-v"]),
        "pgbench": tool_version([tools.pgbench, "--version"]),
    }


def python_speed() -> float:
    """Return loops per second of a fixed pure-Python workload (best of 5).

    A gauge of the shared host's speed at the moment: figures taken when it is lower
    are lower too, though no process of this machine is to blame.
    """
    loops = 200_000

    def work() -> int:
        total = 0
        for number in range(loops):
            total += number % 7
        return total

    return loops / min(timeit.repeat(work, number=1, repeat=5))


def git_revision() -> str:
    """The commit measured, marked dirty when the work tree has changes.

    The chart a previous run redrew is the bench's own output, not a change to what it
    measures, so it does not count.
    """

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "no git revision"
    changed = git(
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        f":!{FULL_CHART.relative_to(REPO_DIR)}",
    )
    return revision + ("-dirty" if changed else "")


def print_run(scenario: str, run: int, result: RunResult) -> None:
    """Print one run's figures as they come, and its verification failures loudly."""
    figures = ", ".join(f"{key} {value:,.2f}" for key, value in result.metrics.items())
    print(f"  {scenario} run {run + 1}: {figures}")
    if result.other_work > NOISY:
        print(
            f"  !!! other work took {result.other_work:.0%} of the CPUs during this run: "
            "its figures are low",
        )
    for problem in result.problems:
        print(f"  !!! VERIFICATION FAILED ({scenario} run {run + 1}): {problem}")


def run_scenarios(ctx: Context, names: list[str], runs: int) -> dict[str, list[RunResult]]:
    """Run each scenario `runs` times, each run on fresh coupons."""
    results: dict[str, list[RunResult]] = {}
    for name in names:
        print(f"{name}: {SCENARIOS[name].__doc__}")
        results[name] = []
        for run in range(runs):
            with OtherWork(ctx.service.pid) as other_work:
                result = SCENARIOS[name](ctx, run)
            result.other_work = other_work.share
            print_run(name, run, result)
            results[name].append(result)
    return results


def serve_and_run(
    env: dict[str, str], tools: Tools, database_url: str, sizes: Sizes, args: argparse.Namespace
) -> tuple[dict[str, list[RunResult]], list[str]]:
    """Serve the migrated database with gunicorn and run the scenarios; return the results
    and the failures of the warm-up and of the gunicorn log."""
    log_path = RESULTS_DIR / "gunicorn.log"
    with running_service(env, log_path) as service:
        ctx = Context(
            tools=tools,
            service=service,
            database_url=database_url,
            sizes=sizes,
            tag=str(int(time.time())),
        )
        problems = [f"warm-up: {problem}" for problem in warm_up(ctx)]
        results = run_scenarios(ctx, args.scenarios, args.runs)
    problems += [f"gunicorn log: {line}" for line in log_problems(log_path)]
    return results, problems


def measure_yardstick(
    env: dict[str, str], tools: Tools, sizes: Sizes, runs: int
) -> tuple[dict[str, Any], list[str]]:
    """Measure the yardstick `runs` times; return its figures and any failures."""
    print("yardstick: a bare Django view answering 409, under gunicorn's stock sync worker")
    rates, problems = [], []
    log_path = RESULTS_DIR / "yardstick.log"
    for run in range(runs):
        rate, run_problems = yardstick(tools, env, log_path, sizes.yardstick_s)
        print(f"  yardstick run {run + 1}: requests_per_s {rate:,.2f}")
        rates.append(rate)
        run_problems += [f"gunicorn log: {line}" for line in log_problems(log_path)]
        problems += [f"yardstick run {run + 1}: {problem}" for problem in run_problems]
    figures = {"median": round(statistics.median(rates)), "runs": [round(r) for r in rates]}
    return figures, problems


def measure(args: argparse.Namespace, tools: Tools, database_url: str) -> dict[str, Any]:
    """Set up the database and the service, run the scenarios, and return the results document."""
    sizes = QUICK if args.quick else FULL
    env = service_env(database_url, free_port())
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    speed_before = python_speed()
    with fresh_database(database_url):
        migrate(env)
        machine = machine_info(database_url, tools)
        settings = gunicorn_settings(env)
        print(f"gunicorn: {settings}; wrk: {WRK_THREADS} threads, {CONNECTIONS} connections")
        machine["yardstick_per_s"], problems = measure_yardstick(env, tools, sizes, args.runs)
        results, scenario_problems = serve_and_run(env, tools, database_url, sizes, args)
        problems += scenario_problems
    machine["python_loops_per_s"] = {"before": round(speed_before), "after": round(python_speed())}
    problems += [
        f"{name} run {run + 1}: {problem}"
        for name, runs in results.items()
        for run, result in enumerate(runs)
        for problem in result.problems
    ]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "runs": args.runs,
        "revision": git_revision(),
        "machine": machine,
        "settings": {
            "gunicorn": settings,
            "wrk_threads": WRK_THREADS,
            "connections": CONNECTIONS,
            "pgbench_clients": PGBENCH_CLIENTS,
        },
        "sizes": vars(sizes),
        "median": medians(results),
        "spread": spreads(results),
        "runs_detail": {name: [vars(result) for result in runs] for name, runs in results.items()},
        "problems": problems,
        "passed": not problems,
    }


def report(document: dict[str, Any], quick: bool) -> None:
    """Print the table and write the JSON results and the chart."""
    print()
    print(table(document["median"], document["spread"]))
    stem = "quick" if quick else "latest"
    json_path = RESULTS_DIR / f"{stem}.json"
    chart_path = RESULTS_DIR / "quick.svg" if quick else FULL_CHART
    write_json(json_path, document)
    machine, gunicorn = document["machine"], document["settings"]["gunicorn"]
    caption = (
        f"{document['date'][:10]}, {machine['nproc']} × {machine['cpu_model']}, "
        f"PostgreSQL {machine['postgresql']}, gunicorn {gunicorn['workers']} workers × "
        f"{gunicorn['threads']} threads, median of {document['runs']} runs ({document['revision']})"
    )
    write_chart(chart_path, document["median"], document["sizes"], caption)
    speed = machine["python_loops_per_s"]
    print(
        f"\nhost speed (pure-Python loops/s): {speed['before']:,} before, {speed['after']:,} after"
    )
    print(
        f"yardstick (a bare Django view answering 409): {machine['yardstick_per_s']['median']:,}"
        f" requests/s, where issue 3's reference machine served {YARDSTICK_REFERENCE_PER_S:,}"
    )
    print(f"results: {json_path.relative_to(REPO_DIR)}, chart: {chart_path.relative_to(REPO_DIR)}")


def main(argv: list[str]) -> int:
    """Run the bench; return the exit status."""
    args = parse_args(argv)
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # Progress shows as it comes, even piped.
    try:
        tools = find_tools()
        document = measure(args, tools, bench_database_url())
    except BenchError as error:
        print(f"bench: {error}", file=sys.stderr)
        return 2
    report(document, args.quick)
    if document["problems"]:
        print("\n!!! VERIFICATION FAILED:", file=sys.stderr)
        for problem in document["problems"]:
            print(f"!!!   {problem}", file=sys.stderr)
        return 1
    print("\nall verifications passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
