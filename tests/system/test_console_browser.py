"""The operator console in real headless Chromium (Selenium with Debian's chromium-driver; issue 16):
an operator logs in, finds a dead letter, retries it and sees it delivered to a real SEKMET
server; finds a consent denial and its reason; rotates a partner's token (the old one is then
refused by the served bridge, the new one accepted). Over real HTTP beside it: a POST without the
CSRF token, a partner's bearer token and no login are all refused.

With FHIR_KAP_CONSOLE_SCREENSHOTS=1 the test also saves the main pages as PNG files into
docs/operations/console/ (the pictures in docs/operations/console.md).

Under CI (CI=true) a missing chromium, chromium-driver or selenium fails the test, never skips it.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fhir_kap.storage.operators import Operators
from fhir_kap.storage.webhooks import WebhookJobs
from testkit.console import PASSWORD, SECRET_TEXT, dead_letter, decision

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "operations" / "console"


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not installed under CI: .ci/run must install it")
    pytest.skip(f"{what} not installed (apt-get install -y chromium chromium-driver; pip install selenium)")


@pytest.fixture(scope="module")
def webdriver_cls() -> Any:
    try:
        from selenium import webdriver
    except ImportError:
        _missing("selenium (the test extra)")
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        _missing("chromium")
    if not shutil.which("chromedriver"):
        _missing("chromium-driver (Debian's chromedriver)")
    return webdriver


@pytest.fixture
def browser(webdriver_cls, tmp_path) -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser") or ""
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
    ):
        opts.add_argument(flag)
    opts.add_argument("--window-size=1400,900")
    opts.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver_cls.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_page_load_timeout(60)
    driver.implicitly_wait(5)  # a click returns before the next page is in
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def served(tmp_path) -> Iterator[Any]:
    """The bridge app served over real HTTP on 127.0.0.1 (werkzeug, threaded), with operator alice."""
    from werkzeug.serving import make_server

    from fhir_kap.bridge.app import services
    from testkit.bridge import make_bridge

    bridge = make_bridge(
        tmp_path,
        partners={
            "ehr": (
                "clinic-ehr-hooks",
                "system/Communication.read system/Task.rs",
                {
                    "endpoint_url": "https://ehr.example.org/fhir",
                    "endpoint_auth": "bearer:EHR_TOKEN",
                    "webhook_url": "https://ehr.example.org/kap-hook",
                },
            )
        },
    )
    bridge.app.config["FHIR_KAP_CONSOLE_SECURE_COOKIE"] = False  # plain http to 127.0.0.1 only
    with bridge.app.app_context():
        bridge.services = services()
    Operators(bridge.services.db).add("alice", PASSWORD)
    server = make_server("127.0.0.1", 0, bridge.app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    bridge.url = f"http://127.0.0.1:{server.server_port}"
    try:
        yield bridge
    finally:
        server.shutdown()
        thread.join(10)


def _at(driver: Any, url: str) -> bool:
    """Wait (up to 10 s) until the browser shows `url`; True when it does."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, 10).until(lambda d: d.current_url == url)
    except TimeoutException:
        return False
    return True


def _shot(driver: Any, name: str) -> None:
    if os.environ.get("FHIR_KAP_CONSOLE_SCREENSHOTS") != "1":
        return
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(900, min(int(height) + 140, 2400)))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1400, 900)


def test_console__operator_retries_a_dead_letter_to_delivery_finds_a_denial_rotates_a_token(
    served, browser, sekmet
):
    from selenium.webdriver.common.by import By

    from fhir_kap.client import FhirClient
    from fhir_kap.exchange.delivery import DeliveryWorker

    outbox, audit = served.services.outbox, served.services.audit
    item = dead_letter(outbox, "N-browser-dead", base_url=sekmet.base_url)
    for i in range(3):
        dead_letter(outbox, f"N-browser-other-{i}", endpoint="practice-b", base_url=sekmet.base_url)
    held = outbox.enqueue(
        dict(__import__("testkit.console").console.note("N-browser-held")),
        endpoint="practice-a",
        base_url=sekmet.base_url,
        recipient_ref="Practitioner/ref-therapist",
    )[0]
    outbox.hold(held.id, "consent: outside-period")
    decision(audit, permit=True, reason="permitted", patient="Patient/client-1", resource_id="n-permitted")
    decision(audit, permit=False, reason="outside-period", patient="Patient/client-7", resource_id="n-denied")
    jobs = WebhookJobs(served.services.db)
    now = time.time()
    for n, state in enumerate(("dead", "delivered", "pending")):
        jobs.enqueue("clinic-ehr-hooks", "create", f"Communication/n-{n}", "1", now=now)
        if state != "pending":
            job = jobs.claim("w-seed", 1, now, 30)[0]
            jobs.finish(job, "w-seed", state, 503 if state == "dead" else 200, None, next_at=now, now=now)
    url = served.url

    # no session: the console sends the browser to its login page
    browser.get(f"{url}/console/outbox?state=dead")
    assert _at(browser, f"{url}/console/login")
    _shot(browser, "login")
    browser.find_element(By.ID, "name").send_keys("alice")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    assert _at(browser, f"{url}/console/")
    assert browser.find_element(By.ID, "count-dead").text.startswith("4")
    _shot(browser, "overview")

    # the dead letter: found, retried, delivered to SEKMET by a real worker
    browser.find_element(By.ID, "nav-dead").click()
    row = browser.find_element(By.ID, f"item-{item.id}")
    assert "dead" in row.text and "401 Unauthorized" in row.text
    _shot(browser, "dead-letters")
    browser.find_element(By.ID, f"pick-{item.id}").click()
    browser.find_element(By.ID, "do-retry").click()
    assert "1 item(s) retried" in browser.find_element(By.ID, "msg").text
    browser.implicitly_wait(0)
    assert not browser.find_elements(By.ID, f"item-{item.id}")  # no longer dead
    browser.implicitly_wait(5)
    worker = DeliveryWorker(
        outbox,
        lambda endpoint: FhirClient(sekmet.base_url),
        lambda it: (True, "permitted"),
        worker_id="w-browser",
    )
    worker.run_once()
    browser.get(f"{url}/console/outbox/{item.id}")
    assert browser.find_element(By.ID, "f-state").text == "delivered"
    assert browser.find_element(By.ID, "f-server_id").text not in ("", "-")
    _shot(browser, "item")
    found = requests.get(
        f"{sekmet.base_url}/Communication",
        params={"identifier": "http://fhir-kap.example/sid/note|N-browser-dead"},
        timeout=10,
    ).json()
    assert len(found.get("entry") or []) == 1

    browser.find_element(By.ID, "nav-held").click()
    assert "consent: outside-period" in browser.find_element(By.ID, f"item-{held.id}").text
    _shot(browser, "held")

    # a denial and its reason
    browser.find_element(By.ID, "nav-denials").click()
    rows = browser.find_elements(By.CSS_SELECTOR, "tr.outcome-deny")
    assert len(rows) == 1
    assert "outside-period" in rows[0].text and "Patient/client-7" in rows[0].text
    _shot(browser, "denials")

    # token rotation: shown once; the served bridge refuses the old token and takes the new one
    old = served.tokens["a"]
    browser.find_element(By.ID, "nav-partners").click()
    _shot(browser, "partners")
    assert "1 pending, 1 dead, 1 delivered" in browser.find_element(By.ID, "partner-clinic-ehr-hooks").text
    browser.find_element(By.ID, "rotate-practice-a").click()
    new = browser.find_element(By.ID, "new-token").text
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", new) and new != old
    _shot(browser, "token")
    assert (
        requests.get(
            f"{url}/fhir/Communication", headers={"Authorization": f"Bearer {old}"}, timeout=10
        ).status_code
        == 401
    )
    assert (
        requests.get(
            f"{url}/fhir/Communication", headers={"Authorization": f"Bearer {new}"}, timeout=10
        ).status_code
        == 200
    )
    browser.get(f"{url}/console/webhooks")
    _shot(browser, "notifications")
    browser.get(f"{url}/console/log")
    log_text = browser.find_element(By.TAG_NAME, "table").text
    for action in ("login", "outbox-retry", "partner-rotate"):
        assert action in log_text
    _shot(browser, "operator-log")
    for page in ("/console/", "/console/outbox", f"/console/outbox/{held.id}", "/console/audit"):
        browser.get(url + page)
        assert SECRET_TEXT not in browser.page_source

    # refusals over real HTTP: the browser's session without the CSRF token, a partner token, no login
    cookies = {c["name"]: c["value"] for c in browser.get_cookies()}
    assert "kap-console" in cookies
    other = dead_letter(outbox, "N-browser-csrf", base_url=sekmet.base_url)
    resp = requests.post(
        f"{url}/console/outbox/action",
        data={"id": other.id, "action": "retry"},
        cookies=cookies,
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 403
    resp = requests.get(
        f"{url}/console/outbox?state=dead",
        headers={"Authorization": f"Bearer {served.tokens['clinic']}"},
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/login")
    resp = requests.post(
        f"{url}/console/outbox/action",
        data={"id": other.id, "action": "retry"},
        headers={"Authorization": f"Bearer {served.tokens['clinic']}"},
        allow_redirects=False,
        timeout=10,
    )
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/login")
    assert requests.get(f"{url}/console/", allow_redirects=False, timeout=10).status_code == 303
    assert outbox.get(other.id).state == "dead"

    # and in the browser, after logging out, the console is closed again
    browser.get(f"{url}/console/")
    browser.find_element(By.ID, "logout").click()
    assert _at(browser, f"{url}/console/login")
    browser.get(f"{url}/console/outbox")
    assert _at(browser, f"{url}/console/login")
