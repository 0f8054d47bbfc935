"""The load tools: wrk against the HTTP API, pgbench against PostgreSQL itself."""

from __future__ import annotations

import glob
import json
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from typing import Any

from harness import BENCH_DIR, BenchError

WRK_TIMEOUT = "10s"  # A request slower than this counts as a wrk timeout error.
RESULT_PREFIX = "BENCH_RESULT "
THREAD_DONE = "BENCH_THREAD_DONE"


@dataclass(frozen=True)
class Tools:
    """Paths of the load tools."""

    wrk: str
    pgbench: str


def find_tools() -> Tools:
    """Locate wrk and pgbench; raise BenchError saying how to install a missing one."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError(
            "wrk is not installed. Install it with `apt-get update && apt-get install -y wrk`, "
            "or run `make bench`, which installs it when missing."
        )
    pgbench = shutil.which("pgbench") or next(
        iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"), reverse=True)), None
    )
    if pgbench is None:
        raise BenchError("pgbench is not installed: `apt-get install -y postgresql-client`.")
    return Tools(wrk=wrk, pgbench=pgbench)


def tool_version(command: list[str]) -> str:
    """Return the first line a tool prints about its version."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).strip().splitlines()[0]


# wrk


@dataclass(frozen=True)
class WrkResult:
    """What one wrk run saw, from the JSON line report.lua prints."""

    requests: int
    sent: int | None  # Requests written, counted by claim.lua (None for plain GET runs).
    duration_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    statuses: dict[int, int]
    codes: dict[str, int]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WrkResult:
        """Build the result from report.lua's JSON line."""
        return cls(
            requests=data["requests"],
            sent=data["sent"],
            duration_s=data["duration_us"] / 1e6,
            latency_ms={name: value / 1000 for name, value in data["latency_us"].items()},
            errors=data["errors"],
            statuses={int(status): count for status, count in data["statuses"].items()},
            codes=data["codes"],
        )

    @property
    def server_errors(self) -> int:
        """Answers with a 5xx status."""
        return sum(count for status, count in self.statuses.items() if status >= 500)

    @property
    def answered(self) -> int:
        """Answers that were not a server error."""
        return self.requests - self.server_errors

    @property
    def unanswered(self) -> int:
        """Requests sent whose answer wrk never read (in flight when the run ended)."""
        return 0 if self.sent is None else self.sent - self.requests

    @property
    def socket_errors(self) -> int:
        """Connect, read and write errors and timeouts."""
        return sum(count for kind, count in self.errors.items() if kind != "status")


def run_wrk(
    tools: Tools,
    url: str,
    *,
    connections: int,
    threads: int,
    duration_s: int,
    script: str,
    script_args: list[str],
) -> WrkResult:
    """Run wrk with a script of bench/ and return its results.

    A script whose threads stop once the run has its answers prints THREAD_DONE; wrk is
    then told to finish (SIGINT) instead of waiting out duration_s, its cap. (A thread
    that has not stopped by itself then stops within wrk's 100 ms tick.)
    """
    command = [
        tools.wrk,
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{duration_s}s",
        "--timeout",
        WRK_TIMEOUT,
        "-s",
        script,
        url,
        "--",
        *script_args,
    ]
    process = subprocess.Popen(
        command, cwd=BENCH_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert process.stdout is not None
    told_to_finish, result, output = False, None, []
    for line in process.stdout:
        if line.strip() == THREAD_DONE:
            if not told_to_finish:
                process.send_signal(signal.SIGINT)
                told_to_finish = True
        elif line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
        else:
            output.append(line)
    process.wait()
    if process.returncode != 0 or result is None:
        raise BenchError(
            f"wrk failed ({process.returncode}): {' '.join(command)}\n{''.join(output)}"
        )
    return WrkResult.from_json(result)


# pgbench


@dataclass(frozen=True)
class PgbenchResult:
    """What one pgbench run reported."""

    tps: float
    transactions: int
    failed: int
    latency_ms: float | None = None  # pgbench's "latency average"


def _pgbench_number(pattern: str, output: str) -> float:
    """Return the number after pattern in pgbench's report."""
    found = re.search(pattern + r"\s*([0-9.]+)", output)
    if found is None:
        raise BenchError(f"pgbench printed no {pattern!r}:\n{output}")
    return float(found.group(1))


def run_pgbench(
    tools: Tools,
    database_url: str,
    *,
    clients: int,
    seconds: int,
    variables: dict[str, str],
    script: str = "claim.pgbench",
    protocol: str = "simple",
) -> PgbenchResult:
    """Run a pgbench script of bench/ (B4's by default) against database_url and return its
    throughput."""
    command = [
        tools.pgbench,
        "--no-vacuum",
        "--client",
        str(clients),
        "--jobs",
        "2",
        "--time",
        str(seconds),
        "--protocol",
        protocol,
        "--file",
        script,
    ]
    for name, value in variables.items():
        command += ["--define", f"{name}={value}"]
    done = subprocess.run(
        [*command, database_url], cwd=BENCH_DIR, capture_output=True, text=True, check=False
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise BenchError(f"pgbench failed ({done.returncode}):\n{output}")
    return PgbenchResult(
        tps=_pgbench_number(r"tps =", output),
        transactions=int(_pgbench_number(r"number of transactions actually processed:", output)),
        failed=int(_pgbench_number(r"number of failed transactions:", output)),
        latency_ms=_pgbench_number(r"latency average =", output),
    )
