"""The customer's tracking page `/track/<deliveryId>?token=`: server-rendered, and live in a real
browser (headless Chromium) against a real ASGI server (uvicorn) started for the test."""
import json
import os
import re
import uuid
from pathlib import Path

import httpx
import pytest
from django.conf import settings

from common.actors import Actor
from workflows.deliveries import assignment_create
from tests.browser import chrome_options, csp_violations
from tests.factories import DeliveryFactory, DriverFactory, km_north
from tests.processes import free_port, subprocess_database_url, uvicorn
from tests.tracking_fixtures import delivery_in
from tests.api import token_for

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


# ------------------------------------------------------------------------------ server-rendered


@pytest.mark.django_db
def test_the_page_renders_status_driver_and_eta_without_javascript(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        delivery = delivery_in("assigned")

    response = client.get(f"/track/{delivery.pk}?token={delivery.tracking_token}")

    assert response.status_code == 200
    html = response.content.decode()
    assert "A driver is on the way to the store" in html
    assert 'data-status="assigned">Driver assigned</span>' in html  # (the API's code stays out of the words)
    assert "John S." in html and "***-***-5309" in html
    assert "867-5309" not in html and "(555)" not in html  # never the whole number (timestamps hold any digits)
    assert " UTC</time>" in html  # pickup and arrival times, readable without the script
    assert response["Referrer-Policy"] == "no-referrer" and response["Cache-Control"] == "no-store"
    assert delivery.tracking_token not in html  # the script reads it from the address bar


@pytest.mark.django_db
def test_a_delivered_page_offers_the_rating_once(client):
    """The form stayed after the customer had rated: sending it again was a 409."""
    import re

    delivery = delivery_in("delivered")
    url = f"/track/{delivery.pk}?token={delivery.tracking_token}"

    def cards(html):
        return {name: not re.search(rf'id="{name}"[^>]* hidden', html) for name in ("rating-card", "rated")}

    before = client.get(url).content.decode()
    assert cards(before) == {"rating-card": True, "rated": False}
    assert '"rated": false' in before
    assert client.post(f"/v2/orders/{delivery.seller_order_id}/rating?token={delivery.tracking_token}",
                       {"stars": 4}, content_type="application/json").status_code == 201

    after = client.get(url).content.decode()
    assert cards(after) == {"rating-card": False, "rated": True}
    assert '"rated": true' in after and "★★★★<" in after


@pytest.mark.django_db
def test_head_answers_as_get_does_without_a_body_and_other_methods_are_405(client):
    delivery = delivery_in("assigned")
    url = f"/track/{delivery.pk}?token={delivery.tracking_token}"

    head = client.head(url)

    assert head.status_code == 200 and head.content == b"" and head["Cache-Control"] == "no-store"
    assert client.head(f"/track/{delivery.pk}?token=wrong").status_code == 404
    assert client.post(url).status_code == 405


@pytest.mark.django_db
def test_a_pending_delivery_page_has_no_driver(client):
    delivery = delivery_in("ready")

    html = client.get(f"/track/{delivery.pk}?token={delivery.tracking_token}").content.decode()

    assert "Your order is being prepared" in html and 'id="driver-card" hidden' in html


@pytest.mark.django_db
@pytest.mark.parametrize("token", [None, "", "wrong"])
def test_a_bad_tracking_link_is_a_404_page(client, token):
    delivery = delivery_in("assigned")
    url = f"/track/{delivery.pk}" + ("" if token is None else f"?token={token}")

    response = client.get(url)

    assert response.status_code == 404
    assert "This tracking link is not valid" in response.content.decode()
    assert "John" not in response.content.decode()


@pytest.mark.django_db
def test_the_page_speaks_the_customers_language_else_the_browsers(client):
    """The messages were in the delivery's customerLanguage and the page they link to in
    English. Now the page, its script's words and the opt-out page follow it ("es-MX" reads
    es); without one, or one the pages lack, the browser's Accept-Language; else English."""
    delivery = delivery_in("ready")
    delivery.customer_language = "es-MX"
    delivery.save(update_fields=["customer_language"])
    url = f"/track/{delivery.pk}?token={delivery.tracking_token}"

    spanish = client.get(url, HTTP_ACCEPT_LANGUAGE="en")
    html = spanish.content.decode()
    assert spanish["Content-Language"] == "es" and '<html lang="es">' in html
    assert "Tu pedido se está preparando" in html and "Preparación" in html and "conectando…" in html
    page = json.loads(html.split('id="tracking-page" type="application/json">')[1].split("</script>")[0])
    assert page["labels"]["delivered"] == "Entregado" and page["text"]["live"] == "en directo"
    assert page["names"]["in_transit"] == "En camino" and 'data-status="ready">ready<' not in html
    assigned = delivery_in("assigned")  # (numbers as the script writes them: "12,98959, 77,59460" read as four)
    assigned.customer_language = "es"
    assigned.save(update_fields=["customer_language"])
    html = client.get(f"/track/{assigned.pk}?token={assigned.tracking_token}").content.decode()
    location = html.split('id="location">')[1].split("<time")[0]
    assert re.fullmatch(r"-?\d+\.\d{5}, -?\d+\.\d{5} a las ", location), location
    assert re.search(r'id="driver-rating">\d\.\d+<', html)
    opt_out = client.get(f"/track/{delivery.pk}/opt-out?token={delivery.tracking_token}").content.decode()
    assert "¿Dejar de recibir mensajes de entrega?" in opt_out and f"tu pedido de {delivery.store_name}" in opt_out

    delivery.customer_language = "hi"  # (the messages have no Hindi page either: the browser's)
    delivery.save(update_fields=["customer_language"])
    assert "Your order is being prepared" in client.get(url).content.decode()
    assert "Tu pedido se está preparando" in client.get(url, HTTP_ACCEPT_LANGUAGE="es-ES,es;q=0.9").content.decode()
    wrong = client.get(f"/track/{delivery.pk}?token=wrong", HTTP_ACCEPT_LANGUAGE="es")
    assert wrong.status_code == 404 and "Este enlace de seguimiento no es válido" in wrong.content.decode()
    english = client.get(url, HTTP_ACCEPT_LANGUAGE="fr")
    assert english["Content-Language"] == "en" and "Your order is being prepared" in english.content.decode()


@pytest.mark.django_db
def test_the_tracking_url_of_a_delivery_is_this_page(client):
    delivery = delivery_in("ready")
    path = delivery.tracking_url.removeprefix("http://127.0.0.1:8000")

    assert client.get(path).status_code == 200
    with_slash = path.replace("?", "/?", 1)  # (a link retyped with a slash was a 404)
    assert client.get(with_slash).status_code == 200 and client.get(with_slash.split("?")[0]).status_code == 404


# ------------------------------------------------------------------------------ live, in a browser


def _served(tmp_path, **extra_env):
    """uvicorn serving config.asgi on a free loopback port, on the test database and Redis:
    (base URL, log path)."""
    port = free_port()
    log_path = tmp_path / "uvicorn.log"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": subprocess_database_url(),
        "TEST_REDIS_URL": settings.REDIS_URL,
        "TRACKING_BASE_URL": f"http://127.0.0.1:{port}/track",
        "TRACKING_LEAFLET_URL": "",  # no CDN from the test: the page must work without the map
        "PYTHONUNBUFFERED": "1",
        **extra_env,
    }
    return uvicorn(port, env, log_path, log_level="info", ready_path="/health", timeout=30), log_path


@pytest.fixture
def uvicorn_server(transactional_db, tmp_path):
    """Depends on `transactional_db` so that it stops before the tables are flushed."""
    server, log_path = _served(tmp_path)
    with server as base:
        yield base, log_path


@pytest.fixture
def capped_server(transactional_db, tmp_path):
    """As uvicorn_server, with one socket a customer link (SOCKET_MAX_PER_CREDENTIAL) on its one
    process."""
    server, log_path = _served(tmp_path, SOCKET_MAX_PER_CREDENTIAL="1")
    with server as base:
        yield base, log_path


@pytest.fixture
def chromium():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        pytest.skip(f"headless browser check needs {', '.join(missing)} (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = chrome_options(CHROMIUM)
    browser = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


@pytest.mark.slow
def test_in_a_browser_the_page_renders_and_moves_the_driver_when_a_fix_arrives(uvicorn_server, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, log_path = uvicorn_server
    delivery = DeliveryFactory(prep_time_minutes=0)
    driver = DriverFactory(name="Maria Lopez", phone="+34 612 345 678", location=km_north(-2))
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    text = lambda element_id: chromium.find_element(By.ID, element_id).text  # noqa: E731

    chromium.get(f"{base}/track/{delivery.pk}?token={delivery.tracking_token}")
    WebDriverWait(chromium, 15).until(lambda b: text("connection") == "live")

    assert text("status") == "Driver assigned"  # (written by the script from the socket's snapshot)
    assert chromium.find_element(By.ID, "status").get_attribute("data-status") == "assigned"
    assert text("status-label") == "A driver is on the way to the store"
    assert text("driver-name") == "Maria L." and text("driver-phone") == "***-***-5678"
    assert text("eta-delivery") not in ("", "—")

    new = km_north(-1.5)
    response = httpx.post(
        f"{base}/v2/drivers/{driver.pk}/location", json={"lat": new.y, "lon": new.x, "accuracyMeters": 7},
        headers={"Authorization": f"Token {token_for(driver.user)}"}, timeout=10,
    )
    assert response.status_code == 200 and response.json()["accepted"], response.text

    WebDriverWait(chromium, 10).until(
        lambda b: b.find_element(By.ID, "location").get_attribute("data-lat") not in (None, "")
        and abs(float(b.find_element(By.ID, "location").get_attribute("data-lat")) - new.y) < 1e-6
    )
    assert text("location").startswith(f"{new.y:.5f}, {new.x:.5f} at ")

    assert csp_violations(chromium) == []  # the page's CSP lets its Leaflet, styles, socket and script work

    log = log_path.read_text()
    assert "/ws/track/" in log  # uvicorn logged the socket, ...
    assert delivery.tracking_token not in log  # ... without its token
    assert token_for(driver.user) not in log


@pytest.mark.slow
def test_in_a_browser_a_link_over_its_socket_cap_says_so_and_does_not_retry_every_second(capped_server, chromium):
    """A socket over SOCKET_MAX_PER_CREDENTIAL is accepted and closed with 4429: the page's
    open handler reset its backoff, so it reconnected about once a second for good."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from websockets.sync.client import connect

    base, log_path = capped_server
    delivery = DeliveryFactory()
    text = lambda element_id: chromium.find_element(By.ID, element_id).text  # noqa: E731

    with connect(f"ws{base[4:]}/ws/track/{delivery.pk}/?token={delivery.tracking_token}") as held:
        assert json.loads(held.recv(timeout=10))["type"] == "delivery_snapshot"
        chromium.get(f"{base}/track/{delivery.pk}?token={delivery.tracking_token}")
        WebDriverWait(chromium, 15).until(lambda b: text("connection") == "too many open pages, retrying in a minute")
        refusals = lambda: log_path.read_text().count("TrackingConsumer refused (4429)")  # noqa: E731
        assert refusals() == 1
        # the old page tried again 1 s later, and every second after: now a minute
        with pytest.raises(TimeoutException):
            WebDriverWait(chromium, 3, poll_frequency=0.25).until(lambda b: refusals() > 1)
        assert text("connection") == "too many open pages, retrying in a minute"


@pytest.fixture
def named_server(transactional_db, tmp_path):
    """As uvicorn_server, with every Redis connection of the server named (CLIENT LIST shows
    it): (base URL, the name)."""
    name = f"track-page-{uuid.uuid4().hex[:8]}"
    server, _ = _served(tmp_path, TEST_REDIS_URL=f"{settings.REDIS_URL}?client_name={name}")
    with server as base:
        yield base, name


@pytest.mark.slow
def test_in_a_browser_a_page_whose_socket_is_closed_at_once_backs_off(named_server, chromium):
    """A server that closes the page's socket as soon as it opens (1012 after each of its
    pub/sub connection's drops here; 1013 when overloaded): the page reset its backoff on
    every open and came back every second, for good. Now the backoff starts over only once a
    socket has stayed open 10 s: 1, 2, 4 s (± 25 %)."""
    import time

    import redis
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, name = named_server
    delivery = DeliveryFactory()
    admin = redis.Redis.from_url(settings.REDIS_URL)
    text = lambda: chromium.find_element(By.ID, "connection").text  # noqa: E731

    chromium.get(f"{base}/track/{delivery.pk}?token={delivery.tracking_token}")
    WebDriverWait(chromium, 15).until(lambda b: text() == "live")
    gaps = []
    try:
        for _ in range(3):
            killed = sum(admin.client_kill_filter(_id=c["id"]) for c in admin.client_list(_type="pubsub") if c.get("name") == name)
            assert killed >= 1
            dropped = time.monotonic()
            WebDriverWait(chromium, 10, poll_frequency=0.05).until(lambda b: text() != "live")
            WebDriverWait(chromium, 15, poll_frequency=0.05).until(lambda b: text() == "live")
            gaps.append(time.monotonic() - dropped)
    finally:
        admin.close()
    assert gaps[0] < 2.5 and gaps[1] > 1.4 and gaps[2] > 2.9, gaps  # (was ~1 s each)


@pytest.mark.slow
def test_in_a_browser_a_rating_sent_replaces_the_form(uvicorn_server, chromium):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from tracking.models import DeliveryRating

    base, _ = uvicorn_server
    delivery = delivery_in("delivered")
    chromium.get(f"{base}/track/{delivery.pk}?token={delivery.tracking_token}")
    element = lambda element_id: chromium.find_element(By.ID, element_id)  # noqa: E731
    assert element("rating-card").is_displayed() and not element("rated").is_displayed()

    Select(chromium.find_element(By.NAME, "stars")).select_by_value("3")
    # sent twice at once (a double click): one rating is sent. Both were, and the second's 409
    # ("already been rated") cleared the stars the first had shown.
    assert chromium.execute_script("""
        var sent = 0, fetched = window.fetch, form = document.getElementById("rating-form");
        window.fetch = function () { sent += 1; return fetched.apply(this, arguments); };
        form.requestSubmit(); form.requestSubmit();
        return sent;""") == 1
    WebDriverWait(chromium, 10).until(lambda b: element("rated").is_displayed())

    assert not element("rating-card").is_displayed() and element("rated-stars").text == "★★★"
    assert DeliveryRating.objects.get(delivery=delivery).stars == 3
    assert csp_violations(chromium) == []


@pytest.mark.django_db
def test_the_page_loads_leaflet_from_our_own_static_files(client, settings):
    settings.TRACKING_LEAFLET_URL = "/static/leaflet"  # the default
    delivery = DeliveryFactory()
    page = client.get(f"/track/{delivery.pk}?token={delivery.tracking_token}").content.decode()
    assert 'src="/static/leaflet/leaflet.js"' in page and 'href="/static/leaflet/leaflet.css"' in page
    assert "unpkg" not in page and "cdn" not in page.lower()
    for asset in ("leaflet.js", "leaflet.css", "images/marker-icon.png"):
        assert client.get(f"/static/leaflet/{asset}").status_code == 200, asset


def test_the_committed_translations_are_compiled_from_their_po():
    """Set-up compiles nothing (no gettext on a fresh machine): the .mo beside each .po must say
    what the .po says, or an edit would not show."""
    import gettext
    import re

    for po in Path(settings.BASE_DIR, "locale").glob("*/LC_MESSAGES/django.po"):
        entries = dict(re.findall(r'^msgid "(.+)"\nmsgstr "(.*)"$', po.read_text(encoding="utf-8"), flags=re.M))
        with open(po.with_suffix(".mo"), "rb") as mo:
            compiled = gettext.GNUTranslations(mo)
        assert entries and {msgid: compiled.gettext(msgid) for msgid in entries} == entries, po


def test_every_word_of_the_pages_has_its_translation():
    """A msgid that differs from the template's by one character shows English, silently."""
    import re

    root = Path(settings.BASE_DIR)
    wanted = set()
    for template in (root / "templates" / "track").glob("*.html"):
        text = template.read_text(encoding="utf-8")
        wanted |= set(re.findall(r'{% translate "([^"]+)" %}', text))
        for block in re.findall(r"{% blocktranslate trimmed %}(.*?){% endblocktranslate %}", text, flags=re.S):
            wanted.add(re.sub(r"{{ (\w+) }}", r"%(\1)s", " ".join(block.split())))
    wanted |= set(re.findall(r'\b_\("([^"]+)"\)', (root / "tracking" / "api" / "views.py").read_text(encoding="utf-8")))
    for po in (root / "locale").glob("*/LC_MESSAGES/django.po"):
        translated = dict(re.findall(r'^msgid "(.+)"\nmsgstr "(.+)"$', po.read_text(encoding="utf-8"), flags=re.M))
        assert len(wanted) > 40 and wanted <= set(translated), sorted(wanted - set(translated))
