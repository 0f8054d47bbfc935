"""API keys with scopes, rate limits, the admin's login lockout and the production settings."""

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, LogEntry
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone
from pytest_django.fixtures import Settings as SettingsWrapper
from redis.exceptions import TimeoutError as RedisTimeoutError
from rest_framework.test import APIClient

from coupons import services
from coupons.access import FixedWindowThrottle
from coupons.models import ApiKey, ClaimHistory
from coupons.tests import live

pytestmark = pytest.mark.django_db


def call(client: APIClient, method: str, path: str, body: Any = None, key: str = "") -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = json.dumps(body) if body is not None else ""
    return client.generic(method, path, data, content_type="application/json", headers=headers)


def code_of(response: Any) -> str:
    code: str = response.json()["error"]["code"]
    return code


@pytest.fixture
def keys_required(settings: SettingsWrapper) -> None:
    settings.API_AUTH_REQUIRED = True


def new_key(scope: str, name: str) -> str:
    _, key = ApiKey.objects.create_key(name=name, scope=scope)
    return str(key)


# API keys


def test_the_api_is_open_while_api_auth_is_off(api_client: APIClient) -> None:
    created = call(api_client, "POST", "/api/coupons", {"name": "OPEN", "amount": 1})
    # A header that names no key is ignored, as the contract knows no keys.
    claimed = call(
        api_client, "POST", "/api/coupons/claim", {"user_id": "u", "coupon_name": "OPEN"}, "junk"
    )
    assert (created.status_code, claimed.status_code) == (201, 201)


@pytest.mark.usefixtures("keys_required")
def test_without_a_key_every_call_is_401_with_a_bearer_challenge(api_client: APIClient) -> None:
    services.create_coupon(name="LOCKED", amount=1)
    calls = [
        ("POST", "/api/coupons", {"name": "X", "amount": 1}),
        ("POST", "/api/coupons/claim", {"user_id": "u", "coupon_name": "LOCKED"}),
        ("GET", "/api/coupons/LOCKED", None),
        ("GET", "/api/coupons", None),
        ("GET", "/api/coupons/LOCKED/claims", None),
        ("HEAD", "/api/coupons/LOCKED", None),
        ("OPTIONS", "/api/coupons", None),
        # The claim route's GET: the details of a coupon named "claim".
        ("GET", "/api/coupons/claim", None),
    ]
    for method, path, body in calls:
        response = call(api_client, method, path, body)
        assert response.status_code == 401, (method, path)
        assert response["WWW-Authenticate"] == 'Bearer realm="api"'
        if method != "HEAD":  # A HEAD answer has no body.
            assert code_of(response) == "not_authenticated"
    assert ClaimHistory.objects.count() == 0


@pytest.mark.usefixtures("keys_required")
@pytest.mark.parametrize(
    "authorization", ["Bearer nosuchprefix.secret", "Bearer", "Bearer a b", "Bearer ."]
)
def test_an_unknown_or_malformed_key_is_401(api_client: APIClient, authorization: str) -> None:
    new_key("admin", "shop")
    response = api_client.get("/api/coupons", HTTP_AUTHORIZATION=authorization)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'
    assert code_of(response) == "authentication_failed"


@pytest.mark.usefixtures("keys_required")
def test_a_key_with_a_wrong_secret_is_refused(api_client: APIClient) -> None:
    key = new_key("admin", "shop")
    prefix, _, secret = key.partition(".")
    forged = f"{prefix}.{secret[::-1]}"
    assert call(api_client, "GET", "/api/coupons", key=forged).status_code == 401
    assert call(api_client, "GET", "/api/coupons", key=key).status_code == 200


@pytest.mark.usefixtures("keys_required")
def test_an_expired_key_is_refused(api_client: APIClient) -> None:
    stored, key = ApiKey.objects.create_key(name="old", scope="admin")
    ApiKey.objects.filter(pk=stored.pk).update(expiry_date=timezone.now())
    response = call(api_client, "GET", "/api/coupons", key=key)
    assert (response.status_code, code_of(response)) == (401, "authentication_failed")


@pytest.mark.usefixtures("keys_required")
def test_a_client_key_claims_and_reads_but_does_not_administer(api_client: APIClient) -> None:
    services.create_coupon(name="SALE", amount=5)
    client = new_key("client", "shop-front")
    claim = {"user_id": "ann", "coupon_name": "SALE"}

    assert call(api_client, "POST", "/api/coupons/claim", claim, client).status_code == 201
    assert call(api_client, "GET", "/api/coupons/SALE", key=client).status_code == 200
    assert call(api_client, "GET", "/api/coupons", key=client).status_code == 200
    assert call(api_client, "GET", "/api/coupons/SALE/claims/ann", key=client).status_code == 200
    for method, path, body in [
        ("POST", "/api/coupons", {"name": "NEW", "amount": 1}),
        ("GET", "/api/coupons/SALE/claims", None),
        ("DELETE", "/api/coupons/SALE/claims/ann", None),
        # Not listed for clients, so refused: the API's metadata.
        ("OPTIONS", "/api/coupons", None),
    ]:
        response = call(api_client, method, path, body, client)
        assert response.status_code == 403, (method, path)
        assert code_of(response) == "permission_denied"
    # Nothing the refused calls asked for happened.
    assert ClaimHistory.objects.filter(user_id="ann").exists()
    assert not ApiKey.objects.filter(name="NEW").exists()


@pytest.mark.usefixtures("keys_required")
def test_an_admin_key_does_everything(api_client: APIClient) -> None:
    admin = new_key("admin", "operator")
    claim = {"user_id": "bob", "coupon_name": "ADM"}
    assert (
        call(api_client, "POST", "/api/coupons", {"name": "ADM", "amount": 2}, admin).status_code
        == 201
    )
    assert call(api_client, "POST", "/api/coupons/claim", claim, admin).status_code == 201
    assert call(api_client, "GET", "/api/coupons/ADM/claims", key=admin).status_code == 200
    assert call(api_client, "DELETE", "/api/coupons/ADM/claims/bob", key=admin).status_code == 204
    assert call(api_client, "GET", "/api/coupons/ADM", key=admin).json()["remaining_amount"] == 2


@pytest.mark.usefixtures("keys_required")
def test_the_schema_its_page_and_the_probes_need_no_key(api_client: APIClient) -> None:
    for path in ["/api/schema", "/api/docs", "/healthz"]:
        assert api_client.get(path).status_code == 200, path


def test_a_key_is_stored_hashed_and_shown_once() -> None:
    stored, key = ApiKey.objects.create_key(name="shop", scope="client")
    row = ApiKey.objects.filter(pk=stored.pk).values().get()
    assert all(key not in str(value) for value in row.values())
    assert row["prefix"] == key.partition(".")[0]
    assert row["hashed_key"].startswith("sha512$$")


@pytest.mark.usefixtures("keys_required")
def test_create_and_revoke_api_key_commands(
    api_client: APIClient, capsys: pytest.CaptureFixture[str]
) -> None:
    call_command("create_api_key", "--scope", "client", "--name", "checkout")
    key = capsys.readouterr().out.strip().splitlines()[-1]
    assert call(api_client, "GET", "/api/coupons", key=key).status_code == 200

    with pytest.raises(CommandError, match="exists already"):
        call_command("create_api_key", "--scope", "admin", "--name", "checkout")
    call_command("revoke_api_key", "checkout")
    # Refused from the very next request.
    response = call(api_client, "GET", "/api/coupons", key=key)
    assert (response.status_code, code_of(response)) == (401, "authentication_failed")
    with pytest.raises(CommandError, match="revoked already"):
        call_command("revoke_api_key", "checkout")
    with pytest.raises(CommandError, match="No API key"):
        call_command("revoke_api_key", "nobody")


def test_create_api_key_refuses_an_unknown_scope() -> None:
    with pytest.raises(CommandError, match="invalid choice"):
        call_command("create_api_key", "--scope", "root", "--name", "x")
    assert not ApiKey.objects.exists()


@pytest.mark.usefixtures("keys_required")
def test_the_admin_lists_and_revokes_keys_and_logs_who(
    admin_client: Client, admin_user: User, api_client: APIClient
) -> None:
    key = new_key("client", "till")
    listing = admin_client.get("/admin/coupons/apikey/")
    assert listing.status_code == 200 and b"till" in listing.content
    stored = ApiKey.objects.get(name="till")
    response = admin_client.post(
        "/admin/coupons/apikey/", {"action": "revoke", "_selected_action": [stored.pk]}
    )
    assert response.status_code == 302
    assert ApiKey.objects.get(name="till").revoked
    entry = LogEntry.objects.get(object_id=stored.pk)
    assert (entry.user_id, entry.action_flag) == (admin_user.pk, CHANGE)
    assert call(api_client, "GET", "/api/coupons", key=key).status_code == 401


def test_the_admin_shows_a_new_key_once(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/coupons/apikey/add/", {"name": "pos", "scope": "client"}, follow=True
    )
    shown = " ".join(str(message) for message in response.context["messages"])
    found = re.search(r"The API key for pos is: (\S+)\. ", shown)
    assert found, shown
    assert ApiKey.objects.get_from_key(found[1]).name == "pos"


def test_check_deploy_warns_while_the_api_is_open(settings: SettingsWrapper) -> None:
    from coupons.access import check_api_auth

    assert [message.id for message in check_api_auth(None)] == ["coupons.W001"]
    settings.API_AUTH_REQUIRED = True
    assert check_api_auth(None) == []


# Rate limits


@pytest.fixture
def rates(settings: SettingsWrapper) -> Iterator[dict[str, str | None]]:
    """Rate limits on, in this process's cache; each test sets the rates it needs."""
    chosen: dict[str, str | None] = {"client": None, "shopper": None}
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "DEFAULT_THROTTLE_RATES": chosen}
    cache.clear()
    yield chosen
    cache.clear()


def test_the_client_rate_limit_answers_429_with_retry_after(
    api_client: APIClient, rates: dict[str, str | None]
) -> None:
    rates["client"] = "3/hour"  # A window no test run straddles but once in a great while.
    answers = [api_client.get("/api/coupons") for _ in range(5)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429, 429]
    refused = answers[-1]
    assert code_of(refused) == "throttled"
    assert 1 <= int(refused["Retry-After"]) <= 3600


def test_the_shopper_rate_limit_counts_per_user_and_coupon(
    api_client: APIClient, rates: dict[str, str | None]
) -> None:
    rates["shopper"] = "2/hour"
    services.create_coupon(name="HOT", amount=10)
    script = {"user_id": "bot", "coupon_name": "HOT"}
    statuses = [
        call(api_client, "POST", "/api/coupons/claim", script).status_code for _ in range(4)
    ]
    assert statuses == [201, 409, 429, 429]
    # Another shopper, and the same shopper on another coupon, are not held back.
    other = {"user_id": "ann", "coupon_name": "HOT"}
    assert call(api_client, "POST", "/api/coupons/claim", other).status_code == 201
    services.create_coupon(name="COLD", amount=1)
    elsewhere = {"user_id": "bot", "coupon_name": "COLD"}
    assert call(api_client, "POST", "/api/coupons/claim", elsewhere).status_code == 201


def test_the_client_address_is_the_connections_unless_proxies_are_declared(
    api_client: APIClient, rates: dict[str, str | None], settings: SettingsWrapper
) -> None:
    rates["client"] = "1/hour"
    spoofed = {"X-Forwarded-For": "203.0.113.1"}
    # NUM_PROXIES=0: X-Forwarded-For is the client's own word, and ignored.
    assert api_client.get("/api/coupons", headers=spoofed).status_code == 200
    other = {"X-Forwarded-For": "203.0.113.2"}
    assert api_client.get("/api/coupons", headers=other).status_code == 429
    # NUM_PROXIES=1: the last address the proxy added is the client's.
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    through_proxy = {"X-Forwarded-For": "198.51.100.9, 203.0.113.3"}
    assert api_client.get("/api/coupons", headers=through_proxy).status_code == 200
    assert api_client.get("/api/coupons", headers=through_proxy).status_code == 429
    next_client = {"X-Forwarded-For": "198.51.100.9, 203.0.113.4"}
    assert api_client.get("/api/coupons", headers=next_client).status_code == 200


@pytest.mark.usefixtures("keys_required")
def test_the_client_rate_limit_counts_per_key(
    api_client: APIClient, rates: dict[str, str | None]
) -> None:
    rates["client"] = "2/hour"
    first, second = new_key("client", "one"), new_key("client", "two")
    statuses = [call(api_client, "GET", "/api/coupons", key=first).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert call(api_client, "GET", "/api/coupons", key=second).status_code == 200


def test_rate_limits_hold_across_instances_through_redis(
    postgres_environment: dict[str, str],
) -> None:
    redis_url = "redis://127.0.0.1:6379/0"
    try:
        import redis

        redis.Redis.from_url(redis_url, socket_timeout=2).ping()
    except Exception as error:  # noqa: BLE001 - any failure means no Redis to test with
        pytest.fail(f"This test needs Redis at {redis_url} ({error!r}).")
    environment = {**postgres_environment, "REDIS_URL": redis_url, "RATE_LIMIT_SHOPPER": "5/hour"}
    with live.gunicorn(environment) as first, live.gunicorn(environment) as second:
        name = f"REDIS-{uuid.uuid4().hex}"
        first.create_coupon(name, 10)
        claims = [live.claim_request("script", name) for _ in range(20)]
        answers = live.concurrently([first, second], claims)
    statuses = live.status_counts(answers)
    # Five pass in all, whichever instance and worker took them: one wins, four are told so.
    assert statuses == {201: 1, 409: 4, 429: 15}, statuses
    assert all(answer.headers.get("retry-after") for answer in answers if answer.status == 429)


def test_an_unreachable_cache_lets_claims_through_and_says_so(
    postgres_environment: dict[str, str], tmp_path: Path
) -> None:
    nothing_listens = f"redis://127.0.0.1:{live.free_port()}/0"
    environment = {
        **postgres_environment,
        "REDIS_URL": nothing_listens,
        "RATE_LIMIT_SHOPPER": "1/min",
    }
    log = tmp_path / "gunicorn.log"
    with live.gunicorn(environment, workers=1, log=log) as server:
        name = f"NOCACHE-{uuid.uuid4().hex}"
        server.create_coupon(name, 5)
        answers = [server.request(*live.claim_request(f"u{index}", name)) for index in range(3)]
        again = server.request(*live.claim_request("u0", name))
    # Answered as if no limit were set, and the operator is told why.
    assert [answer.status for answer in answers] == [201, 201, 201]
    assert (again.status, again.body["error"]["code"]) == (409, "already_claimed")
    assert log.read_text().count("Rate limits not applied: the cache failed") == 1


class UnreachableCache:
    """A cache whose every call fails as redis-py fails on a Redis that does not answer."""

    def __init__(self) -> None:
        self.calls = 0

    def add(self, *args: Any, **kwargs: Any) -> bool:
        self.calls += 1
        raise RedisTimeoutError("Timeout reading from socket")


def test_after_a_cache_failure_the_limits_rest_instead_of_waiting_on_it(
    api_client: APIClient, rates: dict[str, str | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    rates["client"] = "1/hour"
    cache = UnreachableCache()
    monkeypatch.setattr(FixedWindowThrottle, "cache", cache)
    monkeypatch.setattr(FixedWindowThrottle, "cache_failed_at", float("-inf"))
    statuses = [api_client.get("/api/coupons").status_code for _ in range(5)]
    # Let through, and the cache asked once: the later requests do not wait on it again.
    assert (statuses, cache.calls) == ([200] * 5, 1)
    monkeypatch.setattr(FixedWindowThrottle, "cache_failed_at", float("-inf"))
    api_client.get("/api/coupons")
    assert cache.calls == 2  # After the rest, it is tried again.


# The admin's login


def test_the_admin_login_locks_out_after_repeated_failures(
    client: Client, admin_user: User, settings: SettingsWrapper
) -> None:
    settings.AXES_FAILURE_LIMIT = 3
    login = "/admin/login/?next=/admin/"
    wrong = [client.post(login, {"username": "admin", "password": "wrong"}) for _ in range(3)]
    # The form again twice, then the lockout on the failure that reaches the limit.
    assert [response.status_code for response in wrong] == [200, 200, 429]
    # Locked out now: the right password is refused too, from this address.
    locked = client.post(login, {"username": "admin", "password": "password"})
    assert locked.status_code == 429
    assert not client.get("/admin/").wsgi_request.user.is_authenticated
    # Not from another: guessing from one address locks nobody out elsewhere.
    elsewhere = Client(REMOTE_ADDR="192.0.2.7")
    response = elsewhere.post(login, {"username": "admin", "password": "password"})
    assert response.status_code == 302


def test_the_admin_login_works_below_the_limit(client: Client, admin_user: User) -> None:
    login = "/admin/login/?next=/admin/"
    client.post(login, {"username": "admin", "password": "wrong"})
    response = client.post(login, {"username": "admin", "password": "password"})
    assert response.status_code == 302


# Production settings


def settings_load(**environment: str) -> subprocess.CompletedProcess[str]:
    """Load the settings in a fresh process with this environment."""
    clean = {
        key: value
        for key, value in os.environ.items()
        if key not in {"SECRET_KEY", "DEBUG", "DATABASE_URL", "API_AUTH"}
    }
    return subprocess.run(
        [sys.executable, "-c", "import django; django.setup()"],
        env={**clean, "DJANGO_SETTINGS_MODULE": "couponsite.settings", **environment},
        cwd=live.PROJECT_DIR,
        capture_output=True,
        text=True,
        check=False,
    )


def test_secret_key_is_required_on_postgresql_without_debug() -> None:
    url = "postgres://postgres@127.0.0.1:5432/coupons"
    refused = settings_load(DATABASE_URL=url)
    assert refused.returncode != 0
    assert "SECRET_KEY must be set" in refused.stderr
    assert settings_load(DATABASE_URL=url, SECRET_KEY="k" * 50).returncode == 0
    assert settings_load(DATABASE_URL=url, DEBUG="true").returncode == 0


def test_api_auth_takes_only_off_or_required() -> None:
    refused = settings_load(API_AUTH="maybe")
    assert refused.returncode != 0 and "API_AUTH must be off or required" in refused.stderr


def test_over_http_a_revoked_key_is_refused_at_once_by_every_worker(
    postgres_environment: dict[str, str], tmp_path: Path
) -> None:
    environment = {**postgres_environment, "API_AUTH": "required"}

    def manage(*arguments: str) -> str:
        done = live.run_manage(environment, *arguments)
        assert done.returncode == 0, done.stderr
        return done.stdout

    name = f"till-{uuid.uuid4().hex[:8]}"
    key = manage("create_api_key", "--scope", "client", "--name", name).splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    log = tmp_path / "gunicorn.log"
    with live.gunicorn(environment, workers=3, ready_status=401, log=log) as server:
        before = [server.request("GET", "/api/coupons", headers=auth).status for _ in range(12)]
        manage("revoke_api_key", name)
        after = [server.request("GET", "/api/coupons", headers=auth) for _ in range(30)]
    assert before == [200] * 12
    assert {(answer.status, answer.body["error"]["code"]) for answer in after} == {
        (401, "authentication_failed")
    }
    # With keys required, the start-up log has no warning about an open API.
    assert "API_AUTH is off" not in log.read_text()


def test_the_start_up_log_warns_while_the_api_is_open(
    postgres_environment: dict[str, str], tmp_path: Path
) -> None:
    log = tmp_path / "gunicorn.log"
    with live.gunicorn(postgres_environment, workers=1, log=log):
        pass
    assert "API_AUTH is off: anyone who can reach the service" in log.read_text()
