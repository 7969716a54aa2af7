"""Headless Chromium checks of the support views (Debian's `chromium` and `chromium-driver`,
driven by Selenium; Selenium Manager is never asked to download anything): the queue and a
ticket page on the WSGI live server, and the queue refreshing live over `/ws/support/` on an
ASGI (Daphne) live server."""
from datetime import timedelta
from pathlib import Path

import pytest
import time_machine
from channels.testing import ChannelsLiveServerTestCase
from django.utils import timezone

from common.actors import Actor
from workflows.dispatching import delivery_dispatch
from escalation.models import SupportTicket
from workflows.escalations import escalation_check
from tests.browser import chrome_options, csp_violations
from tests.factories import DeliveryFactory, SupportUserFactory, online_driver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)",
    ),
]


def make_browser():
    """Headless Debian Chromium through its own chromedriver, both by explicit path."""
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # belt and braces: Selenium Manager must not fetch anything
    options = chrome_options(CHROMIUM)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    return driver


@pytest.fixture
def browser():
    driver = make_browser()
    yield driver
    driver.quit()


def ticket_for(minutes_waiting: int, seller_order_id: str) -> SupportTicket:
    with time_machine.travel(timezone.now() - timedelta(minutes=minutes_waiting), tick=False):
        delivery = DeliveryFactory(seller_order_id=seller_order_id, store_name=f"Store {seller_order_id}")
        delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system())
    escalation_check()
    return SupportTicket.objects.get(delivery=delivery)


def test_a_support_agent_works_the_queue_and_a_ticket_in_chromium(browser, live_server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    agent = SupportUserFactory(username="nightshift", first_name="Nia", last_name="Shift")
    agent.set_password("pw-123456")
    agent.save()
    online_driver(km=7)
    ticket_for(7, "ORD-HIGH")
    urgent = ticket_for(40, "ORD-URGENT")
    wait = WebDriverWait(browser, 15)

    browser.get(f"{live_server.url}/support/")  # not logged in: the support login page
    wait.until(EC.presence_of_element_located((By.ID, "id_username"))).send_keys("nightshift")
    browser.find_element(By.ID, "id_password").send_keys("pw-123456")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()

    rows = wait.until(EC.presence_of_all_elements_located((By.CSS_SELECTOR, "#queue-table tbody tr[data-ticket-id]")))
    assert [r.get_attribute("data-ticket-id") for r in rows][0] == str(urgent.pk)
    assert "ORD-URGENT" in rows[0].text and "Urgent" in rows[0].text and "L3" in rows[0].text
    assert "ORD-HIGH" in rows[1].text and "High" in rows[1].text
    # the live hookup ran in the browser (this WSGI test server has no socket, so it retries)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") in ("offline", "live"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-live-socket") == "/ws/support/"
    browser.save_screenshot(str(tmp_path / "queue.png"))

    rows[0].find_element(By.CSS_SELECTOR, "a").click()
    wait.until(EC.presence_of_element_located((By.ID, "pickup-map")))
    assert browser.find_elements(By.CSS_SELECTOR, "#pickup-map circle.pickup")
    assert browser.find_elements(By.CSS_SELECTOR, "#pickup-map circle.driver")
    timeline = browser.find_element(By.ID, "ticket-timeline").text
    assert "escalation_triggered" in timeline and "escalation_critical" in timeline
    assert "ORD-URGENT" in browser.find_element(By.TAG_NAME, "h2").text

    browser.find_element(By.ID, "action-take").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".messages"), "You have taken this ticket."))
    assert browser.find_element(By.ID, "ticket-status").text == "In Progress"
    browser.save_screenshot(str(tmp_path / "ticket.png"))
    urgent.refresh_from_db()
    assert urgent.assignee_id == agent.pk and urgent.status == "in_progress"
    assert csp_violations(browser) == []  # the pages' CSP lets their scripts, styles and socket work

    # A second submission of a form while the first is on its way is ignored (a double click
    # stored a comment twice, or showed "already cancelled" after a cancel that worked). A
    # listener on the window, after the page's own, records what it saw and keeps the page here.
    seen = browser.execute_script("""
        var form = document.querySelector("form.comment-form"), seen = [];
        form.querySelector("textarea").value = "Called the store: ten more minutes.";
        window.addEventListener("submit", function (e) { seen.push(e.defaultPrevented); e.preventDefault(); });
        form.requestSubmit(); form.requestSubmit();
        return seen;""")
    assert seen == [False, True]


def _login(browser, base_url, wait):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC

    browser.get(f"{base_url}/support/login/?next=/support/")
    wait.until(EC.presence_of_element_located((By.ID, "id_username"))).send_keys("nightshift")
    browser.find_element(By.ID, "id_password").send_keys("pw-123456")
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()


@pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="Debian's chromium and chromium-driver are not installed (scripts/setup.sh installs them)",
)
class TestSupportQueueRefreshesLive(ChannelsLiveServerTestCase):
    """The full loop: an escalation commits in this process, the event goes through Redis to the
    Daphne server's `/ws/support/` socket, the page's script re-fetches its table."""

    @classmethod
    def setUpClass(cls):
        # Channels' server process opens DATABASES["default"]["TEST"]["NAME"] (or "test_" + NAME,
        # which is wrong once NAME already is the test database): point it at the one in use.
        from django.conf import settings
        from django.db import connection

        test = settings.DATABASES["default"].setdefault("TEST", {})
        cls._saved_test_name = test.get("NAME")
        test["NAME"] = connection.settings_dict["NAME"]
        # (the server process is forked from this one: it serves ticket pages polling each second)
        cls._saved_refresh = settings.SUPPORT_TICKET_REFRESH_SECONDS
        settings.SUPPORT_TICKET_REFRESH_SECONDS = 1
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        from django.conf import settings

        super().tearDownClass()
        settings.DATABASES["default"]["TEST"]["NAME"] = cls._saved_test_name
        settings.SUPPORT_TICKET_REFRESH_SECONDS = cls._saved_refresh

    def test_an_open_ticket_shows_its_deliverys_new_offer_without_a_reload(self):
        """The support socket carries no offer events: the page re-reads its sections while live
        (SUPPORT_TICKET_REFRESH_SECONDS, 1 s here); an offer and its reject never showed until a
        reload (an audit)."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        agent = SupportUserFactory(username="nightshift")
        agent.set_password("pw-123456")
        agent.save()
        ticket = ticket_for(6, "ORD-POLL")
        browser = make_browser()
        try:
            wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
            _login(browser, self.live_server_url, wait)
            wait.until(lambda d: d.find_elements(By.ID, "queue-table"))
            browser.get(f"{self.live_server_url}/support/tickets/{ticket.pk}/")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") == "live")
            assert "pending with" not in browser.find_element(By.ID, "delivery-facts").text
            browser.execute_script("window.__sameDocument = true;")

            online_driver(km=0.5, name="Priya Live")
            assert delivery_dispatch(delivery_id=ticket.delivery_id, actor=Actor.system()).outcome == "offered"

            wait.until(lambda d: "pending with Priya Live" in d.find_element(By.ID, "delivery-facts").text)
            assert browser.execute_script("return window.__sameDocument === true;")  # not a reload
        finally:
            browser.quit()

    def test_a_new_ticket_appears_in_an_open_queue_without_a_reload(self):
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        agent = SupportUserFactory(username="nightshift")
        agent.set_password("pw-123456")
        agent.save()
        browser = make_browser()
        try:
            # The table is re-rendered once per event (escalated, ticket created): an element
            # read a moment ago may already be replaced.
            wait = WebDriverWait(browser, 20, ignored_exceptions=(StaleElementReferenceException,))
            _login(browser, self.live_server_url, wait)

            def live_attr(name):
                # Read the body afresh each time: an element found while the login form was
                # still submitting belongs to the login page and goes stale on navigation
                # (and a wait that ignores stale elements would then time out).
                return lambda d: d.find_element(By.TAG_NAME, "body").get_attribute(name)

            wait.until(lambda d: d.find_elements(By.ID, "queue-table"))
            wait.until(lambda d: live_attr("data-live-state")(d) == "live")
            refreshed_on_open = live_attr("data-live-refreshed")(browser)
            assert refreshed_on_open  # the page re-fetched its regions when the socket opened
            assert "Quiet night so far" in browser.find_element(By.ID, "queue-table").text
            browser.execute_script("window.__sameDocument = true;")

            ticket = ticket_for(6, "ORD-LIVE")  # committed: the events go out

            wait.until(lambda d: "ORD-LIVE" in d.find_element(By.ID, "queue-table").text)
            row_text = wait.until(
                lambda d: d.find_element(By.CSS_SELECTOR, f'tr[data-ticket-id="{ticket.pk}"]').text or None
            )
            assert "High" in row_text and "L1" in row_text
            assert browser.execute_script("return window.__sameDocument === true;")  # not a reload
            assert live_attr("data-live-refreshed")(browser) != refreshed_on_open
        finally:
            browser.quit()
