"""Paired comparison: this checkout against another git revision, one right after the other.

    .venv/bin/python bench/compare.py REV [--pairs N] [--scenarios B1,B2] [--quick]

On a shared host a single run moves by up to 30 % from one minute to the next, more than
most changes are worth; two runs a few seconds apart move far less. So a change is
measured in pairs: REV, then this checkout, N times. Each side is served by its own
gunicorn, started from its own tree (REV is checked out in a temporary git worktree) on
the same throwaway database, and warmed up; each pair runs every scenario once on each
side, verified as in bench/run.py.

Prints, for every pair, the scenarios' figures on both sides with this checkout's figure
divided by REV's, and the CPU time the whole machine spent per answered request (wrk,
gunicorn and PostgreSQL together, from /proc/stat); then the median of each ratio. A CPU
time per request that falls says the change saves work even when the host's noise hides
it in the rates. Exits 1 if a verification failed, 2 if the comparison could not run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from drivers import Tools, find_tools
from harness import (
    BENCH_DIR,
    REPO_DIR,
    BenchError,
    OtherWork,
    bench_database_url,
    free_port,
    fresh_database,
    log_problems,
    migrate,
    running_service,
    service_env,
)
from scenarios import (
    FULL,
    QUICK,
    SCENARIOS,
    Context,
    RunResult,
    Sizes,
    scenario_names,
    warm_up,
)

LOG_PATH = BENCH_DIR / "results" / "compare-gunicorn.log"
CPU_PER_REQUEST = "machine_cpu_us_per_request"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("revision", help="the git revision to compare with, e.g. HEAD~1")
    parser.add_argument("--pairs", type=int, default=4, help="pairs of runs (default 4)")
    parser.add_argument(
        "--scenarios",
        type=scenario_names,
        default="B1,B2",
        help="comma-separated (default B1,B2)",
    )
    parser.add_argument("--quick", action="store_true", help="the smaller sizes of --quick")
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    return args


def git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=False)


@contextmanager
def checked_out(revision: str) -> Iterator[Path]:
    """Check the revision out in a temporary worktree for the duration of the block."""
    if git("diff", "--quiet", revision, "--", "coupons/migrations").returncode != 0:
        raise BenchError(
            f"{revision}: not a revision, or its migrations differ from this checkout's, "
            "so both cannot share one database"
        )
    with tempfile.TemporaryDirectory(prefix="coupons-compare-") as directory:
        tree = Path(directory) / "tree"
        added = git("worktree", "add", "--detach", str(tree), revision)
        if added.returncode != 0:
            raise BenchError(f"git worktree add {revision} failed: {added.stderr.strip()}")
        try:
            yield tree
        finally:
            git("worktree", "remove", "--force", str(tree))


def answered_requests(result: RunResult) -> int:
    """The requests wrk had answered in a run (B2's two windows together); 0 for pgbench."""
    windows = [result.details, *(v for v in result.details.values() if isinstance(v, dict))]
    return sum(window.get("requests", 0) for window in windows)


def run_side(
    tree: Path, tools: Tools, database_url: str, sizes: Sizes, names: list[str], tag: str
) -> tuple[dict[str, RunResult], list[str]]:
    """Serve the database from one tree, warm it up, and run each scenario once; return
    the results and the failures of the warm-up and of the gunicorn log."""
    env = service_env(database_url, free_port())
    with running_service(env, LOG_PATH, tree) as service:
        ctx = Context(tools, service, database_url, sizes, tag)
        problems = [f"warm-up: {problem}" for problem in warm_up(ctx)]
        results = {}
        for name in names:
            with OtherWork(service.pid) as work:
                results[name] = SCENARIOS[name](ctx, 0)
            requests = answered_requests(results[name])
            if requests:
                results[name].metrics[CPU_PER_REQUEST] = work.busy_s / requests * 1e6
    problems += [f"gunicorn log: {line}" for line in log_problems(LOG_PATH)]
    return results, problems


def compare(args: argparse.Namespace) -> bool:
    """Run the pairs and print them; return whether every verification passed."""
    tools = find_tools()
    sizes = QUICK if args.quick else FULL
    database_url = bench_database_url()
    ratios: dict[tuple[str, str], list[float]] = {}
    passed = True
    with checked_out(args.revision) as tree, fresh_database(database_url):
        migrate(service_env(database_url, free_port()))
        print(f"each pair: {args.revision} then this checkout; figures: theirs → ours (ratio)")
        for pair in range(1, args.pairs + 1):
            tag = str(int(time.time()))
            theirs, their_problems = run_side(
                tree, tools, database_url, sizes, args.scenarios, tag + "0"
            )
            ours, our_problems = run_side(
                REPO_DIR, tools, database_url, sizes, args.scenarios, tag + "1"
            )
            for side, problems in (("theirs", their_problems), ("ours", our_problems)):
                for problem in problems:
                    passed = False
                    print(f"  !!! VERIFICATION FAILED ({side}): {problem}")
            for name in args.scenarios:
                figures = []
                for metric, mine in ours[name].metrics.items():
                    other = theirs[name].metrics.get(metric, 0.0)
                    ratio = mine / other if other else float("nan")
                    ratios.setdefault((name, metric), []).append(ratio)
                    figures.append(f"{metric} {other:,.1f} → {mine:,.1f} ({ratio:.2f})")
                print(f"pair {pair} {name}: " + ", ".join(figures))
                for side, result in (("theirs", theirs[name]), ("ours", ours[name])):
                    for problem in result.problems:
                        passed = False
                        print(f"  !!! VERIFICATION FAILED ({side}, {name}): {problem}")
    print("\nmedian ratio, ours ÷ theirs (each pair's ratios):")
    for (name, metric), values in ratios.items():
        listed = ", ".join(f"{value:.2f}" for value in values)
        print(f"  {name} {metric}: {statistics.median(values):.2f} ({listed})")
    return passed


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    LOG_PATH.parent.mkdir(parents=True, exist_ok=True)
    try:
        passed = compare(args)
    except BenchError as error:
        print(f"compare: {error}", file=sys.stderr)
        return 2
    if not passed:
        print("\nsome verifications FAILED", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
