# The two set-up commands: `make run` serves the API, `make test` runs the suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
, := ,
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test check audit bench bench-quick bench-compare clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "Python 3.11 or newer is needed (found $$($(PYTHON) --version))."; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-runtime: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@touch $@

$(VENV)/.installed-dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	@touch $@ $(VENV)/.installed-runtime

## run: create the database if missing, migrate and serve on 127.0.0.1:8080 (SQLite unless DATABASE_URL is set)
run: $(VENV)/.installed-runtime
	$(BIN)/python manage.py create_database
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	exec $(BIN)/gunicorn -c gunicorn.conf.py

## test: the whole suite, on PostgreSQL (DATABASE_URL, else 127.0.0.1:5432, else a throwaway server) and SQLite,
## the admin in headless Chromium, instances behind HAProxy and PgBouncer (installed with apt-get when missing),
## under branch coverage (gunicorn servers included); fails below 90% for coupons/
test: $(VENV)/.installed-dev
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) \
		|| echo "Chromium could not be installed here; the browser test will fail and say so."
# The tests start HAProxy and PgBouncer of their own on free ports: Debian's services, which
# the packages may start and enable, are stopped and disabled.
	@PATH="$$PATH:/usr/sbin"; command -v haproxy >/dev/null && command -v pgbouncer >/dev/null \
		|| (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy pgbouncer \
			&& { for service in haproxy pgbouncer; do \
				systemctl disable --now $$service || service $$service stop; done >/dev/null 2>&1; true; }) \
		|| echo "HAProxy and PgBouncer could not be installed here; the topology tests will fail and say so."
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report
	$(BIN)/coverage report --include='coupons/*' --fail-under=90 > /dev/null \
		|| { echo "Coverage of coupons/ is below 90%."; exit 1; }

## check: lint, formatting, types, migrations in step with the models, the OpenAPI schema without warnings, known vulnerabilities
check: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python manage.py makemigrations --check --dry-run
	$(BIN)/python manage.py spectacular --validate --fail-on-warn --file /dev/null
	@$(MAKE) --no-print-directory audit

# pip-audit asks PyPI's advisory data about every pinned package. A known vulnerability
# fails the check; an advisory service that cannot be reached is said plainly instead.
audit: $(VENV)/.installed-dev
	@$(BIN)/pip-audit --progress-spinner off -r requirements.txt -r requirements-dev.txt \
		> $(VENV)/audit.log 2>&1; status=$$?; cat $(VENV)/audit.log; \
	if grep -q "^Found [0-9]* known vulnerabilit" $(VENV)/audit.log; then \
		echo "Dependency audit: known vulnerabilities above; upgrade the pins."; exit 1; \
	elif [ $$status -ne 0 ] || grep -q "could not be audited" $(VENV)/audit.log; then \
		echo "Dependency audit INCOMPLETE: PyPI's advisory data could not be reached for the packages above"; \
		echo "(no network, or a package mirror without PyPI's JSON API). Nothing known was found; rerun where pypi.org answers."; \
	fi

## bench: the flash-sale benchmark B1-B4 on PostgreSQL, 3 runs each (about 4 and a half minutes); see docs/performance.md
bench: $(VENV)/.installed-runtime
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python bench/run.py

## bench-quick: smaller sizes, one run each (about 30 seconds)
bench-quick: $(VENV)/.installed-runtime
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python bench/run.py --quick

## bench-compare: this checkout against REV (default HEAD) in 4 pairs run back to back; SCENARIOS=B1,B2 by default
bench-compare: $(VENV)/.installed-runtime
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python bench/compare.py $(or $(REV),HEAD) --scenarios $(or $(SCENARIOS),B1$(,)B2)

.PHONY: bench-latency bench-shards-db

## bench-latency: one hot coupon on 1, 4 and 16 stock shards with PostgreSQL 0, 0.5 and 2 ms away (a delaying
## proxy), then pgbench's K-shard lock at those delays (about 10 minutes); DELAYS=0,1 SHARDS=1,16 DURATION=20 (s)
## WORKERS=4 SHARD_WORKERS=16 SHARD_THREADS=1 to change the service's part; see docs/scaling.md
bench-latency: $(VENV)/.installed-runtime
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python bench/latency.py $(if $(DELAYS),--delays $(DELAYS)) \
		$(if $(SHARDS),--stock-shards $(SHARDS)) $(if $(DURATION),--seconds $(DURATION)) \
		$(if $(WORKERS),--workers $(WORKERS)) $(if $(SHARD_WORKERS),--shard-workers $(SHARD_WORKERS)) \
		$(if $(SHARD_THREADS),--shard-threads $(SHARD_THREADS))

## bench-shards-db: pgbench alone: one hot row against K = 1, 4, 16 stock shards at 0, 0.5 and 2 ms one-way
## (about 2 minutes); DELAYS=… to change; see docs/scaling.md
bench-shards-db: $(VENV)/.installed-runtime
	@command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python bench/shards_db.py $(if $(DELAYS),--delays $(DELAYS))

clean:
	rm -rf $(VENV) staticfiles .pytest_cache
