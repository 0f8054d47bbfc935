"""Settings for the coupon service, read from the environment.

Every value has a safe default for a local run; see the README for the full list.
"""

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


# SECRET_KEY from the environment; without one, a random key kept in a local file, so
# a local run needs no set-up and every worker shares the key.
SECRET_KEY = os.environ.get("SECRET_KEY") or read_or_create_secret_key(
    Path(os.environ.get("SECRET_KEY_FILE", BASE_DIR / ".secret_key"))
)

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
if DATABASE_URL:
    DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=CONN_MAX_AGE)}
    # Send parameters apart from the SQL and prepare a statement once it has run 5 times
    # on a connection: PostgreSQL then skips parsing and planning it on every claim.
    # (Behind a transaction-pooling PgBouncer, set PREPARE_THRESHOLD= to turn this off.)
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        server_side_binding=True,
        prepare_threshold=int(os.environ.get("PREPARE_THRESHOLD", "5") or 0) or None,
    )
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

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

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
    # The API is called by a shop's backend on a private network; no sessions or CSRF.
    "DEFAULT_AUTHENTICATION_CLASSES": [],
    "DEFAULT_PERMISSION_CLASSES": [],
    "UNAUTHENTICATED_USER": None,
    "EXCEPTION_HANDLER": "coupons.errors.api_exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
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
