"""Real servers for the ops console's browser tests: uvicorn (config.asgi: pages, API, the
/ws/ops/ socket, the location fast lane) and `manage.py consume_fixes` (the per-second
`driver_positions` digest), both on the test database and Redis; and headless Chromium that
resolves no name but the loopback server, logging every request it makes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

from common.groups import groups_sync
from common.roles import DISPATCHER_GROUP, VIEWER_GROUP
from tests.browser import chrome_options
from tests.factories import UserFactory
from tests.processes import free_port, stop, subprocess_database_url, uvicorn

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Screenshots for a reviewer (not committed: /artifacts/ is in .gitignore).
ARTIFACTS = Path(settings.BASE_DIR) / "artifacts" / "console"
PASSWORD = "pw-dispatch-123"


def _env(port: int) -> dict:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": subprocess_database_url(),
        "TEST_REDIS_URL": settings.REDIS_URL,
        "TRACKING_BASE_URL": f"http://127.0.0.1:{port}/track",
        "PYTHONUNBUFFERED": "1",
        # The default public tile server stays configured: the browser cannot reach it (no name
        # resolves), so every map here is drawn with no tiles, as on a closed ops network.
    }


@pytest.fixture
def console_server(transactional_db, tmp_path):
    """uvicorn on a free loopback port. Depends on `transactional_db` so that it stops before
    the tables are flushed."""
    port = free_port()
    with uvicorn(port, _env(port), tmp_path / "uvicorn.log") as base:
        yield base


@pytest.fixture
def fixes_consumer(console_server, tmp_path):
    """`manage.py consume_fixes` publishing the ops position digest once a second."""
    log_path = tmp_path / "consume_fixes.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "consume_fixes", "--consumer", "browser-test"],
        cwd=settings.BASE_DIR, env=_env(0), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        yield log_path
        assert proc.poll() is None, f"consume_fixes died:\n{log_path.read_text()}"
    finally:
        stop(proc, log)


@pytest.fixture
def chromium():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        pytest.skip(f"the browser checks need {', '.join(missing)} (scripts/setup.sh installs chromium and chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch anything
    options = chrome_options(CHROMIUM)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    browser.requests_seen = []  # every URL requested so far (see requested_urls)
    yield browser
    browser.quit()


def requested_urls(browser) -> list[tuple[str, str]]:
    """(resource type, URL) of every request the browser sent since the last call, and before."""
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            browser.requests_seen.append((params.get("type", ""), params["request"]["url"]))
    return browser.requests_seen


@pytest.fixture
def dispatcher(transactional_db):
    """A Dispatcher: staff, not a superuser, in the group `seed_demo` puts `ops` in."""
    groups = groups_sync()
    user = UserFactory(username="dina", first_name="Dina", last_name="Patcher", is_staff=True, password=PASSWORD)
    user.groups.add(groups[DISPATCHER_GROUP])
    return user


@pytest.fixture
def viewer(transactional_db):
    groups = groups_sync()
    user = UserFactory(username="vic", is_staff=True, password=PASSWORD)
    user.groups.add(groups[VIEWER_GROUP])
    return user


def screenshot(browser, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    browser.save_screenshot(str(path))
    return path


def login(browser, base: str, user, wait):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    browser.get(f"{base}/admin/login/?next=/admin/")
    wait.until(EC.presence_of_element_located((By.ID, "id_username"))).send_keys(user.username)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(EC.presence_of_element_located((By.ID, "ops-kpis")))
