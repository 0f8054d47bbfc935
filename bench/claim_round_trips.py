"""Count the round trips a winning claim makes to PostgreSQL, and how many of them the
coupon's lock is held across, from libpq's trace of the service's own connection.

    .venv/bin/python bench/claim_round_trips.py [--database-url URL] [--json]

It serves requests in this process through the service's WSGI application (no HTTP, as
bench/request_cost.py does): creates a coupon with POST /api/coupons (the body from
bench/latency.py's coupon_body), claims it for 10 new users, then once more with the
connection's protocol traced (PQtrace). By then the statements are prepared, as in a
worker that has served a few claims. A round trip is a burst of messages from the client
followed by the server's answers.

The lock is taken by the statement that says FOR UPDATE or FOR NO KEY UPDATE, while it
runs, and let go when COMMIT (or ROLLBACK) runs. In between the network is crossed once
for each round trip after the lock statement's, up to COMMIT's included: the lock's
answer on its way back and COMMIT on its way out make one, each statement sent between
them another.

Without --database-url it creates, migrates and drops a throwaway database
(coupons_bench_round_trips, on DATABASE_URL's server); with it, that database must be
migrated. Prints the round trips and the counts; --json prints them as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import harness
from latency import coupon_body
from request_cost import wsgi_call

# The service itself is imported from the repository, beside bench/.
sys.path.insert(0, str(harness.REPO_DIR))

OWN_DATABASE = "coupons_bench_round_trips"
CLAIMS_BEFORE = 10  # More than PREPARE_THRESHOLD (5): the traced claim's statements are prepared.
MARKER = "bench: the traced claim starts here"
RECORD = re.compile(r"^([FB])\t\d+\t(\w+)\t?(.*)$")
LOCKING = re.compile(r"\bFOR\s+(NO\s+KEY\s+)?UPDATE\b", re.IGNORECASE)


@dataclass
class RoundTrip:
    """Messages the client sent in one burst, and the server's answers to them."""

    sent: list[str] = field(default_factory=list)  # Message types: Bind, Execute, Query…
    statement: str = ""  # The SQL it ran, its prepared statement's text if it bound one.
    answers: list[str] = field(default_factory=list)

    @property
    def takes_lock(self) -> bool:
        """Whether its statement takes a row lock."""
        return bool(LOCKING.search(self.statement))

    @property
    def ends_transaction(self) -> bool:
        """Whether it commits or rolls back."""
        return self.statement.strip().upper() in {"COMMIT", "ROLLBACK"}

    @property
    def label(self) -> str:
        """Its statement, shortened for a table."""
        text = " ".join(self.statement.split())
        if self.takes_lock:
            return f"{text[:40]} … {LOCKING.search(text).group(0)}"  # type: ignore[union-attr]
        return text if len(text) <= 60 else f"{text[:57]}…"


def _records(trace: str) -> Iterator[tuple[str, str, str]]:
    """(direction, message type, rest) of each message of a libpq trace; a message's text
    may run over several lines (a statement's new lines)."""
    current: list[str] | None = None
    for line in trace.splitlines():
        found = RECORD.match(line)
        if found:
            if current is not None:
                yield current[0], current[1], current[2]
            current = [found.group(1), found.group(2), found.group(3)]
        elif current is not None:
            current[2] += "\n" + line
    if current is not None:
        yield current[0], current[1], current[2]


def round_trips(trace: str) -> list[RoundTrip]:
    """Split a libpq trace into round trips, each with the SQL it ran."""
    prepared: dict[str, str] = {}
    trips: list[RoundTrip] = []
    for direction, kind, rest in _records(trace):
        if direction == "F":
            if not trips or trips[-1].answers:
                trips.append(RoundTrip())
            trip = trips[-1]
            trip.sent.append(kind)
            if kind == "Parse":
                # ' "name" "text" <parameter types>': the text may hold double quotes.
                parsed = re.match(r'^ "([^"]*)" "(.*)"(?: \d+)*$', rest, re.DOTALL)
                if parsed:
                    prepared[parsed.group(1)] = parsed.group(2)
                    trip.statement = trip.statement or parsed.group(2)
            elif kind == "Bind":
                bound = re.match(r'^ "[^"]*" "([^"]*)"', rest)
                if bound and not trip.statement:
                    trip.statement = prepared.get(bound.group(1), "")
            elif kind == "Query":
                query = re.match(r'^ "(.*)"$', rest, re.DOTALL)
                trip.statement = query.group(1) if query else rest
        elif trips:
            trips[-1].answers.append(kind)
    return trips


def under_lock(trips: list[RoundTrip]) -> int:
    """Round trips of the network the lock is held across (see the module's docstring)."""
    lock = next((index for index, trip in enumerate(trips) if trip.takes_lock), None)
    if lock is None:
        return 0
    end = next(
        (index for index, trip in enumerate(trips) if index > lock and trip.ends_transaction),
        len(trips) - 1,
    )
    return end - lock


@contextmanager
def database(url: str | None) -> Iterator[str]:
    """The database to work in: url, or a throwaway one made and migrated for the block."""
    if url:
        yield url
        return
    parts = urlsplit(harness.bench_database_url())
    own = urlunsplit(parts._replace(path=f"/{OWN_DATABASE}"))
    with harness.fresh_database(own):
        harness.migrate(harness.service_env(own, port=8080))
        yield own


def traced_claim(database_url: str) -> dict[str, Any]:
    """Claim as described in the module's docstring; return the traced claim's round trips."""
    os.environ.update(harness.service_env(database_url, port=8080))
    os.environ.update(LOG_LEVEL="ERROR", LOG_REQUESTS="false")  # Logs touch no database.
    os.environ["DJANGO_SETTINGS_MODULE"] = "couponsite.settings"
    from couponsite.wsgi import application  # Sets Django up first.

    # isort: split
    from django.db import connection
    from psycopg import pq

    name = f"round-trips-{os.getpid()}"

    def post(path: str, body: dict[str, Any], expected: str) -> None:
        status = wsgi_call(application, "POST", path, json.dumps(body).encode())
        if not status.startswith(expected):
            raise harness.BenchError(f"POST {path} {body} answered {status}")

    def claim(number: int) -> None:
        post("/api/coupons/claim", {"user_id": f"u{number}", "coupon_name": name}, "201")

    post("/api/coupons", coupon_body(name, 1_000), "201")
    connection.ensure_connection()
    pgconn = connection.connection.pgconn
    with tempfile.TemporaryFile("w+") as trace_file:
        # Traced from the first claim, so that the statements' texts are in the trace
        # when psycopg prepares them.
        pgconn.trace(trace_file.fileno())
        pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)
        for number in range(CLAIMS_BEFORE):
            claim(number)
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT '{MARKER}'")
        claim(CLAIMS_BEFORE)
        pgconn.untrace()  # Flushes the trace.
        trace_file.seek(0)
        trace = trace_file.read()
    connection.close()
    trips = round_trips(trace)
    marker = max(index for index, trip in enumerate(trips) if MARKER in trip.statement)
    claim_trips = trips[marker + 1 :]
    return {
        "round_trips": len(claim_trips),
        "under_lock": under_lock(claim_trips),
        "statements": [trip.label for trip in claim_trips],
        "takes_lock": [trip.takes_lock for trip in claim_trips],
    }


def describe(counts: dict[str, Any]) -> str:
    """The counts as lines to read."""
    lines = ["a winning claim's round trips to PostgreSQL (libpq trace, statements prepared):"]
    locked = False
    for number, (statement, takes_lock) in enumerate(
        zip(counts["statements"], counts["takes_lock"], strict=True), start=1
    ):
        note = ""
        if takes_lock and not locked:
            note, locked = "   <- takes the coupon's lock", True
        elif locked and statement in {"COMMIT", "ROLLBACK"}:
            note, locked = "   <- lets it go", False
        elif locked:
            note = "   (the lock held)"
        lines.append(f"  {number}. {statement}{note}")
    lines.append(
        f"{counts['round_trips']} round trips; the lock is held across {counts['under_lock']} "
        "of the network's (from the lock's answer to COMMIT's arrival)"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Count and print; exit 2 if it could not run."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database-url", help="a migrated database (default: a throwaway one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        with database(args.database_url) as url:
            counts = traced_claim(url)
    except harness.BenchError as error:
        print(f"claim_round_trips: {error}", file=sys.stderr)
        return 2
    print(json.dumps(counts) if args.json else describe(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
