"""The ops console for zones: boundaries on a map, staffing and health at a glance, broken
polygons refused as form errors, and zone preferences inline on the driver page."""
import logging
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from django.contrib.gis.geos import Point, Polygon

from tests.factories import DriverFactory, ZoneFactory
from zones.models import DeliveryZone, DriverZonePreference
from zones.services import zone_preferences_set, zone_update

pytestmark = pytest.mark.django_db

SQUARE_EWKT = "SRID=4326;POLYGON((30.5 10.9, 30.6 10.9, 30.6 11.0, 30.5 11.0, 30.5 10.9))"
BOWTIE_EWKT = "SRID=4326;POLYGON((30.5 10.9, 30.6 11.0, 30.6 10.9, 30.5 11.0, 30.5 10.9))"


class _FormFields(HTMLParser):
    """The values a browser would submit for the first <form id="..._form"> of an admin page."""

    def __init__(self):
        super().__init__()
        self.data, self._select, self._textarea = {}, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        name = a.get("name")
        if tag == "input" and name and a.get("type") not in ("submit", "button", "file"):
            if a.get("type") in ("checkbox", "radio") and "checked" not in a:
                return
            self.data[name] = a.get("value", "on" if a.get("type") == "checkbox" else "")
        elif tag == "select" and name:
            self._select = name
            self.data.setdefault(name, "")
        elif tag == "option" and self._select and "selected" in a:
            self.data[self._select] = a.get("value", "")
        elif tag == "textarea" and name:
            self._textarea = name
            self.data[name] = ""

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None

    def handle_data(self, data):
        if self._textarea:
            self.data[self._textarea] += data.strip("\n")


def form_data(page) -> dict:
    parser = _FormFields()
    parser.feed(page.content.decode())
    parser.data.pop("csrfmiddlewaretoken", None)
    return parser.data


ADD_FORM = {
    "name": "Downtown", "geometry": SQUARE_EWKT, "priority_level": "2", "min_drivers_online": "3",
    "target_wait_time_seconds": "300", "offer_expires_seconds": "", "search_radius_km": "",
}


def test_zone_pages_render_with_a_map(admin_client):
    zone = ZoneFactory(name="Downtown")

    assert admin_client.get("/admin/zones/deliveryzone/").status_code == 200
    for url in ("/admin/zones/deliveryzone/add/", f"/admin/zones/deliveryzone/{zone.pk}/change/"):
        page = admin_client.get(url)
        assert page.status_code == 200
        # django-leaflet's editor, from our static files (no CDN): Leaflet and Leaflet.draw
        assert b"/static/leaflet/leaflet.js" in page.content and b"/static/leaflet/draw/leaflet.draw.js" in page.content


def test_the_zone_list_shows_priority_staffing_health_and_flags_understaffed_zones(admin_client):
    short = ZoneFactory(name="Short-staffed", priority_level=1, min_drivers_online=5)
    DeliveryZone.objects.filter(pk=short.pk).update(current_drivers_online=1, health_score=35)
    fine = ZoneFactory(name="Fully staffed", bbox=(30.7, 10.9, 30.8, 11.0), min_drivers_online=2)
    DeliveryZone.objects.filter(pk=fine.pk).update(current_drivers_online=3, health_score=96)

    page = admin_client.get("/admin/zones/deliveryzone/").content.decode()

    short_row = next(r for r in page.split("<tr") if "Short-staffed" in r)
    fine_row = next(r for r in page.split("<tr") if "Fully staffed" in r)
    assert "1 / 5" in short_row and "zone-below-min" in short_row and ">35<" in short_row
    assert "3 / 2" in fine_row and "zone-below-min" not in fine_row and ">96<" in fine_row
    below = admin_client.get("/admin/zones/deliveryzone/?staffing=below").content.decode()
    assert "Short-staffed" in below and "Fully staffed" not in below


def test_a_boundary_drawn_on_the_map_is_stored_as_drawn(admin_client):
    # what the Leaflet editor submits: GeoJSON in WGS84
    square = Polygon.from_bbox((30.5, 10.9, 30.6, 11.0))
    square.srid = 4326
    r = admin_client.post("/admin/zones/deliveryzone/add/", {**ADD_FORM, "geometry": square.json})

    assert r.status_code == 302, r.content.decode()[:2000]
    stored = DeliveryZone.objects.get(name="Downtown").geometry
    assert stored.srid == 4326 and stored.equals_exact(square, tolerance=1e-9)


@pytest.mark.parametrize("field, value", [
    ("target_wait_time_seconds", "2147483647"), ("target_wait_time_seconds", "86401"), ("min_drivers_online", "100001"),
])
def test_the_zone_page_takes_the_apis_bounds_for_staffing_and_targets(admin_client, field, value):
    """It took up to 2,147,483,647 (a 68-year target wait; an audit), the API at most a day and
    100,000 drivers."""
    r = admin_client.post("/admin/zones/deliveryzone/add/", {**ADD_FORM, field: value})

    assert r.status_code == 200 and "Ensure this value is less than or equal to" in r.content.decode()
    assert not DeliveryZone.objects.exists()


def test_ops_draw_a_zone_in_the_admin(admin_client):
    r = admin_client.post("/admin/zones/deliveryzone/add/", ADD_FORM)

    assert r.status_code == 302, r.content.decode()[:2000]
    zone = DeliveryZone.objects.get(name="Downtown")
    assert zone.priority_level == 2 and zone.min_drivers_online == 3
    assert zone.geometry.equals(Polygon.from_bbox((30.5, 10.9, 30.6, 11.0)))


@pytest.mark.parametrize(
    "geometry,message",
    [
        (BOWTIE_EWKT, "self-intersection"),
        ("SRID=4326;POLYGON((30.5 10.9, 30.6 10.9, 30.6 11.0, 30.5 11.0))", "Invalid geometry value"),
        ("SRID=4326;POINT(30.5 10.9)", "Invalid geometry type"),
        ("SRID=4326;POLYGON EMPTY", "empty"),
        ("not a polygon at all", "Invalid geometry value"),
        ("SRID=99999;POLYGON((0 0, 1 0, 1 1, 0 0))", "not SRID 99999"),
        ("SRID=3857;POLYGON((0 0, 1e20 0, 1 1, 0 0))", "off the map"),
        ("SRID=4326;POLYGON((-180 -90, 180 -90, 180 90, -180 90, -180 -90))", "180°"),
        ("SRID=4326;POLYGON((-179 -80, 179 -80, 179 80, -179 80, -179 -80))", "the other way round"),
        ("SRID=4326;POLYGON Z((0 0 0, 1 0 0, 1 1 0, 0 1 0, 0 0 0))", "height"),
        ("SRID=3857;POLYGON((0 0, 1 0, nan 1, 0 0))", "off the map"),  # (GEOS's extent skips the NaN)
        ('{"type": "Polygon", "coordinates": "x"}', "Invalid geometry value"),
        ('{"type": "Polygon", "coordinates": [[[30.5, 10.9], [30.6, 10.9], [30.6, 11.0]]]}', "Invalid geometry value"),
        ('{"type": "Polygon", "coordinates": [[[30.5, 10.9], [30.6, 10.9], [30.6, 11.0], [30.5, 10.9]]],'
         ' "crs": {"type": "name", "properties": {"name": "EPSG:999999"}}}', "Only WGS84"),
        ('{"type": "Polygon", "coordinates": ' + "[" * 3000 + "]" * 3000 + "}", "Invalid geometry value"),
        ('{"a": ' * 3000 + "1" + "}" * 3000, "Invalid geometry value"),
    ],
    ids=["self-intersecting", "not closed", "a point", "empty", "garbage", "unknown srid", "off the web mercator map",
         "the whole world (antipodal edges)", "edges longer than 180 degrees", "with heights", "a nan in web mercator", "unreadable geojson", "geojson ring not closed",
         "geojson in another crs", "geojson nested 3,000 deep", "an object nested 3,000 deep"],
)
def test_a_broken_boundary_is_a_form_error_and_nothing_is_stored(admin_client, caplog, geometry, message):
    r = admin_client.post("/admin/zones/deliveryzone/add/", {**ADD_FORM, "geometry": geometry})

    assert r.status_code == 200
    assert "errorlist" in r.content.decode()
    assert message.lower() in r.content.decode().lower()
    assert not DeliveryZone.objects.exists()
    # GeoDjango's lines about the value it could not read are warnings (a client's typo wrote
    # two ERROR lines a request, for an alert to fire on)
    assert not [rec.getMessage()[:200] for rec in caplog.records if rec.levelno >= logging.ERROR]


def test_a_name_differing_only_in_case_is_a_form_error(admin_client):
    ZoneFactory(name="Downtown", bbox=(30.7, 10.9, 30.8, 11.0))

    for name in ("downtown", "Downtown"):
        r = admin_client.post("/admin/zones/deliveryzone/add/", {**ADD_FORM, "name": name})

        assert r.status_code == 200
        page = r.content.decode()
        assert page.count("A zone with this name already exists.") == 1 and "already exists" not in page.replace(
            "A zone with this name already exists.", ""), name  # (the same name was told twice, in two wordings)
        assert DeliveryZone.objects.count() == 1


def test_the_migration_tells_apart_names_differing_only_in_case():
    """Zones made before the constraint: all but the oldest of a name get a suffix."""
    import importlib

    from django.apps import apps
    from django.db import connection

    migration = importlib.import_module("zones.migrations.0008_zone_name_ci_unique")
    with connection.cursor() as cursor:
        cursor.execute("DROP INDEX zone_name_ci_unique")  # (an index: an expression); rolled back with the test
    first = ZoneFactory(name="Downtown")
    second = ZoneFactory(name="DOWNTOWN", bbox=(30.7, 10.9, 30.8, 11.0))
    third = ZoneFactory(name="downtown", bbox=(30.8, 10.9, 30.9, 11.0))
    ZoneFactory(name="downtown (2)", bbox=(30.9, 10.9, 31.0, 11.0))

    migration.rename_case_duplicates(apps, None)

    names = [z.name for z in DeliveryZone.objects.filter(pk__in=[first.pk, second.pk, third.pk]).order_by("created_at")]
    assert names == ["Downtown", "DOWNTOWN (3)", "downtown (4)"]


def test_out_of_range_overrides_are_form_errors(admin_client):
    r = admin_client.post(
        "/admin/zones/deliveryzone/add/", {**ADD_FORM, "offer_expires_seconds": "5", "search_radius_km": "0"}
    )

    assert r.status_code == 200
    assert r.content.decode().count("errorlist") >= 2
    assert not DeliveryZone.objects.exists()


def test_editing_a_zone_in_the_admin_goes_through_the_service(admin_client):
    zone = ZoneFactory(name="Downtown")
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    zone_preferences_set(driver_id=driver.pk, preferences=[(zone.pk, "PREFERRED")])
    url = f"/admin/zones/deliveryzone/{zone.pk}/change/"
    data = form_data(admin_client.get(url))

    data.update(priority_level="1", geometry="SRID=4326;POLYGON((30.5 11.4, 30.6 11.4, 30.6 11.5, 30.5 11.5, 30.5 11.4))")
    r = admin_client.post(url, data)

    assert r.status_code == 302, r.content.decode()[:3000]
    zone.refresh_from_db()
    assert zone.priority_level == 1
    # the boundary moved onto the driver's home: the service refreshed the distance
    assert float(DriverZonePreference.objects.get(driver=driver).distance_to_zone_center) == pytest.approx(0, abs=0.01)


def test_the_recompute_action_refreshes_the_selected_zones(admin_client):
    zone = ZoneFactory(name="Downtown", min_drivers_online=0)

    r = admin_client.post(
        "/admin/zones/deliveryzone/", {"action": "refresh_health", "_selected_action": [str(zone.pk)]}, follow=True
    )

    assert b"Health recomputed for 1 zone." in r.content
    zone.refresh_from_db()
    assert zone.health_score == 100


# ------------------------------------------------------------- driver page inline


def test_the_driver_page_shows_zone_preferences_inline(admin_client):
    zone = ZoneFactory(name="Downtown")
    driver = DriverFactory()
    zone_preferences_set(driver_id=driver.pk, preferences=[(zone.pk, "UNAVAILABLE")])

    page = admin_client.get(f"/admin/availability/driver/{driver.pk}/change/")

    assert page.status_code == 200
    assert b"zone preference" in page.content.lower()
    assert b"UNAVAILABLE" in page.content


def test_adding_a_preference_on_the_driver_page_computes_its_distance(admin_client):
    zone = ZoneFactory(name="Downtown")
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    url = f"/admin/availability/driver/{driver.pk}/change/"
    data = form_data(admin_client.get(url))
    prefix = "zone_preferences"
    assert data[f"{prefix}-TOTAL_FORMS"] == "0"

    data.update({
        f"{prefix}-TOTAL_FORMS": "1", f"{prefix}-0-zone": str(zone.pk), f"{prefix}-0-preference": "PREFERRED",
        f"{prefix}-0-driver": str(driver.pk),
    })
    r = admin_client.post(url, data)

    assert r.status_code == 302, r.content.decode()[:3000]
    row = DriverZonePreference.objects.get(driver=driver)
    assert row.preference == "PREFERRED"
    assert float(row.distance_to_zone_center) == pytest.approx(55.3, abs=0.5)


def test_changing_a_drivers_home_on_the_driver_page_refreshes_its_distances(admin_client):
    zone = ZoneFactory(name="Downtown")
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    zone_preferences_set(driver_id=driver.pk, preferences=[(zone.pk, "AVAILABLE")])
    url = f"/admin/availability/driver/{driver.pk}/change/"
    data = form_data(admin_client.get(url))

    data["home_location"] = "SRID=4326;POINT(30.55 10.95)"  # the zone's centre
    r = admin_client.post(url, data)

    assert r.status_code == 302, r.content.decode()[:3000]
    assert float(DriverZonePreference.objects.get(driver=driver).distance_to_zone_center) == pytest.approx(0, abs=0.01)


def test_the_zone_admin_shows_the_serviceability_and_pay_overrides_and_the_service_saves_them(admin_client):
    zone = ZoneFactory(name="Pay zone")
    page = admin_client.get(f"/admin/zones/deliveryzone/{zone.pk}/change/")
    assert page.status_code == 200 and b"driver_pay_cap" in page.content

    zone_update(zone_id=zone.pk, max_delivery_distance_km=12.5, driver_pay_per_km=Decimal("9.50"), driver_pay_cap=Decimal("80.00"))

    zone.refresh_from_db()
    assert (zone.max_delivery_distance_km, zone.driver_pay_per_km, zone.driver_pay_cap) == (12.5, Decimal("9.50"), Decimal("80.00"))


@pytest.mark.parametrize(
    "home,message",
    [
        ("SRID=3857;POINT(1e30 1e30)", "off the map"),  # PROJ spun on it: a CPU held for good
        ("SRID=4326;POINT(NaN NaN)", "empty"),
        ("SRID=4326;POINT(1 nan)", "WGS84 lon/lat"),  # (GEOS's extent raises on it: a 500)  # was stored as an empty point: the drivers API's 500
        ('{"type": "Point", "coordinates": [78.5, 1000]}', "WGS84 lon/lat"),  # was stored, read back as lat -80
        ("SRID=4326;POINT Z(78.5 13.5 1)", "height"),
        ('{"type": "Point", "coordinates": "x"}', "Invalid geometry value"),
        ("SRID=99999;POINT(1 1)", "not SRID 99999"),
        ("SRID=4326;POINT EMPTY", "empty"),
    ],
    ids=["off the web mercator map", "nan", "one nan", "latitude 1000", "with a height", "unreadable geojson", "unknown srid",
         "empty"],
)
def test_a_broken_home_location_on_the_driver_page_is_a_form_error_and_nothing_changes(admin_client, home, message):
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    url = f"/admin/availability/driver/{driver.pk}/change/"
    data = form_data(admin_client.get(url))

    r = admin_client.post(url, {**data, "home_location": home})

    assert r.status_code == 200
    assert message.lower() in r.content.decode().lower()
    driver.refresh_from_db()
    assert (driver.home_location.x, driver.home_location.y) == (30.55, 11.45)
    assert admin_client.get(f"/v2/drivers/{driver.pk}").status_code == 200


def test_a_home_location_in_web_mercator_is_stored_in_wgs84(admin_client):
    driver = DriverFactory(home_location=Point(30.55, 11.45, srid=4326))
    url = f"/admin/availability/driver/{driver.pk}/change/"
    data = form_data(admin_client.get(url))

    r = admin_client.post(url, {**data, "home_location": "SRID=3857;POINT(3400810.44 1232106.8)"})

    assert r.status_code == 302, r.content.decode()[:3000]
    driver.refresh_from_db()
    assert driver.home_location.srid == 4326
    assert driver.home_location.x == pytest.approx(30.55, abs=1e-4) and driver.home_location.y == pytest.approx(11.0, abs=1e-2)


def test_geodjangos_errors_about_the_server_stay_errors(caplog):
    """Only the lines about a value a client gave are lowered to WARNING: a PROJ database
    missing after an upgrade (every map wrong) still fires an alert."""
    gis = logging.getLogger("django.contrib.gis")
    gis.error("GDAL_ERROR %d: %s", 1, b"PROJ: proj_create_from_database: Cannot find proj.db")
    gis.error("Error transforming geometry from srid '%s' to srid '%s' (%s)", 4326, 3857, "no PROJ")
    gis.error("GEOS_ERROR: %s\n", "ParseException: Expected word but encountered end of stream")

    assert [r.levelname for r in caplog.records if r.name == "django.contrib.gis"] == ["ERROR", "ERROR", "WARNING"]


@pytest.mark.django_db(transaction=True)
def test_two_saves_of_one_new_name_at_once_give_one_zone_and_one_form_error(monkeypatch):
    """Both passed the form's name check before either was saved, and the second's save was a 500
    (the service's Conflict; an audit: two dispatchers, or a resubmit). Both requests are held
    after their checks until the other arrives (or 2 s pass): without the name's lock both get
    there, and one save meets the other's zone."""
    import threading

    from django.contrib.auth import get_user_model
    from django.test import Client

    from tests.concurrency import race
    from zones import services

    user = get_user_model().objects.create_superuser("zoner", "zoner@example.com", "pw")
    both_checked = threading.Barrier(2, timeout=2)
    create = services.zone_create

    def held_create(**fields):
        try:
            both_checked.wait()
        except threading.BrokenBarrierError:
            pass  # (the other waits for the name's lock: this one goes on alone)
        return create(**fields)

    monkeypatch.setattr(services, "zone_create", held_create)

    def save(bbox):
        client = Client()
        client.force_login(user)
        geometry = Polygon.from_bbox(bbox)
        geometry.srid = 4326
        return client.post("/admin/zones/deliveryzone/add/", {**ADD_FORM, "name": "Harbour", "geometry": geometry.ewkt})

    results, errors = race([lambda: save((30.5, 10.9, 30.6, 11.0)), lambda: save((30.7, 10.9, 30.8, 11.0))])

    assert errors == []
    assert sorted(r.status_code for r in results) == [200, 302]
    (refused,) = [r for r in results if r.status_code == 200]
    assert "A zone with this name already exists." in refused.content.decode()
    assert DeliveryZone.objects.filter(name="Harbour").count() == 1
