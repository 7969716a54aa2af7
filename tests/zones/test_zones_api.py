"""Zones over the API: the GeoJSON list, drawing and editing zones (broken polygons are a 400,
never a 500 or a stored row), and drivers' zone preferences."""
import json
import math
import uuid

import pytest
from django.contrib.gis.geos import Point, Polygon
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from availability.models import Driver
from tests.api import assert_error, client_for
from tests.factories import DriverFactory, IntegrationUserFactory, ZoneFactory, box
from zones.models import DeliveryZone, DriverZonePreference
from zones.apps import check_dispatch_policy_settings
from zones.policies import zone_policy
from zones.selectors import zone_preferences_for
from zones.services import zone_create, zone_preferences_refresh_distances, zone_preferences_set, zone_update

pytestmark = pytest.mark.django_db

# Far from the demo city other tests crowd with drivers and deliveries.
RING = [[30.50, 10.90], [30.60, 10.90], [30.60, 11.00], [30.50, 11.00], [30.50, 10.90]]
SQUARE = {"type": "Polygon", "coordinates": [RING]}


def haversine_km(lat1, lon1, lat2, lon2, radius=6371.0088):
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * radius * math.asin(math.sqrt(a))


# ------------------------------------------------------------------------ GeoJSON list


def test_zones_are_listed_as_a_geojson_feature_collection_with_camelcase_properties(ops):
    zone = ZoneFactory(
        name="Downtown", geometry=Polygon(RING), priority_level=2, min_drivers_online=4,
        offer_expires_seconds=20, search_radius_km=3.5,
    )

    r = ops.get("/v2/zones")

    assert r.status_code == 200, r.content
    body = r.json()
    assert body["type"] == "FeatureCollection" and body["next"] is None
    (feature,) = body["features"]
    assert feature["type"] == "Feature"
    assert feature["id"] == str(zone.pk)
    assert feature["geometry"] == {"type": "Polygon", "coordinates": [RING]}
    assert feature["properties"] == {
        "name": "Downtown",
        "priorityLevel": 2,
        "minDriversOnline": 4,
        "currentDriversOnline": 0,
        "belowMinimum": True,
        "avgWaitTimeSeconds": 300,
        "targetWaitTimeSeconds": 300,
        "demandLevel": 1,
        "healthScore": None,
        "offerExpiresSeconds": 20,
        "searchRadiusKm": 3.5,
        "dispatchPolicy": "",
        "offerBatchSize": None,
        "broadcastMaxDrivers": None,
        "matchingWindowSeconds": None,
        "stackingEnabled": None,
        "stackingMaxDetourMinutes": None,
        "lastUpdated": feature["properties"]["lastUpdated"],
    }
    assert feature["properties"]["lastUpdated"].endswith("Z")


def test_the_zone_list_is_paginated_by_name(ops):
    for name in ("Charlie", "Alpha", "Bravo"):
        ZoneFactory(name=name)

    first = ops.get("/v2/zones?limit=2").json()
    second = ops.get(first["next"]).json()

    assert [f["properties"]["name"] for f in first["features"]] == ["Alpha", "Bravo"]
    assert [f["properties"]["name"] for f in second["features"]] == ["Charlie"]
    assert second["next"] is None and second["type"] == "FeatureCollection"


def test_only_ops_can_read_zones(anon, driver_client, integration):
    zone = ZoneFactory(name="Downtown")
    assert_error(anon.get("/v2/zones"), 401)
    for client in (driver_client, integration):
        assert_error(client.get("/v2/zones"), 403)
        assert_error(client.get(f"/v2/zones/{zone.pk}/health"), 403)
        assert_error(client.post("/v2/zones", {"name": "X", "geometry": SQUARE}, format="json"), 403)


# ------------------------------------------------------------------- drawing zones


def test_ops_draw_a_zone_through_the_api(ops):
    r = ops.post(
        "/v2/zones",
        {"name": "Downtown", "geometry": SQUARE, "priorityLevel": 1, "minDriversOnline": 3, "offerExpiresSeconds": 15},
        format="json",
    )

    assert r.status_code == 201, r.content
    zone = DeliveryZone.objects.get(pk=r.json()["id"])
    assert (zone.name, zone.priority_level, zone.min_drivers_online, zone.offer_expires_seconds) == ("Downtown", 1, 3, 15)
    assert zone.search_radius_km is None
    assert zone.geometry.srid == 4326 and zone.geometry.equals(box(30.50, 10.90, 30.60, 11.00))


def test_a_new_zone_shows_its_health_computed_not_the_columns_defaults(ops):
    """Until the health job's next run a new zone showed a 300 s average wait (the column's
    default) dated its creation, while its /health said 0 s (an analytics audit)."""
    r = ops.post("/v2/zones", {"name": "Fresh", "geometry": SQUARE, "minDriversOnline": 2}, format="json")

    assert r.status_code == 201, r.content
    created = r.json()["properties"]
    health = ops.get(f"/v2/zones/{r.json()['id']}/health").json()
    assert created["avgWaitTimeSeconds"] == 0 and created["healthScore"] is not None and created["currentDriversOnline"] == 0
    listed = next(f["properties"] for f in ops.get("/v2/zones").json()["features"] if f["id"] == r.json()["id"])
    assert listed["avgWaitTimeSeconds"] == 0 and listed["healthScore"] == created["healthScore"]
    assert (health["avgWaitTimeSeconds"], health["healthScore"]) == (created["avgWaitTimeSeconds"], created["healthScore"])


def test_editing_a_zone_changes_only_what_was_sent(ops):
    zone = ZoneFactory(name="Downtown", priority_level=3, search_radius_km=4.0)

    r = ops.patch(f"/v2/zones/{zone.pk}", {"priorityLevel": 1, "searchRadiusKm": None}, format="json")

    assert r.status_code == 200, r.content
    zone.refresh_from_db()
    assert (zone.priority_level, zone.search_radius_km, zone.name) == (1, None, "Downtown")
    assert r.json()["properties"]["priorityLevel"] == 1


def test_editing_or_reading_an_unknown_zone_is_a_404(ops):
    missing = uuid.uuid4()
    assert_error(ops.patch(f"/v2/zones/{missing}", {"priorityLevel": 1}, format="json"), 404)
    assert_error(ops.get(f"/v2/zones/{missing}"), 404)
    assert_error(ops.get(f"/v2/zones/{missing}/health"), 404)


def test_a_zone_name_already_in_use_is_a_conflict(ops):
    ZoneFactory(name="Downtown")

    assert_error(ops.post("/v2/zones", {"name": "Downtown", "geometry": SQUARE}, format="json"), 409)
    other = ZoneFactory(name="Uptown", bbox=(30.7, 10.9, 30.8, 11.0))
    assert_error(ops.patch(f"/v2/zones/{other.pk}", {"name": "Downtown"}, format="json"), 409)
    assert DeliveryZone.objects.count() == 2


def test_a_zone_name_differing_only_in_case_is_a_conflict(ops):
    """"Downtown" beside "DOWNTOWN" was two zones no picker could tell apart."""
    ZoneFactory(name="Downtown")
    other = ZoneFactory(name="Uptown", bbox=(30.7, 10.9, 30.8, 11.0))

    body = assert_error(ops.post("/v2/zones", {"name": "DOWNTOWN", "geometry": SQUARE}, format="json"), 409)
    assert "already exists" in body["message"]
    assert_error(ops.patch(f"/v2/zones/{other.pk}", {"name": "downtown"}, format="json"), 409)
    r = ops.patch(f"/v2/zones/{other.pk}", {"name": "UPTOWN"}, format="json")  # its own name, recased
    assert r.status_code == 200, r.content
    assert sorted(DeliveryZone.objects.values_list("name", flat=True)) == ["Downtown", "UPTOWN"]


@pytest.mark.parametrize(
    "patch,field",
    [
        ({"priorityLevel": 0}, "priorityLevel"),
        ({"priorityLevel": 6}, "priorityLevel"),
        ({"offerExpiresSeconds": 9}, "offerExpiresSeconds"),
        ({"offerExpiresSeconds": 121}, "offerExpiresSeconds"),
        ({"searchRadiusKm": 0}, "searchRadiusKm"),
        ({"searchRadiusKm": -2}, "searchRadiusKm"),
        ({"minDriversOnline": -1}, "minDriversOnline"),
        ({"targetWaitTimeSeconds": 0}, "targetWaitTimeSeconds"),
        ({"name": ""}, "name"),
        ({"dispatchPolicy": "nearest"}, "dispatchPolicy"),
        ({"offerBatchSize": 1}, "offerBatchSize"),
        ({"offerBatchSize": 21}, "offerBatchSize"),
        ({"broadcastMaxDrivers": 0}, "broadcastMaxDrivers"),
        ({"matchingWindowSeconds": 61}, "matchingWindowSeconds"),
        ({"matchingWindowSeconds": -1}, "matchingWindowSeconds"),
        ({"stackingEnabled": "yes"}, "stackingEnabled"),
        ({"stackingMaxDetourMinutes": 0}, "stackingMaxDetourMinutes"),
    ],
)
def test_out_of_range_zone_settings_are_a_400_naming_the_field(ops, patch, field):
    body = assert_error(ops.post("/v2/zones", {"name": "Downtown", "geometry": SQUARE, **patch}, format="json"), 400)
    assert field in body["details"]
    assert not DeliveryZone.objects.exists()


def test_a_zone_dispatch_policy_is_set_with_patch_and_cleared_back_to_the_default(ops, settings):
    settings.DISPATCH_POLICY, settings.DISPATCH_BATCH_SIZE = "sequential", 3
    zone = ZoneFactory()

    r = ops.patch(
        f"/v2/zones/{zone.pk}",
        {"dispatchPolicy": "batch", "offerBatchSize": 4, "matchingWindowSeconds": 0, "stackingEnabled": True},
        format="json",
    )

    assert r.status_code == 200, r.content
    props = r.json()["properties"]
    assert props["dispatchPolicy"] == "batch" and props["offerBatchSize"] == 4 and props["stackingEnabled"] is True
    zone.refresh_from_db()
    policy = zone_policy(zone)
    assert (policy.policy, policy.batch_size, policy.matching_window_seconds, policy.stacking) == ("batch", 4, 0, True)

    ops.patch(f"/v2/zones/{zone.pk}", {"dispatchPolicy": "", "offerBatchSize": None}, format="json")
    zone.refresh_from_db()
    assert (zone_policy(zone).policy, zone_policy(zone).batch_size) == ("sequential", 3)
    assert zone_policy(None).policy == "sequential"


BOWTIE = [[30.5, 10.9], [30.6, 11.0], [30.6, 10.9], [30.5, 11.0], [30.5, 10.9]]

INVALID_GEOMETRIES = {
    "self-intersecting": ({"type": "Polygon", "coordinates": [BOWTIE]}, "self-intersection"),
    "not closed": ({"type": "Polygon", "coordinates": [RING[:-1] + [[30.49, 10.95]]]}, "not closed"),
    "too few positions": ({"type": "Polygon", "coordinates": [[[30.5, 10.9], [30.6, 10.9], [30.5, 10.9]]]}, "at least 4"),
    "empty": ({"type": "Polygon", "coordinates": []}, "empty"),
    "empty ring": ({"type": "Polygon", "coordinates": [[]]}, "at least 4"),
    "wrong srid (crs)": (
        {**SQUARE, "crs": {"type": "name", "properties": {"name": "EPSG:3857"}}}, "WGS84",
    ),
    "wrong srid (metres)": (
        {"type": "Polygon", "coordinates": [[[8627000, 1450000], [8638000, 1450000], [8638000, 1461000], [8627000, 1450000]]]},
        "WGS84",
    ),
    "a point": ({"type": "Point", "coordinates": [30.55, 10.95]}, "Polygon"),
    "a multipolygon": ({"type": "MultiPolygon", "coordinates": [[RING]]}, "Polygon"),
    "WKT text": ("POLYGON((30.5 10.9, 30.6 10.9, 30.6 11, 30.5 10.9))", "GeoJSON Polygon"),
    "non-numeric position": ({"type": "Polygon", "coordinates": [[["a", 1], [1, 2], [2, 2], ["a", 1]]]}, "finite numbers"),
    "hole outside the shell": (
        {"type": "Polygon", "coordinates": [RING, [[31.0, 12.0], [31.1, 12.0], [31.1, 12.1], [31.0, 12.0]]]}, "not valid",
    ),
    "duplicate points only": ({"type": "Polygon", "coordinates": [[[30.5, 10.9]] * 4]}, "not valid"),
    # One zone with an edge of exactly 180° of longitude made every order's intake a 500.
    "the whole world (antipodal edges)": (
        {"type": "Polygon", "coordinates": [[[-180, -90], [180, -90], [180, 90], [-180, 90], [-180, -90]]]}, "180°",
    ),
    "an edge the globe runs the other way round": (
        {"type": "Polygon", "coordinates": [[[-179, -80], [179, -80], [179, 80], [-179, 80], [-179, -80]]]}, "180°",
    ),
}


@pytest.mark.parametrize("geometry,expected", INVALID_GEOMETRIES.values(), ids=INVALID_GEOMETRIES.keys())
def test_a_broken_boundary_is_a_clear_400_and_nothing_is_stored(ops, geometry, expected):
    body = assert_error(ops.post("/v2/zones", {"name": "Broken", "geometry": geometry}, format="json"), 400)

    assert "geometry" in body["details"]
    assert expected.lower() in " ".join(body["details"]["geometry"]).lower(), body
    assert not DeliveryZone.objects.exists()


def test_a_broken_boundary_in_an_edit_is_a_400_and_the_old_boundary_stays(ops):
    zone = ZoneFactory(name="Downtown")

    body = assert_error(
        ops.patch(f"/v2/zones/{zone.pk}", {"geometry": {"type": "Polygon", "coordinates": [BOWTIE]}}, format="json"), 400
    )

    assert "self-intersection" in body["details"]["geometry"][0].lower()
    zone.refresh_from_db()
    assert zone.geometry.equals(box(30.50, 10.90, 30.60, 11.00))


@pytest.mark.parametrize(
    "geometry,message",
    [
        (Polygon([(30.5, 10.9), (30.6, 11.0), (30.6, 10.9), (30.5, 11.0), (30.5, 10.9)], srid=4326), "not valid"),
        (Polygon.from_bbox((3395000, 1210000, 3405000, 1220000)), "WGS84"),
        (Polygon([(3395000, 1210000), (3405000, 1210000), (3405000, 1220000), (3395000, 1210000)], srid=3857), "SRID 3857"),
        (Point(30.55, 10.95, srid=4326), "Polygon"),
        (Polygon(srid=4326), "empty"),
    ],
    ids=["self-intersecting", "metres without srid", "srid 3857", "a point", "empty"],
)
def test_the_zone_service_refuses_broken_geometry_too(geometry, message):
    with pytest.raises(ValidationError) as err:
        zone_create(name="Broken", geometry=geometry)

    assert message.lower() in " ".join(err.value.message_dict["geometry"]).lower()
    assert not DeliveryZone.objects.exists()


def test_the_database_refuses_an_invalid_polygon_written_behind_the_services_back():
    bowtie = Polygon([(30.5, 10.9), (30.6, 11.0), (30.6, 10.9), (30.5, 11.0), (30.5, 10.9)], srid=4326)

    with pytest.raises(IntegrityError, match="zone_geometry_valid"), transaction.atomic():
        DeliveryZone.objects.create(name="Sneaky", geometry=bowtie)


# ---------------------------------------------------------------- zone preferences


@pytest.fixture
def homed_driver(db):
    """A driver who lives 0.5° of latitude north of the zones' centre (about 55 km)."""
    return DriverFactory(home_location=Point(30.55, 11.45, srid=4326))


def put_prefs(client, driver, items):
    return client.put(f"/v2/drivers/{driver.pk}/zone-preferences", items, format="json")


def test_a_driver_sets_its_zone_preferences_with_distances_from_home(homed_driver):
    near = ZoneFactory(name="Near", bbox=(30.50, 10.90, 30.60, 11.00))
    far = ZoneFactory(name="Far", bbox=(30.50, 9.90, 30.60, 10.00))
    me = client_for(homed_driver.user)

    r = put_prefs(me, homed_driver, [
        {"zoneId": str(near.pk), "preference": "PREFERRED"},
        {"zoneId": str(far.pk), "preference": "UNAVAILABLE"},
    ])

    assert r.status_code == 200, r.content
    body = r.json()
    assert body["driverId"] == str(homed_driver.pk)
    by_zone = {p["zoneId"]: p for p in body["preferences"]}
    assert by_zone[str(near.pk)]["preference"] == "PREFERRED"
    assert by_zone[str(far.pk)]["preference"] == "UNAVAILABLE"
    assert by_zone[str(near.pk)]["zoneName"] == "Near"
    # centroid of Near is (10.95, 30.55), of Far (9.95, 30.55): 0.5° and 1.5° of latitude south
    for zone, lat in ((near, 10.95), (far, 9.95)):
        expected = haversine_km(11.45, 30.55, lat, 30.55)
        # PostGIS measures on the spheroid, haversine on a sphere: within 1 %
        assert by_zone[str(zone.pk)]["distanceToZoneCenter"] == pytest.approx(expected, rel=0.01)
    assert me.get(f"/v2/drivers/{homed_driver.pk}/zone-preferences").json() == body


def test_a_driver_without_a_home_gets_no_distance(driver, driver_client):
    zone = ZoneFactory(name="Downtown")

    body = put_prefs(driver_client, driver, [{"zoneId": str(zone.pk), "preference": "AVAILABLE"}]).json()

    assert body["preferences"][0]["distanceToZoneCenter"] is None


def test_putting_preferences_replaces_the_whole_set(driver, driver_client):
    a, b = ZoneFactory(name="A"), ZoneFactory(name="B", bbox=(30.7, 10.9, 30.8, 11.0))
    put_prefs(driver_client, driver, [
        {"zoneId": str(a.pk), "preference": "PREFERRED"}, {"zoneId": str(b.pk), "preference": "PREFERRED"},
    ])
    kept_id = DriverZonePreference.objects.get(driver=driver, zone=b).pk

    r = put_prefs(driver_client, driver, [{"zoneId": str(b.pk), "preference": "UNAVAILABLE"}])

    assert r.status_code == 200, r.content
    rows = list(DriverZonePreference.objects.filter(driver=driver))
    assert [(row.zone_id, row.preference, row.pk) for row in rows] == [(b.pk, "UNAVAILABLE", kept_id)]

    cleared = put_prefs(driver_client, driver, [])
    assert cleared.status_code == 200 and cleared.json()["preferences"] == []
    assert not DriverZonePreference.objects.filter(driver=driver).exists()


def test_an_unknown_zone_is_a_400_naming_it_and_changes_nothing(driver, driver_client):
    zone = ZoneFactory(name="Downtown")
    put_prefs(driver_client, driver, [{"zoneId": str(zone.pk), "preference": "PREFERRED"}])
    missing = uuid.uuid4()

    body = assert_error(put_prefs(driver_client, driver, [
        {"zoneId": str(zone.pk), "preference": "UNAVAILABLE"}, {"zoneId": str(missing), "preference": "AVAILABLE"},
    ]), 400)

    assert str(missing) in body["message"]
    assert str(missing) in body["details"]["zoneId"][0]
    assert DriverZonePreference.objects.get(driver=driver).preference == "PREFERRED"


def test_a_zone_listed_twice_is_a_400(driver, driver_client):
    zone = ZoneFactory(name="Downtown")

    body = assert_error(put_prefs(driver_client, driver, [
        {"zoneId": str(zone.pk), "preference": "PREFERRED"}, {"zoneId": str(zone.pk), "preference": "UNAVAILABLE"},
    ]), 400)

    assert "more than once" in body["message"] and str(zone.pk) in body["message"]
    assert not DriverZonePreference.objects.exists()


@pytest.mark.parametrize(
    "payload",
    [
        [{"zoneId": "{zone}", "preference": "MAYBE"}],
        [{"zoneId": "{zone}", "preference": "preferred"}],
        [{"zoneId": "{zone}"}],
        [{"zoneId": "not-a-uuid", "preference": "PREFERRED"}],
        [{"preference": "PREFERRED"}],
        {"zoneId": "{zone}", "preference": "PREFERRED"},
        ["{zone}"],
        None,
    ],
    ids=["unknown value", "lower case", "no preference", "bad uuid", "no zone", "an object, not a list", "ids only", "null"],
)
def test_malformed_preferences_are_a_400(driver, driver_client, payload):
    zone = ZoneFactory(name="Downtown")
    payload = json.loads(json.dumps(payload).replace("{zone}", str(zone.pk)))

    body = assert_error(put_prefs(driver_client, driver, payload), 400)

    assert "preferences" in body["details"]
    assert not DriverZonePreference.objects.exists()


def test_ops_set_any_drivers_preferences_but_another_driver_gets_a_404_and_an_integration_a_403(ops, driver, driver_client):
    zone = ZoneFactory(name="Downtown")
    other = DriverFactory()
    items = [{"zoneId": str(zone.pk), "preference": "UNAVAILABLE"}]

    assert_error(put_prefs(driver_client, other, items), 404)
    assert_error(driver_client.get(f"/v2/drivers/{other.pk}/zone-preferences"), 404)
    assert_error(put_prefs(client_for(IntegrationUserFactory()), other, items), 403)
    assert not DriverZonePreference.objects.filter(driver=other).exists()

    assert put_prefs(ops, other, items).status_code == 200
    assert zone_preferences_for(zone_id=zone.pk, driver_ids=[other.pk, driver.pk]) == {str(other.pk): "UNAVAILABLE"}
    assert_error(put_prefs(ops, Driver(pk=uuid.uuid4()), items), 404)


def test_moving_a_zone_updates_the_drivers_distances(ops, homed_driver):
    zone = ZoneFactory(name="Downtown", bbox=(30.50, 10.90, 30.60, 11.00))
    zone_preferences_set(driver_id=homed_driver.pk, preferences=[(zone.pk, "PREFERRED")])

    moved = {"type": "Polygon", "coordinates": [[[30.5, 11.4], [30.6, 11.4], [30.6, 11.5], [30.5, 11.5], [30.5, 11.4]]]}
    assert ops.patch(f"/v2/zones/{zone.pk}", {"geometry": moved}, format="json").status_code == 200

    row = DriverZonePreference.objects.get(driver=homed_driver)
    assert float(row.distance_to_zone_center) == pytest.approx(0.0, abs=0.01)  # the home is the new centre


def test_refreshing_distances_after_a_driver_moves_house(homed_driver):
    zone = ZoneFactory(name="Downtown", bbox=(30.50, 10.90, 30.60, 11.00))
    zone_preferences_set(driver_id=homed_driver.pk, preferences=[(zone.pk, "AVAILABLE")])
    Driver.objects.filter(pk=homed_driver.pk).update(home_location=Point(30.55, 10.95, srid=4326))

    changed = zone_preferences_refresh_distances(driver_id=homed_driver.pk)

    assert changed == 1
    assert float(DriverZonePreference.objects.get(driver=homed_driver).distance_to_zone_center) == 0.0
    Driver.objects.filter(pk=homed_driver.pk).update(home_location=None)
    zone_preferences_refresh_distances(zone_id=zone.pk)
    assert DriverZonePreference.objects.get(driver=homed_driver).distance_to_zone_center is None


def test_zone_preferences_for_answers_only_for_the_drivers_asked(driver):
    zone = ZoneFactory(name="Downtown")
    other_zone = ZoneFactory(name="Uptown", bbox=(30.7, 10.9, 30.8, 11.0))
    a, b = DriverFactory(), DriverFactory()
    zone_preferences_set(driver_id=a.pk, preferences=[(zone.pk, "PREFERRED")])
    zone_preferences_set(driver_id=b.pk, preferences=[(zone.pk, "UNAVAILABLE"), (other_zone.pk, "PREFERRED")])
    zone_preferences_set(driver_id=driver.pk, preferences=[(other_zone.pk, "UNAVAILABLE")])

    prefs = zone_preferences_for(zone_id=zone.pk, driver_ids=[str(a.pk), str(b.pk), str(driver.pk)])

    assert prefs == {str(a.pk): "PREFERRED", str(b.pk): "UNAVAILABLE"}
    assert zone_preferences_for(zone_id=zone.pk, driver_ids=[]) == {}


def test_zone_update_with_an_unchanged_boundary_leaves_distances_alone(homed_driver):
    zone = ZoneFactory(name="Downtown")
    zone_preferences_set(driver_id=homed_driver.pk, preferences=[(zone.pk, "AVAILABLE")])
    DriverZonePreference.objects.update(distance_to_zone_center=None)

    zone_update(zone_id=zone.pk, priority_level=1, geometry=box(30.50, 10.90, 30.60, 11.00))

    assert DriverZonePreference.objects.get().distance_to_zone_center is None


@pytest.mark.parametrize(
    "name,value,error",
    [
        ("DISPATCH_POLICY", "batched-matching", "zones.E001"),
        ("DISPATCH_BATCH_SIZE", 1, "zones.E002"),
        ("DISPATCH_BROADCAST_MAX", 500, "zones.E002"),
        ("DISPATCH_MATCHING_WINDOW_SECONDS", 61, "zones.E002"),
        ("STACKING_MAX_DETOUR_MINUTES", 0, "zones.E002"),
        ("VEHICLE_CAPACITY", {"car": 0, "default": 1}, "zones.E003"),
    ],
)
def test_global_dispatch_policy_settings_out_of_range_fail_the_system_check(settings, name, value, error):
    assert check_dispatch_policy_settings() == []
    setattr(settings, name, value)
    assert [e.id for e in check_dispatch_policy_settings()] == [error]


def test_a_zone_comes_back_with_the_coordinates_it_was_given_and_survives_a_round_trip(ops):
    """GDAL's GeoJSON rounded to 15 significant digits: a valid square whose corners differ by
    1e-15° came back as five equal points, which the API then refused as input."""
    e = 2e-15
    ring = [[10.0, 10.0], [10.0 + e, 10.0], [10.0 + e, 10.0 + e], [10.0, 10.0 + e], [10.0, 10.0]]
    precise = [[30.123456789012345, 10.9], [30.6, 10.9], [30.6, 11.0], [30.123456789012345, 11.0], [30.123456789012345, 10.9]]

    for name, coordinates in (("Tiny", ring), ("Precise", precise)):
        created = ops.post("/v2/zones", {"name": name, "geometry": {"type": "Polygon", "coordinates": [coordinates]}},
                           format="json")
        assert created.status_code == 201, created.content
        zone_id = created.json()["id"]
        geometry = ops.get(f"/v2/zones/{zone_id}").json()["geometry"]

        assert geometry == {"type": "Polygon", "coordinates": [coordinates]}
        assert ops.patch(f"/v2/zones/{zone_id}", {"geometry": geometry}, format="json").status_code == 200
