"""Nothing from a CDN (STYLE): no template, setting or rendered page of ours refers a browser
to a script, stylesheet or font on another host; every one it refers to is served here."""
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings

from tests.factories import DeliveryFactory, DriverFactory, ZoneFactory

pytestmark = pytest.mark.django_db

ROOT = Path(settings.BASE_DIR)
# A script or stylesheet reference to anywhere but this server: an absolute or
# protocol-relative URL in src=/href= of <script>/<link>, or an @import / url() in CSS.
EXTERNAL_ASSET = re.compile(
    r"""<script[^>]*\bsrc\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|<link[^>]*\bhref\s*=\s*["']?\s*(?:https?:)?//"""
    r"""|@import\s+(?:url\()?\s*["']?(?:https?:)?//""",
    re.IGNORECASE,
)
# Hosts that serve browser code and fonts (server-side APIs such as a push gateway are not assets).
ASSET_HOSTS = re.compile(
    r"(^|\.)(unpkg\.com|jsdelivr\.net|cdnjs\.cloudflare\.com|fonts\.googleapis\.com|ajax\.googleapis\.com"
    r"|fonts\.gstatic\.com|code\.jquery\.com|bootstrapcdn\.com|openlayers\.org|unpkg\.io)$|^cdn\.",
    re.IGNORECASE,
)


def our_templates() -> list[Path]:
    dirs = [ROOT / "templates", *ROOT.glob("*/templates")]
    return sorted(p for d in dirs for p in d.rglob("*.html") if ".venv" not in p.parts)


def test_the_setting_check_knows_an_asset_host_from_an_api_host():
    assert ASSET_HOSTS.search("cdn.jsdelivr.net") and ASSET_HOSTS.search("unpkg.com") and ASSET_HOSTS.search("fonts.googleapis.com")
    assert not ASSET_HOSTS.search("fcm.googleapis.com") and not ASSET_HOSTS.search("tile.openstreetmap.org")


def test_the_template_check_finds_a_cdn_reference():
    assert EXTERNAL_ASSET.search('<script src="https://unpkg.com/leaflet@1.9.4/dist/leaflet.js"></script>')
    assert EXTERNAL_ASSET.search("<link rel='stylesheet' href='//cdn.example.com/x.css'>")
    assert not EXTERNAL_ASSET.search('<script src="{% static \'leaflet/leaflet.js\' %}"></script>')
    assert not EXTERNAL_ASSET.search('<a href="https://www.openstreetmap.org/">open map</a>')


def test_no_template_of_ours_loads_a_script_or_stylesheet_from_another_host():
    templates = our_templates()
    assert len(templates) > 10 and any("console" in str(p) for p in templates)
    offenders = [str(p.relative_to(ROOT)) for p in templates if EXTERNAL_ASSET.search(p.read_text())]
    assert offenders == []


def test_no_static_file_of_ours_imports_from_another_host():
    files = [p for d in ROOT.glob("*/static") for p in d.rglob("*") if p.suffix in (".js", ".css")]
    assert files
    offenders = [str(p) for p in files if re.search(r"""(?:import|fetch|src\s*=|url\()\s*\(?\s*["'](?:https?:)?//""", p.read_text())]
    assert offenders == []


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def test_no_setting_points_a_browser_at_an_outside_script_or_stylesheet():
    """Map tiles (images) are the one outside resource, behind OPS_MAP_TILE_URL / TRACKING_TILE_URL."""
    offenders = []
    for name in dir(settings):
        if not name.isupper():
            continue
        for text in _strings(getattr(settings, name)):
            url = text.strip().lower()
            if re.match(r"(https?:)?//", url) and (
                re.search(r"\.(m?js|css|woff2?|ttf)(\?|$)", url) or ASSET_HOSTS.search(urlsplit(url).hostname or "")
            ):
                offenders.append((name, text))
    assert offenders == []
    assert settings.SPECTACULAR_SETTINGS["SWAGGER_UI_DIST"] == "SIDECAR"
    assert settings.SPECTACULAR_SETTINGS["REDOC_DIST"] == "SIDECAR"


class _Assets(HTMLParser):
    def __init__(self):
        super().__init__()
        self.urls = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "script" and a.get("src"):
            self.urls.append(a["src"])
        elif tag == "link" and a.get("href") and "stylesheet" in (a.get("rel") or ""):
            self.urls.append(a["href"])


def assets_of(html: str) -> list[str]:
    parser = _Assets()
    parser.feed(html)
    return parser.urls


def test_every_page_loads_its_scripts_and_stylesheets_from_here(admin_client, client):
    zone = ZoneFactory()
    driver = DriverFactory()
    delivery = DeliveryFactory()
    pages = [
        "/admin/", "/admin/map/", "/admin/analytics/", "/admin/zones/deliveryzone/add/",
        f"/admin/zones/deliveryzone/{zone.pk}/change/", f"/admin/availability/driver/{driver.pk}/change/",
        f"/admin/dispatch/delivery/{delivery.pk}/change/", "/v2/docs/", "/v2/redoc/",
    ]
    seen = set()
    for url in pages:
        page = admin_client.get(url)
        assert page.status_code == 200, url
        urls = assets_of(page.content.decode())
        assert urls, f"{url} loads no script or stylesheet at all?"
        for asset in urls:
            assert asset.startswith("/") and not asset.startswith("//"), (url, asset)
            seen.add(asset.split("?")[0])
    tracking = client.get(f"/track/{delivery.pk}?token={delivery.tracking_token}")
    for asset in assets_of(tracking.content.decode()):
        assert asset.startswith("/") and not asset.startswith("//"), asset
        seen.add(asset.split("?")[0])
    # ... and is served by us (the admin's own scripts to its users)
    for asset in sorted(seen):
        assert (admin_client if asset.startswith("/admin/") else client).get(asset).status_code == 200, asset
    assert any("swagger-ui" in a for a in seen) and any("redoc" in a for a in seen)
    assert any(a.endswith("leaflet.draw.js") or "leaflet/draw" in a for a in seen)  # the zone editor's drawing tools
