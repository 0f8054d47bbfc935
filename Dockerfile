FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt

COPY . .
RUN SECRET_KEY=collectstatic-only python manage.py collectstatic --noinput --verbosity 0 \
    && useradd --no-create-home --shell /usr/sbin/nologin app \
    && chown app /app
USER app

EXPOSE 8080
# Ready: the database answers and the migrations are applied (couponsite/observability.py).
HEALTHCHECK --interval=5s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"PORT\"]}/readyz', timeout=2)"]
# Migrations are applied on start; they are idempotent, so a restart is harmless. They may take
# longer than the service's statement timeout, which is for the claims, not for them.
CMD ["sh", "-c", "DB_STATEMENT_TIMEOUT_MS=0 python manage.py migrate --noinput && exec gunicorn -c gunicorn.conf.py"]
