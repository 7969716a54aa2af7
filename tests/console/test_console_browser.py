"""The ops console in real headless Chromium (Debian's chromium + chromedriver) against real
uvicorn and consume_fixes processes, with every off-machine name unresolvable: a Dispatcher
logs in, reads the dashboard, watches a driver move on the live map, draws a zone, cancels a
delivery with a reason, reads the API docs, and is refused the user and token admin.

Every wait is on a DOM condition; screenshots go to artifacts/console/ (not committed)."""
import json
import time
import uuid
from datetime import timedelta
from urllib.parse import urlsplit

import httpx
import pytest
from django.utils import timezone

from audit.models import DeliveryAuditLog
from availability.models import Driver
from common.actors import Actor
from dispatch.models import Delivery
from tests.api import token_for
from tests.console.conftest import login, requested_urls, screenshot
from tests.factories import DeliveryFactory, DriverFactory, km_north
from workflows.dispatching import delivery_dispatch
from zones.models import DeliveryZone

pytestmark = pytest.mark.slow


def assert_nothing_loaded_from_elsewhere(browser, base):
    """Every script, stylesheet, font and XHR the pages asked for came from our server (map
    tiles are the one outside resource, and the browser could not reach them)."""
    ours = urlsplit(base).netloc
    outside = [
        (kind, url) for kind, url in requested_urls(browser)
        if url.startswith("http") and urlsplit(url).netloc != ours and kind != "Image"
    ]
    assert outside == []
    # and no script failed (failed loads, such as the unreachable tiles or the 403 pages a
    # Dispatcher is refused, are the network's entries, not script errors)
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]
    assert errors == []


def test_a_dispatcher_sees_a_driver_move_on_the_live_map_within_two_seconds(console_server, fixes_consumer, chromium, dispatcher):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = console_server
    driver = DriverFactory(name="Maria Lopez", location=km_north(1))
    delivery = DeliveryFactory(seller_order_id="ORD-ON-MAP", store_name="Corner Shop")
    wait = WebDriverWait(chromium, 15)
    login(chromium, base, dispatcher, wait)

    chromium.find_element(By.ID, "link-live-map").click()
    wait.until(lambda b: b.find_element(By.ID, "ops-map-page").get_attribute("data-live-state") == "live")
    marker = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]'))
    assert abs(float(marker.get_attribute("data-lat")) - driver.location.y) < 1e-6
    assert chromium.find_elements(By.CSS_SELECTOR, f'[data-delivery-id="{delivery.pk}"]')
    before = marker.rect
    # the state is read once, when the socket has joined (it was read before the socket too)
    from django.urls import reverse
    state_path = reverse("admin-live-map-state")
    assert [url for _, url in requested_urls(chromium) if urlsplit(url).path == state_path] == [f"{base}{state_path}"]

    # A status change stamped before the row the state was read from is already in the state:
    # arriving after the load (sent before it, delivered late), it is not applied.
    from common.broadcast import OPS_GROUP, send_now
    from common.errors import iso

    def pickup_status(b):
        return b.find_element(By.CSS_SELECTOR, f'[data-delivery-id="{delivery.pk}"][data-kind="pickup"]').get_attribute("data-status")

    send_now([OPS_GROUP], {"type": "delivery_status_changed", "deliveryId": str(delivery.pk), "fromStatus": "ready",
                           "sellerOrderId": delivery.seller_order_id, "status": "assigned", "driverId": str(driver.pk),
                           "changedAt": iso(delivery.updated_at - timedelta(milliseconds=5))})
    send_now([OPS_GROUP], {"type": "unassigned_order_escalated", "deliveryId": str(delivery.pk), "level": 1})  # (read after it)
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'[data-delivery-id="{delivery.pk}"][data-kind="pickup"] .unassigned'))
    assert pickup_status(chromium) == "ready"
    screenshot(chromium, "live-map-before")

    new = km_north(-1.5)
    started = time.monotonic()
    response = httpx.post(
        f"{base}/v2/drivers/{driver.pk}/location", json={"lat": new.y, "lon": new.x, "accuracyMeters": 8},
        headers={"Authorization": f"Token {token_for(driver.user)}"}, timeout=10,
    )
    assert response.status_code == 200 and response.json()["accepted"], response.text

    def moved(b):
        element = b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]')
        return abs(float(element.get_attribute("data-lat")) - new.y) < 1e-6 and element

    element = WebDriverWait(chromium, 2, poll_frequency=0.05).until(moved)
    assert time.monotonic() - started < 2.0
    assert element.rect["y"] > before["y"]  # drawn further south (down the screen), not just relabelled
    screenshot(chromium, "live-map-after")

    element.click()  # the driver's card, with a link into the admin
    # The card is in the DOM before Leaflet's popup has faded in (opacity 0: Selenium reads no
    # text from it yet), so wait for it to be shown, not merely present.
    card = wait.until(lambda b: (c := b.find_element(By.CSS_SELECTOR, f'[data-card-driver-id="{driver.pk}"]')).is_displayed()
                      and "Maria Lopez" in c.text and c)
    assert card.find_element(By.TAG_NAME, "a").get_attribute("href").endswith(f"/admin/availability/driver/{driver.pk}/change/")

    # A fix, then ops pause the driver before the second's digest goes out: the digest carries
    # the availability read with the fix ("available"), older than the pause, and it painted
    # the driver available again until the next fix.
    from availability import geo
    from availability.management.commands.consume_fixes import DIGEST_LOCK
    from common.redis import get_redis

    further = km_north(-2.5)
    geo.index_driver(driver_id=driver.pk, availability="available", lat=new.y, lon=new.x,  # its state in Redis,
                     recorded_at=driver.location_recorded_at,  # as a real transition leaves it (read with each fix)
                     changed_at=timezone.now() - timedelta(minutes=5))
    get_redis().set(DIGEST_LOCK, "the-test", px=900)  # as if another consumer had just sent one: the next waits
    assert httpx.post(
        f"{base}/v2/drivers/{driver.pk}/location", json={"lat": further.y, "lon": further.x, "accuracyMeters": 8},
        headers={"Authorization": f"Token {token_for(driver.user)}"}, timeout=10,
    ).json()["accepted"]
    paused = httpx.post(f"{base}/v2/drivers/{driver.pk}/availability", json={"state": "paused", "reason": "check"},
                        headers={"Authorization": f"Token {token_for(dispatcher)}"}, timeout=10)
    assert paused.status_code == 200, paused.text
    wait.until(lambda b: abs(float(b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]').get_attribute("data-lat"))
                             - further.y) < 1e-6)
    assert chromium.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]').get_attribute("data-availability") == "paused"

    # The driver resumes and its availability_changed never reaches the page (a channel layer
    # over capacity drops it): the next fix's digest, newer than the pause, mends the marker
    # (it stayed paused until the page reloaded its state).
    resumed_at = timezone.now()
    Driver.objects.filter(pk=driver.pk).update(availability="available", last_availability_change=resumed_at)
    geo.index_driver(driver_id=driver.pk, availability="available", lat=further.y, lon=further.x,
                     recorded_at=timezone.now(), changed_at=resumed_at)
    assert httpx.post(
        f"{base}/v2/drivers/{driver.pk}/location", json={"lat": new.y, "lon": new.x, "accuracyMeters": 8},
        headers={"Authorization": f"Token {token_for(driver.user)}"}, timeout=10,
    ).json()["accepted"]
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]').get_attribute("data-availability")
               == "available")

    # Two steps committed a few ms apart publish in either order (a socket audit: 7 of 150
    # deliveries): the older change, arriving second, painted the delivery picked up again.
    def status_event(status, at):
        return {"type": "delivery_status_changed", "deliveryId": str(delivery.pk), "sellerOrderId": delivery.seller_order_id,
                "fromStatus": "assigned", "status": status, "driverId": str(driver.pk), "changedAt": iso(at)}

    later = timezone.now()
    send_now([OPS_GROUP], status_event("in_transit", later))
    wait.until(lambda b: pickup_status(b) == "in_transit")
    send_now([OPS_GROUP], status_event("picked_up", later - timedelta(milliseconds=3)))
    send_now([OPS_GROUP], {"type": "availability_changed", "driverId": str(driver.pk), "fromState": "available",
                           "toState": "on_break", "changedAt": iso(timezone.now())})  # (after it on the socket: it was read)
    wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]').get_attribute("data-availability")
               == "on_break")
    assert pickup_status(chromium) == "in_transit"

    # A state read before those changes (here: the rows still say ready, and waiting unassigned,
    # as a state fetched just before the commits would) does not paint them back: neither the
    # step back, nor the unassigned mark, nor a delivery a final event took off the map. (An
    # event about a delivery not on the map reloads the state.)
    from escalation.models import UnassignedOrder

    UnassignedOrder.objects.create(delivery=delivery, failure_reason="no_available_drivers", first_attempt_at=timezone.now(),
                                   last_attempt_at=timezone.now(), escalation_level=2)
    delivered = DeliveryFactory(seller_order_id="ORD-DONE")  # (created after the load: reloads the state)
    send_now([OPS_GROUP], dict(status_event("assigned", timezone.now()), deliveryId=str(delivered.pk)))
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, f'[data-delivery-id="{delivered.pk}"]'))
    send_now([OPS_GROUP], dict(status_event("delivered", timezone.now()), deliveryId=str(delivered.pk)))
    wait.until(lambda b: not b.find_elements(By.CSS_SELECTOR, f'[data-delivery-id="{delivered.pk}"]'))
    loaded = chromium.find_element(By.ID, "ops-map-page").get_attribute("data-loaded-at")
    send_now([OPS_GROUP], dict(status_event("assigned", timezone.now()), deliveryId=str(uuid.uuid4())))
    wait.until(lambda b: b.find_element(By.ID, "ops-map-page").get_attribute("data-loaded-at") != loaded)
    assert pickup_status(chromium) == "in_transit"
    assert not chromium.find_elements(By.CSS_SELECTOR, f'[data-delivery-id="{delivery.pk}"][data-kind="pickup"] .unassigned')
    assert not chromium.find_elements(By.CSS_SELECTOR, f'[data-delivery-id="{delivered.pk}"]')
    assert_nothing_loaded_from_elsewhere(chromium, base)


def test_the_live_map_keeps_a_newer_position_over_an_older_state_and_counts_the_markers_it_shows(
    console_server, chromium, dispatcher,
):
    """A state read before a digest the page applied moved the marker back to the older fix
    until the driver's next one (a map audit: 124 of 201 markers after a reconnect's reload);
    and the "N drivers shown" line missed the markers an `availability_changed` hid, for as long
    as no digest came (500 said, 407 shown, for 15 s)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from common.broadcast import OPS_GROUP, send_now
    from common.errors import iso

    base, wait = console_server, WebDriverWait(chromium, 15)
    driver = DriverFactory(name="Asha Map", location=km_north(1))
    login(chromium, base, dispatcher, wait)
    chromium.get(f"{base}/admin/map/")
    wait.until(lambda b: b.find_element(By.ID, "ops-map-page").get_attribute("data-live-state") == "live")

    def marker_lat(b):
        return float(b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]').get_attribute("data-lat"))

    def shown(b):
        return b.find_element(By.ID, "ops-map-counts").text

    wait.until(lambda b: abs(marker_lat(b) - driver.location.y) < 1e-6)
    wait.until(lambda b: shown(b).startswith("1 drivers"))
    ahead = km_north(-2)  # the digest of a fix newer than the row the next state reads
    send_now([OPS_GROUP], {"type": "driver_positions", "sentAt": iso(timezone.now()), "drivers": [{
        "driverId": str(driver.pk), "lat": ahead.y, "lon": ahead.x, "heading": None, "availability": None,
        "availabilityChangedAt": None, "recordedAt": iso(timezone.now() + timedelta(seconds=30))}]})
    wait.until(lambda b: abs(marker_lat(b) - ahead.y) < 1e-6)

    loaded = chromium.find_element(By.ID, "ops-map-page").get_attribute("data-loaded-at")
    send_now([OPS_GROUP], {"type": "delivery_status_changed", "deliveryId": str(uuid.uuid4()), "sellerOrderId": "ORD-X",
                           "fromStatus": "ready", "status": "assigned", "driverId": None,
                           "changedAt": iso(timezone.now())})  # (not on the map: the page reads the state again)
    wait.until(lambda b: b.find_element(By.ID, "ops-map-page").get_attribute("data-loaded-at") != loaded)
    assert abs(marker_lat(chromium) - ahead.y) < 1e-6  # the state's older fix is not taken

    send_now([OPS_GROUP], {"type": "availability_changed", "driverId": str(driver.pk), "fromState": "available",
                           "toState": "offline", "changedAt": iso(timezone.now())})
    wait.until(lambda b: shown(b).startswith("0 drivers"))  # (offline ones are not shown by default)
    assert not chromium.find_elements(By.CSS_SELECTOR, f'.leaflet-marker-pane [data-driver-id="{driver.pk}"]')
    assert_nothing_loaded_from_elsewhere(chromium, base)


def test_the_live_map_shows_the_state_when_its_socket_does_not_open(console_server, chromium, dispatcher):
    """The page reads the state once its socket has joined; a socket that never opens (a proxy
    without WebSocket upgrade) still gets the map drawn, read once after 2 s, and says offline."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, wait = console_server, WebDriverWait(chromium, 15)
    driver = DriverFactory(name="Asha Stuck", location=km_north(1))
    login(chromium, base, dispatcher, wait)
    chromium.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        window.WebSocket = class { constructor() { this.readyState = 0; } close() {} };
        window.WebSocket.OPEN = 1;"""})  # (connecting for ever)
    chromium.get(f"{base}/admin/map/")
    marker = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, f'[data-driver-id="{driver.pk}"]'))
    assert abs(float(marker.get_attribute("data-lat")) - driver.location.y) < 1e-6
    assert chromium.find_element(By.ID, "ops-map-page").get_attribute("data-live-state") == "connecting"


def test_a_dispatcher_runs_the_console_in_chromium(console_server, chromium, dispatcher):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    base = console_server
    unassigned = DeliveryFactory(seller_order_id="ORD-NOBODY")
    delivery_dispatch(delivery_id=unassigned.pk, actor=Actor.system())  # no driver anywhere: unassigned
    doomed = DeliveryFactory(seller_order_id="ORD-DOOMED", store_name="Doomed Deli")
    wait = WebDriverWait(chromium, 15)

    # the dashboard; the refresh once the socket is up leaves tiles that did not change alone
    # (the last hour's links carried the second they were rendered: every tile was replaced,
    # and this test's own hold on one went stale, 1 run in 4)
    login(chromium, base, dispatcher, wait)
    chromium.execute_script("document.getElementById('kpi-acceptance').heldByTheTest = true")
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-live-refreshed"))
    assert chromium.execute_script("return document.getElementById('kpi-acceptance').heldByTheTest") is True
    tile = chromium.find_element(By.ID, "kpi-unassigned")
    assert tile.get_attribute("data-value") == "1" and "Level 0: 1" in tile.text
    for kpi in ("kpi-late", "kpi-drivers", "kpi-zones", "kpi-offers", "kpi-acceptance", "kpi-time-to-assign", "kpi-tickets"):
        assert chromium.find_element(By.ID, kpi).is_displayed(), kpi
    assert "Asia/Kolkata" in chromium.find_element(By.CLASS_NAME, "kpi-meta").text
    assert "Users" not in chromium.find_element(By.ID, "content-main").text
    screenshot(chromium, "dashboard")
    # a second submission of a form while the first is on its way is ignored (a double click on
    # "Offer to this driver" showed "already has a pending offer" after the offer was made)
    assert chromium.execute_script("""
        var form = document.getElementById("logout-form"), seen = [];
        window.addEventListener("submit", function (e) { seen.push(e.defaultPrevented); e.preventDefault(); });
        form.requestSubmit(); form.requestSubmit();
        return seen;""") == [False, True]

    # a Dispatcher cannot open the user or the token admin
    for path in ("/admin/common/user/", "/admin/common/apitoken/", "/admin/django_celery_beat/periodictask/"):
        chromium.get(base + path)
        wait.until(lambda b: "403" in b.title or "Forbidden" in b.find_element(By.TAG_NAME, "body").text)

    # draw a zone on the map (Leaflet.draw from our static files, no tiles) and save it
    chromium.get(f"{base}/admin/zones/deliveryzone/add/")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, ".leaflet-draw-draw-polygon"))).click()
    map_element = chromium.find_element(By.CSS_SELECTOR, ".leaflet-container")
    corners = [(-120, -80), (120, -80), (120, 80), (-120, 80)]
    for x, y in corners:
        ActionChains(chromium).move_to_element_with_offset(map_element, x, y).click().perform()
    ActionChains(chromium).move_to_element_with_offset(map_element, *corners[0]).click().perform()  # close the ring
    wait.until(lambda b: '"Polygon"' in (b.find_element(By.ID, "id_geometry").get_attribute("value") or ""))
    chromium.find_element(By.ID, "id_name").send_keys("Drawn in Chromium")
    chromium.find_element(By.ID, "id_min_drivers_online").clear()
    chromium.find_element(By.ID, "id_min_drivers_online").send_keys("4")
    screenshot(chromium, "zone-drawn")
    chromium.find_element(By.CSS_SELECTOR, "input[name=_save]").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".messagelist"), "Drawn in Chromium"))
    zone = DeliveryZone.objects.get(name="Drawn in Chromium")
    assert len(zone.geometry.exterior_ring) == 5 and zone.geometry.area > 0 and zone.min_drivers_online == 4
    assert zone.geometry.contains(zone.geometry.centroid)

    # cancel: a confirmation page, a reason required, an audit row with it
    chromium.get(f"{base}/admin/dispatch/delivery/?q=ORD-DOOMED")
    wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, f'input.action-select[value="{doomed.pk}"]'))).click()
    Select(chromium.find_element(By.NAME, "action")).select_by_value("cancel_deliveries")
    chromium.find_element(By.CSS_SELECTOR, "button[name=index]").click()
    wait.until(EC.presence_of_element_located((By.ID, "confirm-action")))
    assert "ORD-DOOMED" in chromium.find_element(By.ID, "confirm-objects").text
    assert Delivery.objects.get(pk=doomed.pk).status == "ready"  # asked, not done
    chromium.find_element(By.ID, "confirm-submit").click()  # no reason
    wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#confirm-form .errorlist")))
    assert Delivery.objects.get(pk=doomed.pk).status == "ready"
    chromium.find_element(By.ID, "id_reason").send_keys("Store closed early (called 18:05)")
    screenshot(chromium, "cancel-confirm")
    chromium.find_element(By.ID, "confirm-submit").click()
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, ".messagelist"), "Cancelled 1 delivery."))
    doomed.refresh_from_db()
    assert doomed.status == "cancelled" and doomed.cancellation_reason == "Store closed early (called 18:05)"
    audit = DeliveryAuditLog.objects.get(delivery=doomed, event_type="delivery_cancelled")
    assert audit.actor_id == dispatcher.pk and audit.actor_type == "admin"

    # the delivery page: a readable timeline and its map
    chromium.get(f"{base}/admin/dispatch/delivery/{doomed.pk}/change/")
    timeline = wait.until(EC.presence_of_element_located((By.ID, "delivery-timeline")))
    assert "Dina Patcher" in timeline.text and "Store closed early" in timeline.text and "IST" in timeline.text
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#delivery-map [data-kind=pickup]"))
    screenshot(chromium, "delivery-page")
    chromium.execute_script("arguments[0].scrollIntoView()", timeline)
    screenshot(chromium, "delivery-timeline")

    # the analytics page: three charts (Chart.js from our static files) with titled axes
    chromium.find_element(By.ID, "nav-analytics").click()
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-charts-ready") == "true")
    titles = chromium.execute_script(
        "return window.opsCharts.map(c => [c.options.scales.x.title.text, c.options.scales.y.title.text]);"
    )
    assert titles == [["day (Asia/Kolkata)", "seconds, ready → assigned"], ["day (Asia/Kolkata)", "% of offers answered"],
                      ["zone", "INR"]]
    screenshot(chromium, "analytics")

    # the API docs render their operations from our static files
    chromium.get(f"{base}/v2/docs/")
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".opblock")) > 20)
    assert chromium.find_elements(By.CSS_SELECTOR, '.opblock[id*="deliveries"]')
    screenshot(chromium, "api-docs")

    assert_nothing_loaded_from_elsewhere(chromium, base)


def test_the_api_docs_pages_render_and_ask_nothing_of_another_host(console_server, chromium):
    """Redoc's bundle drew its footer logo from cdn.redoc.ly (console audit): the docs pages'
    Content-Security-Policy now stops it in the browser, and both pages still render."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, wait = console_server, WebDriverWait(chromium, 20)
    chromium.get(f"{base}/v2/redoc/")
    wait.until(lambda b: "API docs by Redocly" in b.find_element(By.TAG_NAME, "body").text)
    wait.until(lambda b: b.find_elements(By.XPATH, "//*[contains(text(), 'deliveries')]"))
    chromium.get(f"{base}/v2/docs/")
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock"))

    ours = urlsplit(base).netloc
    sent, blocked = {}, set()
    for entry in chromium.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message["params"]
        if message["method"] == "Network.requestWillBeSent":
            sent[params["requestId"]] = params["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and params.get("blockedReason") == "csp":
            blocked.add(params["requestId"])
    outside = {url for request_id, url in sent.items()
               if url.startswith("http") and urlsplit(url).netloc != ours and request_id not in blocked}
    assert outside == set()
    errors = [e for e in chromium.get_log("browser") if e["level"] == "SEVERE"
              and e.get("source") != "network" and "Content Security Policy" not in e["message"]]
    assert errors == []


def test_the_dashboard_and_the_unassigned_list_follow_the_ops_socket(console_server, chromium, dispatcher):
    """They showed what was true when they were loaded until someone reloaded them (console
    audit: a new unassigned order, and both still said 10 fifteen seconds later)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from selenium.common.exceptions import StaleElementReferenceException

    base = console_server
    wait = WebDriverWait(chromium, 15, ignored_exceptions=(StaleElementReferenceException,))  # (the KPIs are swapped)
    login(chromium, base, dispatcher, wait)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-live-refreshed"))  # (once on open)
    assert chromium.find_element(By.ID, "kpi-unassigned").get_attribute("data-value") == "0"

    create = {"sellerOrderId": "ORD-LIVE-1", "storeName": "Live Store", "pickupLocation": {"lat": 12.97, "lon": 77.59},
              "dropoffLocation": {"lat": 12.98, "lon": 77.60}}
    ops = {"Authorization": f"Token {token_for(dispatcher)}"}
    assert httpx.post(f"{base}/v2/deliveries", json=create, headers=ops, timeout=10).status_code == 201  # nobody free
    WebDriverWait(chromium, 20, ignored_exceptions=(StaleElementReferenceException,)).until(  # (a swap at most every 10 s)
        lambda b: b.find_element(By.ID, "kpi-unassigned").get_attribute("data-value") == "1")

    chromium.get(f"{base}/admin/escalation/unassignedorder/")
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") == "live")
    assert not chromium.find_elements(By.ID, "live-changes")
    chromium.find_element(By.CSS_SELECTOR, "input.action-select").click()  # a row ticked: the list must not reload under it
    assert httpx.post(f"{base}/v2/deliveries", json={**create, "sellerOrderId": "ORD-LIVE-2"}, headers=ops,
                      timeout=10).status_code == 201
    bar = wait.until(lambda b: b.find_elements(By.ID, "live-changes") and b.find_element(By.ID, "live-changes"))
    assert "1 change since this page was loaded" in bar.text
    assert chromium.find_element(By.CSS_SELECTOR, "input.action-select").is_selected()
    bar.find_element(By.LINK_TEXT, "Reload").click()
    wait.until(lambda b: "ORD-LIVE-2" in b.find_element(By.ID, "result_list").text)
    wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-live-state") == "live")
    assert not chromium.find_elements(By.ID, "live-changes")
    assert_nothing_loaded_from_elsewhere(chromium, base)

    # signed out (here: the login switched off, which closes its sockets with 4401): the list
    # says its live updates stopped, rather than sitting there looking live
    dispatcher.is_active = False
    dispatcher.save(update_fields=["is_active"])
    bar = wait.until(lambda b: b.find_elements(By.ID, "live-changes") and b.find_element(By.ID, "live-changes"))
    assert "Live updates stopped: signed out." in bar.text
