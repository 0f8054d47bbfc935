"""gunicorn settings, from the environment (see the README's configuration table)."""

import multiprocessing
import os

bind = f"{os.environ.get('HOST') or '127.0.0.1'}:{os.environ.get('PORT') or '8080'}"

# A claim spends most of its time waiting on the database, so more processes than
# cores keep the CPUs busy while others wait. Each holds one database connection.
workers = int(os.environ.get("WEB_CONCURRENCY") or multiprocessing.cpu_count() * 2 + 1)
threads = int(os.environ.get("GUNICORN_THREADS") or 1)
# One thread: gunicorn's sync worker, closing each connection as soon as it may
# (couponsite/workers.py).
worker_class = "gthread" if threads > 1 else "couponsite.workers.SyncWorker"

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
