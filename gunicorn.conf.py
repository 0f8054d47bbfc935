"""gunicorn settings, from the environment (see the README's configuration table)."""

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

bind = f"{os.environ.get('HOST') or '127.0.0.1'}:{os.environ.get('PORT') or '8080'}"

# One worker per core, at least two so that one slow request never holds up all. With
# PostgreSQL on the same cores a worker's wait is the database's own CPU time, and more
# workers only compete for the cores: on 2 cores, 2 workers won 1.35x the claims of 5 in
# B2, at 0.63x the CPU per claim (docs/performance.md). With the database on another
# machine the cores idle during each round trip: raise WEB_CONCURRENCY and measure.
# Each worker holds one database connection.
workers = int(os.environ.get("WEB_CONCURRENCY") or max(2, multiprocessing.cpu_count()))
threads = int(os.environ.get("GUNICORN_THREADS") or 1)
worker_class = "gthread" if threads > 1 else "sync"

# A request waiting this long is stuck: the worker is replaced and its transaction, if
# any, is rolled back by the database when the connection drops.
timeout = int(os.environ.get("GUNICORN_TIMEOUT") or 30)
graceful_timeout = 10
keepalive = 5
# The longest request line gunicorn allows: room for any coupon name percent-encoded
# (255 characters of up to 12 bytes each) with plenty to spare.
limit_request_line = 8190

# Access logs cost a write per request; errors always go to stderr.
accesslog = "-" if os.environ.get("ACCESS_LOG", "").lower() in {"1", "true", "yes"} else None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

wsgi_app = "couponsite.wsgi:application"

# Prometheus metrics from every worker, added up at /metrics (couponsite/observability.py):
# each worker writes its counts into PROMETHEUS_MULTIPROC_DIR, which must be the server's own.
# Unset, the server makes a directory of its own as it starts and removes it as it stops.
_own_metrics_directory: str | None = None


def on_starting(server: object) -> None:
    global _own_metrics_directory
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _own_metrics_directory = tempfile.mkdtemp(prefix="coupons-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _own_metrics_directory
    directory = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()


def on_exit(server: object) -> None:
    if _own_metrics_directory:
        shutil.rmtree(_own_metrics_directory, ignore_errors=True)


def child_exit(server: object, worker: Any) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
