"""Where queries go when a read replica is configured (DATABASE_REPLICA_URL, settings.py).

Only the reads made inside reads_from_replica() go to the replica: the coupon details and
the listing enter it (coupons/api.py), views whose answers may lag the primary by the
replication delay. Every other read stays on the primary, by default rather than by a list
to keep up to date: a claim's look before the lock, idempotency look-ups, API keys, the
admin, the commands. So does every write and every lock (Django routes those through
db_for_write, which this router leaves to the default).
"""

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import DEFAULT_DB_ALIAS
from django.db.models import Model

# The alias settings.py gives DATABASE_REPLICA_URL.
REPLICA_DB_ALIAS = "replica"

# A context variable, not a global: each thread (and asyncio task) serving a request has its
# own, so one view's choice never reaches another request's queries.
_reading_from_replica = contextvars.ContextVar("reading_from_replica", default=False)


@contextmanager
def reads_from_replica() -> Iterator[None]:
    """Send the reads made inside to the replica, if one is configured (else nothing changes)."""
    token = _reading_from_replica.set(True)
    try:
        yield
    finally:
        _reading_from_replica.reset(token)


class ReplicaRouter:
    """Reads inside reads_from_replica() from the replica; everything else on the primary."""

    def db_for_read(self, model: type[Model], **hints: Any) -> str | None:
        # None: Django's default, the primary (or the database of the instance in the hints).
        return REPLICA_DB_ALIAS if _reading_from_replica.get() else None

    def allow_relation(self, obj1: Model, obj2: Model, **hints: Any) -> bool | None:
        # The replica holds the primary's rows: objects read from either may be related.
        databases = {DEFAULT_DB_ALIAS, REPLICA_DB_ALIAS}
        return True if {obj1._state.db, obj2._state.db} <= databases else None

    def allow_migrate(
        self, db: str, app_label: str, model_name: str | None = None, **hints: Any
    ) -> bool:
        # The replica gets its schema from the primary through replication.
        return db == DEFAULT_DB_ALIAS
