"""The operators' console in a real browser: headless Chromium (Debian's chromium and
chromium-driver) driven by Selenium, against gunicorn on PostgreSQL.

Set SAVE_SCREENSHOTS=1 to write the coupon page's screenshot to docs/admin-coupon.png.
"""

import csv
import http.client
import io
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from coupons.tests import live
from coupons.tests.live import LiveServer

OPERATOR, PASSWORD = "operator", "console-test-password"


def manage(environment: dict[str, str], *command: str) -> None:
    subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=live.PROJECT_DIR,
        env={**environment, "DJANGO_SUPERUSER_PASSWORD": PASSWORD},
        check=True,
    )


@pytest.fixture(scope="module")
def console(postgres_environment: dict[str, str]) -> Iterator[LiveServer]:
    """A server with its static files collected and an operator who may log in."""
    manage(postgres_environment, "collectstatic", "--noinput", "-v", "0")
    manage(
        postgres_environment,
        "createsuperuser",
        "--noinput",
        "--username",
        OPERATOR,
        "--email",
        "ops@example.com",
    )
    with live.gunicorn(postgres_environment, workers=2) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail(
            "The browser tests need Chromium and its driver: apt-get install chromium "
            "chromium-driver (make test installs them where it may)."
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1280,1100",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.implicitly_wait(5)
    try:
        yield driver
    finally:
        driver.quit()


def sale_under_way(database_url: str, name: str, claims: int) -> None:
    """The last minute and a half of a sale, as if shoppers had claimed it: claims spread
    over it, the stock taken accordingly (written directly, to shape the chart)."""
    with psycopg.connect(database_url) as database:
        coupon_id = database.execute(
            "SELECT id FROM coupons_coupon WHERE name = %s", [name]
        ).fetchone()[0]  # type: ignore[index]
        database.execute(
            "INSERT INTO coupons_claimhistory (coupon_id, user_id, claimed_at)"
            " SELECT %s, 'early-' || n, now() - make_interval(secs => 95 - (n * n) / 12.0)"
            " FROM generate_series(1, %s) n",
            [coupon_id, claims],
        )
        database.execute(
            "UPDATE coupons_coupon SET remaining_amount = remaining_amount - %s WHERE id = %s",
            [claims, coupon_id],
        )


def test_an_operator_watches_a_sale_revokes_a_claim_and_exports_the_ledger(
    console: LiveServer, browser: WebDriver, postgres_environment: dict[str, str]
) -> None:
    site = f"http://{console.host}:{console.port}"
    name = f"FLASH_{uuid.uuid4().hex[:6]}"
    console.create_coupon(name, 100)
    sale_under_way(postgres_environment["DATABASE_URL"], name, claims=30)
    for shopper in ["ana", "ben", "cai"]:
        claim = {"user_id": shopper, "coupon_name": name}
        assert console.request("POST", "/api/coupons/claim", claim).status == 201

    # Log in.
    browser.get(f"{site}/admin/login/")
    browser.find_element(By.NAME, "username").send_keys(OPERATOR)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    assert "Site administration" in browser.title

    # Find the coupon, and open its page: its numbers and its chart.
    browser.get(f"{site}/admin/coupons/coupon/?q={quote(name)}")
    row = browser.find_element(By.CSS_SELECTOR, "#result_list tbody tr")
    assert "on sale" in row.text and "33.0 %" in row.text
    row.find_element(By.LINK_TEXT, name).click()
    assert browser.find_element(By.ID, "sale-claimed").text == "33"
    assert browser.find_element(By.ID, "sale-remaining").text == "67"
    drawn = browser.find_elements(By.CSS_SELECTOR, "#sale-chart rect")
    assert sum(int(bar.get_attribute("data-claims") or 0) for bar in drawn) == 33
    if os.environ.get("SAVE_SCREENSHOTS"):
        browser.save_screenshot(str(live.PROJECT_DIR / "docs" / "admin-coupon.png"))

    # While the stock drains, the page follows the sale by itself.
    console.request("POST", "/api/coupons/claim", {"user_id": "dee", "coupon_name": name})
    WebDriverWait(browser, 10).until(
        lambda page: page.find_element(By.ID, "sale-claimed").text == "34"
    )

    # Open its claims, and revoke one.
    browser.find_element(By.LINK_TEXT, "See its claims").click()
    ledger = browser.find_elements(By.CSS_SELECTOR, "#result_list tbody tr")
    shown = [row.find_element(By.CSS_SELECTOR, "th, td.field-user_id").text for row in ledger]
    assert len(shown) == 34 and {"ana", "ben", "cai", "dee"} <= set(shown)
    ben = next(row for row in ledger if "ben" in row.text)
    ben.find_element(By.CSS_SELECTOR, "input.action-select").click()
    Select(browser.find_element(By.NAME, "action")).select_by_value("revoke")
    browser.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    notes = [note.text for note in browser.find_elements(By.CSS_SELECTOR, "ul.messagelist li")]
    assert notes == ["Revoked 1 claims; their units are back in stock."], notes
    assert console.details(name)["remaining_amount"] == 67

    # Export what the ledger shows, as CSV, with the operator's session.
    # (The admin's style writes object tools in capitals: found by its address, not its text.)
    export = browser.find_element(By.CSS_SELECTOR, ".object-tools a[href^='export/']")
    href = export.get_attribute("href") or ""
    session = browser.get_cookie("sessionid")
    assert session is not None
    connection = http.client.HTTPConnection(console.host, console.port, timeout=30)
    connection.request(
        "GET",
        re.sub(r"^https?://[^/]+", "", href),
        headers={"Cookie": f"sessionid={session['value']}"},
    )
    reply = connection.getresponse()
    rows = list(csv.reader(io.StringIO(reply.read().decode())))
    connection.close()
    assert reply.status == 200
    exported = {row[1] for row in rows[1:]}
    assert len(exported) == 33 and {"ana", "cai", "dee"} <= exported and "ben" not in exported
