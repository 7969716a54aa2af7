"""Every HTML page (ops console, /support/, /track/) carries a Content-Security-Policy:
scripts, styles, sockets and fetches from this server only, images from here and the map tile
servers; the API docs keep their own (config/views.py DOCS_CSP); JSON answers carry none."""
import pytest

from common.middleware import _asset_origin, _page_csp
from tests.factories import DeliveryFactory

pytestmark = pytest.mark.django_db


def directives(response) -> dict[str, list[str]]:
    policy = response["Content-Security-Policy"]
    return {d.split()[0]: d.split()[1:] for d in policy.split("; ")}


@pytest.mark.parametrize("path", ["/admin/login/", "/support/login/", "/track/00000000-0000-0000-0000-000000000000"])
def test_pages_carry_the_policy(client, path):
    r = client.get(path)
    assert r["Content-Type"].startswith("text/html")
    csp = directives(r)
    assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'", "'unsafe-inline'"]
    assert csp["img-src"] == ["'self'", "data:", "blob:", "https://tile.openstreetmap.org"]
    assert csp["connect-src"] == ["'self'", "ws://testserver", "wss://testserver"]
    assert csp["object-src"] == ["'none'"] and csp["frame-ancestors"] == ["'none'"]
    assert csp["form-action"] == ["'self'"] and csp["base-uri"] == ["'self'"]


def test_the_tracking_page_and_the_console_carry_it_signed_in(admin_client):
    delivery = DeliveryFactory()
    for path in (f"/track/{delivery.pk}?token={delivery.tracking_token}", "/admin/", "/admin/dispatch/delivery/"):
        r = admin_client.get(path)
        assert r.status_code == 200 and "script-src 'self' 'unsafe-inline'" in r["Content-Security-Policy"], path


def test_the_docs_keep_their_own_and_the_api_answers_none(client, ops):
    assert "worker-src 'self' blob:" in client.get("/v2/redoc/")["Content-Security-Policy"]
    assert "Content-Security-Policy" not in ops.get("/v2/deliveries")
    assert "Content-Security-Policy" not in client.get("/health/")


def test_the_tile_and_leaflet_hosts_an_operator_configures_are_allowed(client, settings):
    settings.OPS_MAP_TILE_URL = "https://{s}.tiles.example.com:8443/{z}/{x}/{y}.png"
    settings.TRACKING_TILE_URL = "http://maps.internal/{z}/{x}/{y}.png"
    settings.TRACKING_LEAFLET_URL = "https://assets.example.net/leaflet/1.9.4"
    csp = directives(client.get("/admin/login/"))
    assert csp["img-src"] == ["'self'", "data:", "blob:", "http://maps.internal", "https://*.tiles.example.com:8443",
                              "https://assets.example.net"]
    assert csp["script-src"] == ["'self'", "'unsafe-inline'", "https://assets.example.net"]
    assert csp["style-src"] == ["'self'", "'unsafe-inline'", "https://assets.example.net"]


def test_an_origin_is_read_off_an_absolute_url_only():
    assert _asset_origin("/static/leaflet") is None and _asset_origin("") is None
    assert _asset_origin("https://user:pw@tile.example.com/{z}/{x}/{y}.png") == "https://tile.example.com"
    assert _asset_origin("javascript:alert(1)") is None
    assert _asset_origin("//cdn.example.org/leaflet") == "https://cdn.example.org"  # scheme-relative
    assert "tile" not in _page_csp(("",), "/static/leaflet")  # no tiles configured: images from here only


def test_every_page_names_an_icon_served_from_here(admin_client, client):
    """Browsers asked for /favicon.ico on every page and got the API's JSON 404."""
    import re

    delivery = DeliveryFactory()
    pages = [admin_client.get("/admin/"), client.get("/support/login/"), client.get("/v2/redoc/"),
             client.get(f"/track/{delivery.pk}?token={delivery.tracking_token}"), client.get(f"/track/{delivery.pk}?token=wrong")]
    icons = {re.search(r'<link rel="icon" href="([^"]+)"', p.content.decode())[1] for p in pages}
    assert icons == {"/static/console/favicon.svg"}
    icon = client.get("/static/console/favicon.svg")
    assert icon.status_code == 200 and icon["Content-Type"] == "image/svg+xml"
