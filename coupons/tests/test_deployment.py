"""Keeps docker-compose.yml, the Dockerfile and the README honest where Docker cannot run."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml

from coupons.tests import live, topology

ROOT = live.PROJECT_DIR


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_command(dockerfile: str) -> list[str]:
    match = re.search(r"^CMD (\[.*\])$", dockerfile, re.M)
    assert match, "the Dockerfile has no CMD in JSON form"
    command: list[str] = json.loads(match.group(1))
    return command


def healthcheck_command(dockerfile: str) -> list[str]:
    match = re.search(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", dockerfile, re.M)
    assert match, "the Dockerfile has no HEALTHCHECK with a CMD in JSON form"
    command: list[str] = json.loads(match.group(1))
    return command


def test_the_image_and_compose_check_readiness(compose: dict[str, Any], dockerfile: str) -> None:
    assert "/readyz" in " ".join(healthcheck_command(dockerfile))
    assert "/readyz" in " ".join(compose["services"]["app"]["healthcheck"]["test"])


def test_compose_starts_postgres_before_the_app_on_port_8080(compose: dict[str, Any]) -> None:
    database, app = compose["services"]["db"], compose["services"]["app"]

    assert database["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(database["healthcheck"]["test"])
    assert app["depends_on"]["db"]["condition"] == "service_healthy"
    assert app["build"] == "."
    # On the host's loopback only: the proxy in front, and nobody else, reaches the app.
    assert app["ports"] == ["127.0.0.1:8080:8080"]


def test_compose_points_the_app_at_its_own_postgres(compose: dict[str, Any]) -> None:
    database_env = compose["services"]["db"]["environment"]
    url = urlsplit(compose["services"]["app"]["environment"]["DATABASE_URL"])

    assert url.scheme == "postgres"
    assert (url.hostname, url.port) == ("db", 5432)
    assert url.username == database_env["POSTGRES_USER"]
    assert url.password == database_env["POSTGRES_PASSWORD"]
    assert url.path == f"/{database_env['POSTGRES_DB']}"


def test_the_image_installs_the_pinned_requirements_and_listens_on_8080(dockerfile: str) -> None:
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)
    assert "pip install -r requirements.txt" in dockerfile
    assert re.search(r"HOST=0\.0\.0\.0", dockerfile)
    assert re.search(r"PORT=8080", dockerfile)
    assert "EXPOSE 8080" in dockerfile


def compose_environment(
    compose: dict[str, Any], service: str = "app", **given: str
) -> dict[str, str]:
    """A service's environment in the compose file, as compose resolves it: `${NAME:-default}`
    takes its default unless given; `${NAME:?message}` must be given; a name without a value
    is passed on from compose's own environment, here `given`, and left out when unset."""

    def resolve(match: re.Match[str]) -> str:
        name, kind, fallback = match.groups()
        if name in given:
            return given[name]
        assert kind == ":-", f"the compose file needs {name} ({fallback})"
        return str(fallback)

    environment = compose["services"][service]["environment"]
    resolved = {
        key: re.sub(r"\$\{([A-Z_]+)(:-|:\?)([^}]*)\}", resolve, str(value))
        for key, value in environment.items()
        if value is not None
    }
    passed_on = {
        key: given[key] for key, value in environment.items() if value is None and key in given
    }
    return {**resolved, **passed_on}


def test_the_compose_file_sets_no_empty_value(compose: dict[str, Any]) -> None:
    """An empty value is not an unset one: gunicorn, for one, stops on WEB_CONCURRENCY=''."""
    for service in ["app", "app-replica"]:
        environment = compose_environment(compose, service, SECRET_KEY=STRONG_KEY)
        assert [key for key, value in environment.items() if value == ""] == [], service


STRONG_KEY = "compose-" + "k7Qx" * 15


def test_the_compose_file_requires_a_secret_key(compose: dict[str, Any]) -> None:
    with pytest.raises(AssertionError, match="needs SECRET_KEY"):
        compose_environment(compose)


def test_check_deploy_is_clean_under_the_compose_configuration(compose: dict[str, Any]) -> None:
    environment = {
        **os.environ,
        **compose_environment(compose, SECRET_KEY=STRONG_KEY),
        "DATABASE_URL": os.environ["DATABASE_URL"],  # The compose file's "db" is not here.
    }
    done = live.run_manage(environment, "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


def test_check_deploy_warns_about_an_open_api_and_plain_http() -> None:
    environment = {**os.environ, "SECRET_KEY": STRONG_KEY, "API_AUTH": "off"}
    environment.pop("HTTPS_ONLY", None)
    done = live.run_manage(environment, "check", "--deploy")
    for warning in ["coupons.W001", "security.W008", "security.W012", "security.W004"]:
        assert warning in done.stderr, warning


def test_the_image_command_migrates_and_serves_the_api(
    compose: dict[str, Any], dockerfile: str
) -> None:
    """Run the image's CMD here, with the compose file's environment and our PostgreSQL."""
    with live.postgres_database("coupons_image") as database_url:
        environment = {
            **os.environ,
            # As `WEB_CONCURRENCY=2 docker compose up` passes it on.
            **compose_environment(compose, SECRET_KEY=STRONG_KEY, WEB_CONCURRENCY="2"),
            "DATABASE_URL": database_url,  # The compose file's, with our server for "db".
            "REDIS_URL": "redis://127.0.0.1:6379/0",
            "HOST": "127.0.0.1",
            "PORT": str(live.free_port()),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        }
        process = subprocess.Popen(dockerfile_command(dockerfile), cwd=ROOT, env=environment)
        server = live.LiveServer("127.0.0.1", int(environment["PORT"]), process)
        try:
            # Plain HTTP is sent to HTTPS, as the compose file asks.
            live.wait_until_serving(server, timeout=60, ready_status=301)
            made = live.run_manage(
                environment, "create_api_key", "--scope", "admin", "--name", "shop"
            )
            assert made.returncode == 0, made.stderr
            # As the proxy in front sends them: over HTTPS, with the shop's key.
            headers = {
                "X-Forwarded-Proto": "https",
                "Authorization": f"Bearer {made.stdout.splitlines()[-1]}",
            }
            created = server.request(
                "POST", "/api/coupons", {"name": "IMAGE", "amount": 1}, headers
            )
            assert created.status == 201, created
            assert created.headers["strict-transport-security"].startswith("max-age=31536000")
            claim = {"user_id": "u", "coupon_name": "IMAGE"}
            assert server.request("POST", "/api/coupons/claim", claim, headers).status == 201
            assert server.request("POST", "/api/coupons/claim", claim).status == 301
            without_key = server.request(
                "GET", "/api/coupons/IMAGE", None, {"X-Forwarded-Proto": "https"}
            )
            assert without_key.status == 401
            details = server.request("GET", "/api/coupons/IMAGE", None, headers)
            assert details.body["claimed_by"] == ["u"]
            # The image's and the compose file's health checks pass against it.
            compose_check = compose["services"]["app"]["healthcheck"]["test"][1:]
            for check in [healthcheck_command(dockerfile), compose_check]:
                check = [part.replace("8080", environment["PORT"]) for part in check]
                assert subprocess.run(check, env=environment, check=False).returncode == 0
        finally:
            process.terminate()
            process.wait(timeout=15)


# The "scale" profile: app replicas behind HAProxy, on PostgreSQL through PgBouncer.

SCALE_SERVICES = {"pgbouncer", "app-replica", "balancer"}


def test_the_scale_profile_adds_its_services_and_leaves_the_default_alone(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]

    assert {name for name, service in services.items() if "profiles" in service} == SCALE_SERVICES
    for name in SCALE_SERVICES:
        assert services[name]["profiles"] == ["scale"], name
    # The app's replicas: the same image, at least two, started once the app has migrated.
    replica = services["app-replica"]
    assert replica["build"] == services["app"]["build"]
    assert replica["deploy"]["replicas"] >= 2
    assert replica["depends_on"]["app"]["condition"] == "service_healthy"
    assert "ports" not in replica  # Reached through the balancer only.
    assert "migrate" not in " ".join(replica["command"])
    assert replica["healthcheck"] == services["app"]["healthcheck"]


def test_the_replicas_reach_postgres_through_pgbouncer_with_the_pooler_switch_on(
    compose: dict[str, Any],
) -> None:
    environment = compose_environment(compose, "app-replica", SECRET_KEY=STRONG_KEY)
    url = urlsplit(environment["DATABASE_URL"])
    settings = topology.pgbouncer_settings()
    name, fields = topology.pgbouncer_database(settings)
    pgbouncer = compose["services"]["pgbouncer"]
    database_env = compose["services"]["db"]["environment"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in pgbouncer["volumes"]}
    users = (ROOT / "deploy" / "userlist.txt").read_text().split()

    assert environment["DB_POOLER"] == "pgbouncer"
    assert (url.hostname, url.port, url.path) == ("pgbouncer", 6432, f"/{name}")
    assert settings["pgbouncer"]["listen_port"] == "6432"
    assert f'"{url.username}"' in users and f'"{url.password}"' in users
    # PgBouncer serves the compose file's database, in transaction pooling.
    assert (fields["host"], fields["port"]) == ("db", "5432")
    assert fields["dbname"] == database_env["POSTGRES_DB"]
    assert url.username == database_env["POSTGRES_USER"]
    assert settings["pgbouncer"]["pool_mode"] == "transaction"
    assert "statement_timeout" in fields["connect_query"]
    assert mounts["./deploy/pgbouncer.ini"] == "/etc/pgbouncer/pgbouncer.ini"
    assert mounts["./deploy/userlist.txt"] == settings["pgbouncer"]["auth_file"]
    assert compose["services"]["pgbouncer"]["depends_on"]["db"]["condition"] == "service_healthy"


def test_the_replicas_keep_the_apps_production_settings(compose: dict[str, Any]) -> None:
    app = compose_environment(compose, SECRET_KEY=STRONG_KEY)
    replica = compose_environment(compose, "app-replica", SECRET_KEY=STRONG_KEY)
    differences = {"DATABASE_URL", "DB_POOLER", "NUM_PROXIES"}

    assert {key: value for key, value in replica.items() if key not in differences} == {
        key: value for key, value in app.items() if key not in differences
    }
    # HAProxy adds its own X-Forwarded-For entry after the proxy that ends TLS.
    assert int(replica["NUM_PROXIES"]) == int(app["NUM_PROXIES"]) + 1
    environment = {
        **os.environ,
        **replica,
        "DATABASE_URL": os.environ["DATABASE_URL"],  # The compose file's "db" is not here.
    }
    done = live.run_manage(environment, "check", "--deploy", "--fail-level", "WARNING")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_balancer_spreads_over_the_replicas_checked_on_readyz(
    compose: dict[str, Any], dockerfile: str
) -> None:
    balancer = compose["services"]["balancer"]
    configuration = topology.HAPROXY_CONFIG.read_text()
    template = re.search(r"^\s+server-template \S+ (\d+) ([\w-]+):(\d+)", configuration, re.M)
    bind = re.search(r"^\s+bind :(\d+)$", configuration, re.M)

    assert re.fullmatch(r"haproxy:2\.\d+", balancer["image"])
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in balancer["volumes"]
    assert template and bind, "deploy/haproxy.cfg has no server-template or bind line"
    replicas, service, port = template.groups()
    assert service == "app-replica"
    assert f"PORT={port}" in dockerfile  # Where the image serves.
    assert int(replicas) >= compose["services"]["app-replica"]["deploy"]["replicas"]
    assert bind.group(1) == balancer["ports"][0].split(":")[-1]
    assert re.search(r"^\s+balance roundrobin$", configuration, re.M)
    assert re.search(r"^\s+option httpchk GET /readyz$", configuration, re.M)


def test_haproxy_accepts_the_balancers_configuration() -> None:
    checked = subprocess.run(
        [topology.required_program("haproxy"), "-c", "-f", str(topology.HAPROXY_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Configuration file is valid" in checked.stdout


def environment_variables_read_by_the_service() -> set[str]:
    sources = [ROOT / "couponsite" / "settings.py", ROOT / "gunicorn.conf.py"]
    pattern = re.compile(
        r"""(?:environ\.get\(|environ\[|env_bool\(|env_list\()\s*["']([A-Z_]+)["']"""
    )
    return {name for source in sources for name in pattern.findall(source.read_text())}


def test_the_readme_documents_every_environment_variable() -> None:
    readme = (ROOT / "README.md").read_text()
    variables = environment_variables_read_by_the_service()

    assert {"DATABASE_URL", "SECRET_KEY", "PORT", "WEB_CONCURRENCY"} <= variables
    assert sorted(name for name in variables if f"`{name}`" not in readme) == []


def test_make_run_creates_the_database_it_is_pointed_at_when_missing() -> None:
    # As `DATABASE_URL=postgres://.../coupons make run` on a fresh server: the database is
    # made, then migrated; a second run finds it and says nothing.
    with live.postgres_database("coupons_fresh") as existing_url:
        missing_url = existing_url + "_missing"
        environment = live.environment_for(missing_url)
        try:
            first = live.run_manage(environment, "create_database")
            second = live.run_manage(environment, "create_database")
            migrated = live.run_manage(environment, "migrate", "--noinput", "-v", "0")
        finally:
            server = urlsplit(existing_url)._replace(path="/postgres").geturl()
            with psycopg.connect(server, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{urlsplit(missing_url).path[1:]}"')

    assert (first.returncode, second.returncode, migrated.returncode) == (0, 0, 0), migrated
    assert "Created the database" in first.stdout
    assert second.stdout == ""


def test_an_unreachable_database_server_is_one_clear_line() -> None:
    nothing_listens = f"postgres://postgres@127.0.0.1:{live.free_port()}/coupons"

    result = live.run_manage(live.environment_for(nothing_listens), "create_database")

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Cannot reach the database 'coupons' on 127.0.0.1:" in result.stderr


def test_make_run_creates_the_database_before_migrating_and_serving() -> None:
    steps = subprocess.run(
        ["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    commands = [
        next((i for i, step in enumerate(steps) if word in step), -1)
        for word in (
            "manage.py create_database",
            "manage.py migrate",
            "gunicorn -c gunicorn.conf.py",
        )
    ]

    assert -1 not in commands and commands == sorted(commands), steps
