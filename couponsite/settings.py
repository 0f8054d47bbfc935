"""Settings for the coupon service, read from the environment.

Every value has a safe default for a local run; see the README for the full list.
"""

import datetime
import os
import secrets
import tempfile
from pathlib import Path

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

# Lets generic classes such as ModelAdmin[Coupon] be subscripted at run time, for typing.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    """Read a yes/no environment variable."""
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_list(name: str, default: str) -> list[str]:
    """Read a comma-separated environment variable."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


DEBUG = env_bool("DEBUG", False)

# API keys (coupons/access.py): `required`, or `off` for an API open to whoever reaches it.
API_AUTH = os.environ.get("API_AUTH", "").strip().lower() or "off"
if API_AUTH not in {"off", "required"}:
    raise ImproperlyConfigured(f"API_AUTH must be off or required, not {API_AUTH!r}.")
API_AUTH_REQUIRED = API_AUTH == "required"


def read_or_create_secret_key(path: Path) -> str:
    """Return the key stored at path, creating it once (readable by its owner only)."""
    if not path.exists():
        # Written aside, then linked into place: processes starting together all end
        # up reading the one key that won, never a half-written file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as draft:
            draft.write(secrets.token_urlsafe(50))
        try:
            os.link(draft.name, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(draft.name)
    return path.read_text().strip()


ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    # coupons.ApiKey extends its abstract model; its module also defines a concrete model,
    # which needs the app installed (an unused table, kept out of the admin).
    "rest_framework_api_key",
    "axes",
    "coupons",
]

MIDDLEWARE = [
    # Probes first, before the Host header is checked (couponsite/observability.py).
    "couponsite.observability.HealthChecks",
    # Then what times, counts and logs every other answer, whatever answered it.
    "couponsite.observability.ObserveRequests",
    "couponsite.middleware.HeadWithoutBody",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: answers a locked-out admin login with 429.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "couponsite.urls"
WSGI_APPLICATION = "couponsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# PostgreSQL when DATABASE_URL is set; otherwise an embedded SQLite file.
# Connections are kept open between requests: a claim should not pay for a new
# connection. No health check before reuse: it would cost every request a round trip,
# while a connection that broke (say, PostgreSQL restarted) fails one request with a
# 503, is then discarded by Django, and the next request opens a fresh one.
DATABASE_URL = os.environ.get("DATABASE_URL", "")
CONN_MAX_AGE = int(os.environ["CONN_MAX_AGE"]) if os.environ.get("CONN_MAX_AGE") else None
# DB_POOLER=pgbouncer: DATABASE_URL names a PgBouncer in transaction pooling, which runs each
# transaction on whichever server session is free. Nothing may then outlive a transaction on
# its session: no prepared statements, no server-side cursors (a cursor's rows are fetched
# by later statements), no session settings sent at connection time (PgBouncer refuses the
# `options` startup parameter; its connect_query sets the timeouts, deploy/pgbouncer.ini).
DB_POOLER = os.environ.get("DB_POOLER", "").strip().lower() or "none"
if DB_POOLER not in {"none", "pgbouncer"}:
    raise ImproperlyConfigured(f"DB_POOLER must be none or pgbouncer, not {DB_POOLER!r}.")
BEHIND_PGBOUNCER = DB_POOLER == "pgbouncer"


def postgresql_database(url: str) -> dj_database_url.DBConfig:
    """The DATABASES entry for the PostgreSQL URL, with the options below."""
    database = dj_database_url.parse(url, conn_max_age=CONN_MAX_AGE)
    # Send parameters apart from the SQL and prepare a statement once it has run 5 times
    # on a connection: PostgreSQL then skips parsing and planning it on every claim.
    # Behind PgBouncer the parameters are still sent apart (in unnamed statements, parsed
    # and run in one exchange), but nothing is prepared.
    database.setdefault("OPTIONS", {}).update(
        server_side_binding=True,
        prepare_threshold=(
            None if BEHIND_PGBOUNCER else int(os.environ.get("PREPARE_THRESHOLD", "5") or 0) or None
        ),
    )
    database["DISABLE_SERVER_SIDE_CURSORS"] = BEHIND_PGBOUNCER
    # No request waits on the database for long: it gets a 503 to retry instead, well
    # before gunicorn's timeout would kill its worker. A connection attempt gives up after
    # DB_CONNECT_TIMEOUT seconds (a server that does not answer); a statement is cancelled
    # after DB_STATEMENT_TIMEOUT_MS (a claim queued behind a lock that is not let go); and
    # a session idle inside a transaction for DB_IDLE_IN_TRANSACTION_TIMEOUT_MS (a worker
    # stuck while it holds a coupon's lock, which every claim of that coupon waits for) is
    # ended, its transaction rolled back. 0 turns either of these two off. A connect_timeout
    # or options given in the URL's query string win.
    session_timeouts = {
        "statement_timeout": int(os.environ.get("DB_STATEMENT_TIMEOUT_MS") or 5000),
        "idle_in_transaction_session_timeout": int(
            os.environ.get("DB_IDLE_IN_TRANSACTION_TIMEOUT_MS") or 10000
        ),
    }
    timeouts = " ".join(f"-c {name}={value}" for name, value in session_timeouts.items())
    database_options = database["OPTIONS"]
    if not BEHIND_PGBOUNCER:
        database_options["options"] = f"{timeouts} {database_options.get('options', '')}".strip()
    elif os.environ.get("DB_STATEMENT_TIMEOUT_MS") or os.environ.get(
        "DB_IDLE_IN_TRANSACTION_TIMEOUT_MS"
    ):
        raise ImproperlyConfigured(
            "DB_STATEMENT_TIMEOUT_MS and DB_IDLE_IN_TRANSACTION_TIMEOUT_MS cannot reach "
            "PostgreSQL through PgBouncer (DB_POOLER=pgbouncer): set them in PgBouncer's "
            "connect_query, as deploy/pgbouncer.ini does."
        )
    database_options.setdefault("connect_timeout", int(os.environ.get("DB_CONNECT_TIMEOUT") or 3))
    return database


if DATABASE_URL:
    DATABASES = {"default": postgresql_database(DATABASE_URL)}
else:
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            "CONN_MAX_AGE": CONN_MAX_AGE,
            "OPTIONS": {
                # Every atomic block starts with BEGIN IMMEDIATE and so takes SQLite's
                # single write lock up front: claims from several processes queue on
                # the busy timeout instead of failing with "database is locked" when a
                # reader tries to upgrade. WAL lets reads run beside the writer.
                "transaction_mode": "IMMEDIATE",
                "timeout": int(os.environ.get("SQLITE_BUSY_TIMEOUT", "30")),
                "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            },
        }
    }

# DATABASE_REPLICA_URL: a read replica of DATABASE_URL's database (a hot standby), taken
# with the same options and DB_POOLER. Only the coupon details and the listing read from it
# (couponsite/routers.py), and may lag the primary by the replication delay; everything
# else stays on the primary (docs/scaling.md, "Reads from a replica").
DATABASE_REPLICA_URL = os.environ.get("DATABASE_REPLICA_URL", "")
if DATABASE_REPLICA_URL:
    if not DATABASE_URL:
        raise ImproperlyConfigured(
            "DATABASE_REPLICA_URL names a replica of DATABASE_URL's PostgreSQL: set both."
        )
    DATABASES["replica"] = postgresql_database(DATABASE_REPLICA_URL)
    # Tests read the primary's test database through it, as they would a replica of it.
    DATABASES["replica"]["TEST"] = {"MIRROR": "default"}
    DATABASE_ROUTERS = ["couponsite.routers.ReplicaRouter"]

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

# SECRET_KEY signs the admin's sessions. From the environment; the embedded run (SQLite) or
# DEBUG may do without, with a random key kept in a local file so that every worker shares
# it. A deployment on PostgreSQL must set one: a key made inside a container is lost with it.
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if DATABASE_URL and not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when the service runs on PostgreSQL (DATABASE_URL) with "
            "DEBUG off; make one with: python -c 'import secrets; print(secrets.token_urlsafe(50))'"
        )
    SECRET_KEY = read_or_create_secret_key(
        Path(os.environ.get("SECRET_KEY_FILE", BASE_DIR / ".secret_key"))
    )

# HTTPS. Clients reach a deployment over HTTPS, ended by a proxy in front of gunicorn that
# says so in X-Forwarded-Proto (TRUST_X_FORWARDED_PROTO). HTTPS_ONLY then sends plain-HTTP
# requests to HTTPS, marks the admin's cookies secure and asks browsers to keep to HTTPS
# (HSTS). Probes answer before the redirect (couponsite/observability.py), and so does
# /metrics, scraped from inside the network.
if env_bool("TRUST_X_FORWARDED_PROTO", False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
HTTPS_ONLY = env_bool("HTTPS_ONLY", False)
SECURE_SSL_REDIRECT = HTTPS_ONLY
SECURE_REDIRECT_EXEMPT = [r"^metrics$"]
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = HTTPS_ONLY
SECURE_HSTS_SECONDS = int(os.environ.get("HSTS_SECONDS") or (31_536_000 if HTTPS_ONLY else 0))
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("HSTS_INCLUDE_SUBDOMAINS", HTTPS_ONLY)
SECURE_HSTS_PRELOAD = env_bool("HSTS_PRELOAD", HTTPS_ONLY)

# The cache: Redis when REDIS_URL is set, shared by every worker of every instance, which
# the rate limits and the admin's login lockout need; else each process's own memory.
REDIS_URL = os.environ.get("REDIS_URL", "")
CACHES = {
    "default": (
        {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": REDIS_URL,
            # A Redis that does not answer costs a request at most this, not a hang.
            "OPTIONS": {"socket_connect_timeout": 0.5, "socket_timeout": 0.5},
        }
        if REDIS_URL
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# The admin's login, against password guessing (django-axes): after AXES_FAILURE_LIMIT
# failures for one user name from one address, that pair is refused (429) for the cool-off.
# Counted in the cache when it is Redis, else in the database (a process's memory would let
# each worker count apart).
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_HANDLER = "axes.handlers." + (
    "cache.AxesCacheHandler" if REDIS_URL else "database.AxesDatabaseHandler"
)
AXES_FAILURE_LIMIT = int(os.environ.get("ADMIN_LOGIN_FAILURE_LIMIT") or 5)
AXES_COOLOFF_TIME = datetime.timedelta(
    minutes=float(os.environ.get("ADMIN_LOGIN_COOLOFF_MINUTES") or 15)
)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_CLIENT_IP_CALLABLE = "coupons.access.client_address"
AXES_VERBOSE = False  # No banner at every start of every process.

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# How long a worker answers claims on a coupon sold out or outside its sale window from
# memory before checking the database again: an operator's change of stock or window, or a
# revocation, reaches every worker within this time (at once in the worker that made it).
# 0 turns the memory off.
SOLD_OUT_MEMORY_SECONDS = float(os.environ.get("SOLD_OUT_MEMORY_SECONDS") or 1.0)

# Request bodies of the API are a few hundred bytes; anything much larger is refused with 413.
DATA_UPLOAD_MAX_MEMORY_SIZE = int(os.environ.get("MAX_BODY_BYTES", str(64 * 1024)))

REST_FRAMEWORK = {
    # JSON only; the API's viewset parses with coupons.api.BoundedJSONParser.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    # A shop's backend calls the API, with an API key when API_AUTH=required (no sessions,
    # no CSRF); coupons/access.py.
    "DEFAULT_AUTHENTICATION_CLASSES": ["coupons.access.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["coupons.access.ScopeRequired"],
    "UNAUTHENTICATED_USER": None,
    # Rate limits, in DRF's notation ("1000/s", "5/min"); unset, nobody is throttled.
    "DEFAULT_THROTTLE_CLASSES": [
        "coupons.access.ClientRateThrottle",
        "coupons.access.ShopperRateThrottle",
    ],
    "DEFAULT_THROTTLE_RATES": {
        "client": os.environ.get("RATE_LIMIT_CLIENT") or None,
        "shopper": os.environ.get("RATE_LIMIT_SHOPPER") or None,
    },
    # How many proxies in front set X-Forwarded-For: 0 counts by the connection's address.
    "NUM_PROXIES": int(os.environ.get("NUM_PROXIES") or 0),
    "EXCEPTION_HANDLER": "coupons.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "coupons.schema.CouponApiSchema",
}

# The OpenAPI schema at /api/schema and Swagger UI at /api/docs, its scripts served from the
# installed sidecar package, not a CDN (drf-spectacular's Redoc page loads web fonts from
# Google, so it is not offered).
SPECTACULAR_SETTINGS = {
    "TITLE": "Flash-sale coupon service",
    "DESCRIPTION": (
        "Create coupons with a limited stock and claim them for shoppers, under any "
        "concurrency: a coupon is never claimed more than its stock, and a user never "
        "claims the same coupon twice. Every error is JSON: "
        '`{"error": {"code": "...", "message": "...", ...}}`.'
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema and its page are open to read, whatever API_AUTH says.
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    # No request to swagger.io's validator: the page works without internet.
    "SWAGGER_UI_SETTINGS": {"deepLinking": True, "validatorUrl": None},
    "COMPONENT_SPLIT_REQUEST": True,
    "PREPROCESSING_HOOKS": ["coupons.schema.paths_without_trailing_slash"],
}

# One line per request from coupons.requests (couponsite/observability.py): JSON for log
# collectors wherever the service runs on PostgreSQL, text to read in the embedded run.
LOG_FORMAT = os.environ.get("LOG_FORMAT") or ("json" if DATABASE_URL else "text")
if LOG_FORMAT not in {"json", "text"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be json or text, not {LOG_FORMAT!r}.")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "json": {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": "%(levelname)s %(name)s %(message)s %(request_id)s",
            "timestamp": "time",  # ISO 8601, in UTC, with its zone.
            "rename_fields": {"levelname": "level", "name": "logger"},
        },
        "text": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
    },
    "filters": {"request_id": {"()": "couponsite.observability.RequestIdFilter"}},
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": LOG_FORMAT,
            "filters": ["request_id"],
        },
        "null": {"class": "logging.NullHandler"},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO").upper()},
    "loggers": {
        "coupons.requests": {"level": "INFO" if env_bool("LOG_REQUESTS", True) else "WARNING"},
        # A refused request is an expected answer (a 4xx JSON body), not a warning.
        "django.request": {"level": "ERROR"},
        # A wrong Host header is answered with 400; a scanner's noise is no operator's concern.
        "django.security.DisallowedHost": {"handlers": ["null"], "propagate": False},
    },
}
