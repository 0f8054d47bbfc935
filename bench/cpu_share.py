"""Where the machine's CPU went while a block ran: how busy it was, and which processes
took it. It tells whether a figure was limited by the CPU or by waiting (a lock, the
network): a run that leaves the CPUs idle was not limited by them."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from harness import processes, sql


def _machine_ticks() -> dict[str, int]:
    """Clock ticks of all CPUs so far: in all, busy (user, nice, system) and stolen."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(value) for value in Path("/proc/stat").read_text().split()[1:9]
    )
    return {
        "total": user + nice + system + idle + iowait + irq + softirq + steal,
        "busy": user + nice + system,
        "steal": steal,
    }


def children_ticks() -> int:
    """CPU ticks of this process's children that have ended: the load tools it ran."""
    for each in processes():
        if each.pid == os.getpid():
            return each.children_cpu
    return 0


def postgres_ticks(database_url: str) -> int:
    """CPU ticks of PostgreSQL's processes, except the live sessions of other databases.

    The server is shared: another database's sessions are another's work. Sessions that
    have ended (pgbench's, at the end of its run) count through the postmaster, whose
    children's time they became; so do other databases' sessions that ended meanwhile,
    which this cannot tell apart.
    """
    others = {
        pid
        for (pid,) in sql(
            database_url,
            "SELECT pid FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND datname <> current_database()",
        )
    }
    postgres = [each for each in processes() if each.name == "postgres"]
    pids = {each.pid for each in postgres}
    return sum(
        each.cpu + (each.children_cpu if each.parent not in pids else 0)
        for each in postgres
        if each.pid not in others
    )


class CpuShare:
    """Measures the machine's CPU use over a block, and each group's share of it.

    groups names functions returning a group's CPU ticks so far (its processes' user and
    system time). Shares are of all the machine's CPUs: 0.5 on 2 cores is one core.
    """

    def __init__(self, groups: dict[str, Callable[[], int]]) -> None:
        self.groups = groups
        self.shares: dict[str, float] = {}

    def _sample(self) -> tuple[dict[str, int], dict[str, int]]:
        return _machine_ticks(), {name: ticks() for name, ticks in self.groups.items()}

    def __enter__(self) -> CpuShare:
        self._start = self._sample()
        return self

    def __exit__(self, *_: object) -> None:
        machine, groups = self._sample()
        start_machine, start_groups = self._start
        total = max(1, machine["total"] - start_machine["total"])
        # /proc/stat counts ticks of every CPU; a process's ticks count time on any one.
        self.shares = {
            "busy": (machine["busy"] - start_machine["busy"]) / total,
            "steal": (machine["steal"] - start_machine["steal"]) / total,
        }
        for name in self.groups:
            self.shares[name] = (groups[name] - start_groups[name]) / total
        self.shares["other"] = max(
            0.0, self.shares["busy"] - sum(self.shares[name] for name in self.groups)
        )
