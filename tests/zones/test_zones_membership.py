"""Which zone a point belongs to: deliveries get the highest-priority zone covering their pickup
(boundary included), drivers can be listed by the zone they are in."""
import pytest
from django.contrib.gis.geos import LinearRing, Point, Polygon
from django.core.management import call_command

from dispatch.models import Delivery
from tests.api import assert_error
from tests.factories import DriverFactory, ZoneFactory, box
from zones.demo import DEMO_ZONES
from zones.models import DeliveryZone
from zones.selectors import zone_for_point
from zones.services import zone_update

pytestmark = pytest.mark.django_db


def at(lon, lat):
    return Point(lon, lat, srid=4326)


# Far from the demo city other tests crowd with drivers, so foreign rows cannot fall in these zones.
DOWNTOWN = (30.50, 10.90, 30.60, 11.00)


def test_a_point_inside_a_zone_belongs_to_it():
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN)

    assert zone_for_point(at(30.55, 10.95)) == downtown


def test_a_point_outside_every_zone_has_no_zone():
    ZoneFactory(name="Downtown", bbox=DOWNTOWN)

    assert zone_for_point(at(30.65, 10.95)) is None
    assert zone_for_point(None) is None


@pytest.mark.parametrize(
    "lon,lat",
    [(30.55, 10.90), (30.60, 10.95), (30.50, 10.90), (30.60, 11.00)],
    ids=["south edge", "east edge", "south-west corner", "north-east corner"],
)
def test_a_point_on_the_boundary_counts_as_inside(lon, lat):
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN)

    assert zone_for_point(at(lon, lat)) == downtown


def test_a_point_just_beyond_the_boundary_is_outside():
    ZoneFactory(name="Downtown", bbox=DOWNTOWN)

    assert zone_for_point(at(30.55, 10.8999999)) is None
    assert zone_for_point(at(30.6000001, 10.95)) is None


def test_a_point_in_a_hole_of_the_zone_is_outside_it():
    shell = LinearRing((30.5, 10.9), (30.6, 10.9), (30.6, 11.0), (30.5, 11.0), (30.5, 10.9))
    hole = LinearRing((30.54, 10.94), (30.56, 10.94), (30.56, 10.96), (30.54, 10.96), (30.54, 10.94))
    ring_road = ZoneFactory(name="Ring road", geometry=Polygon(shell, hole))

    assert zone_for_point(at(30.55, 10.95)) is None
    assert zone_for_point(at(30.52, 10.92)) == ring_road


def test_where_zones_overlap_the_highest_priority_wins_even_if_it_is_larger():
    city = ZoneFactory(name="City", bbox=(30.0, 10.0, 31.0, 12.0), priority_level=1)
    ZoneFactory(name="Downtown", bbox=DOWNTOWN, priority_level=3)

    assert zone_for_point(at(30.55, 10.95)) == city


def test_overlapping_zones_of_equal_priority_resolve_to_the_smaller_one():
    ZoneFactory(name="City", bbox=(30.0, 10.0, 31.0, 12.0), priority_level=2)
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN, priority_level=2)

    assert zone_for_point(at(30.55, 10.95)) == downtown


def test_identical_overlapping_zones_resolve_by_id_every_time():
    a = ZoneFactory(name="North", bbox=DOWNTOWN, priority_level=2)
    b = ZoneFactory(name="North (copy)", bbox=DOWNTOWN, priority_level=2)

    winners = {zone_for_point(at(30.55, 10.95)) for _ in range(5)}

    assert winners == {min((a, b), key=lambda z: z.pk)}


def test_on_a_shared_border_the_higher_priority_zone_wins():
    ZoneFactory(name="West", bbox=(30.40, 10.90, 30.50, 11.00), priority_level=3)
    east = ZoneFactory(name="East", bbox=DOWNTOWN, priority_level=2)

    assert zone_for_point(at(30.50, 10.95)) == east


# ----------------------------------------------------------------------- deliveries


def _new_delivery(integration, order_id, lat, lon):
    return integration.post(
        "/v2/deliveries",
        {
            "sellerOrderId": order_id, "storeName": "Corner Store", "autoDispatch": False,
            "pickupLocation": {"lat": lat, "lon": lon}, "dropoffLocation": {"lat": 10.97, "lon": 30.59},
        },
        format="json",
    )


def test_creating_a_delivery_sets_its_zone_from_the_pickup_point(integration):
    ZoneFactory(name="City", bbox=(30.0, 10.0, 31.0, 12.0), priority_level=5)
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN, priority_level=1)

    r = _new_delivery(integration, "Z-1", 10.95, 30.55)

    assert r.status_code == 201, r.content
    assert r.json()["zoneId"] == str(downtown.pk)
    assert Delivery.objects.get(pk=r.json()["id"]).zone == downtown


def test_a_delivery_picked_up_outside_every_zone_is_created_without_a_zone_when_zones_are_not_required(integration, settings):
    settings.SERVICEABILITY_REQUIRE_ZONE = False  # else a 400 (tests/dispatch/test_serviceability_and_quotes.py)
    settings.MAX_DELIVERY_DISTANCE_KM = 100  # the helper's drop-off is 75 km away
    ZoneFactory(name="Downtown", bbox=DOWNTOWN)

    r = _new_delivery(integration, "Z-2", 10.50, 30.10)

    assert r.status_code == 201, r.content
    assert r.json()["zoneId"] is None


def test_moving_a_zone_boundary_does_not_move_existing_deliveries(integration, settings):
    settings.SERVICEABILITY_REQUIRE_ZONE = False  # the second pickup is outside every zone
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN)
    first = _new_delivery(integration, "Z-3", 10.95, 30.55).json()

    zone_update(zone_id=downtown.pk, geometry=box(30.0, 10.0, 30.1, 10.1))
    second = _new_delivery(integration, "Z-4", 10.95, 30.55).json()

    assert first["zoneId"] == str(downtown.pk)
    assert second["zoneId"] is None


def test_deleting_a_zone_keeps_its_deliveries_without_a_zone(integration):
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN)
    body = _new_delivery(integration, "Z-5", 10.95, 30.55).json()

    downtown.delete()

    assert Delivery.objects.get(pk=body["id"]).zone_id is None


# --------------------------------------------------------------------------- drivers


def test_drivers_can_be_listed_by_the_zone_they_are_in(ops):
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN)
    inside = DriverFactory(location=at(30.55, 10.95))
    on_edge = DriverFactory(location=at(30.60, 10.95), availability="busy")
    DriverFactory(location=at(30.70, 10.95))  # outside
    DriverFactory(location=None, location_recorded_at=None)  # never sent a fix

    r = ops.get(f"/v2/drivers?zone={downtown.pk}")

    assert r.status_code == 200, r.content
    assert {d["id"] for d in r.json()["drivers"]} == {str(inside.pk), str(on_edge.pk)}


def test_the_zone_filter_combines_with_the_availability_filter(ops):
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN)
    DriverFactory(location=at(30.55, 10.95), availability="available")
    busy = DriverFactory(location=at(30.56, 10.95), availability="busy")
    DriverFactory(location=at(30.70, 10.95), availability="busy")

    r = ops.get(f"/v2/drivers?zone={downtown.pk}&availability=busy")

    assert [d["id"] for d in r.json()["drivers"]] == [str(busy.pk)]


def test_filtering_drivers_by_an_unknown_zone_is_a_404(ops):
    body = assert_error(ops.get("/v2/drivers?zone=00000000-0000-0000-0000-000000000000"), 404)
    assert "Zone" in body["message"]


def test_filtering_drivers_by_a_malformed_zone_id_is_a_400(ops):
    body = assert_error(ops.get("/v2/drivers?zone=downtown"), 400)
    assert "zone" in body["details"]


# ------------------------------------------------------------------------ demo data


def test_demo_data_has_bengaluru_zones_and_its_deliveries_get_one():
    call_command("seed_demo")
    call_command("seed_demo")

    assert sorted(DeliveryZone.objects.filter(name__in=DEMO_ZONES).values_list("name", flat=True)) == sorted(DEMO_ZONES)
    demo = Delivery.objects.filter(seller_order_id__startswith="DEMO-", created_by__username="marketplace")
    assert demo.count() == 4 and not demo.filter(zone__isnull=True).exists()
    # the catch-all city zone is under every neighbourhood
    assert zone_for_point(at(77.5946, 12.9716)).name == "Central Business District"
    assert zone_for_point(at(77.70, 13.05)).name == "Greater Bengaluru"
    assert not DeliveryZone.objects.filter(name__in=DEMO_ZONES, health_score__isnull=True).exists()


def test_the_zone_lookup_of_intake_sees_every_zone_edit_at_once(integration, settings):
    """Intake's zone lookup is compiled once per connection (common.hotsql), but the zones are
    read by the statement on every create: an edit, a new zone, a priority change and a
    deletion each decide the very next create on the same connection."""
    settings.SERVICEABILITY_REQUIRE_ZONE = True
    settings.MAX_DELIVERY_DISTANCE_KM = 100
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN, priority_level=3)
    assert _new_delivery(integration, "E-1", 10.95, 30.55).json()["zoneId"] == str(downtown.pk)

    zone_update(zone_id=downtown.pk, geometry=box(30.0, 10.0, 30.1, 10.1))  # moved away
    moved = _new_delivery(integration, "E-2", 10.95, 30.55)
    assert_error(moved, 400)
    assert list(moved.json()["details"]) == ["pickupLocation"]  # outside every zone while zones exist

    city = ZoneFactory(name="City", bbox=(30.0, 10.0, 31.0, 12.0), priority_level=4)  # drawn
    assert _new_delivery(integration, "E-3", 10.95, 30.55).json()["zoneId"] == str(city.pk)
    zone_update(zone_id=downtown.pk, geometry=box(*DOWNTOWN))  # back, now the better zone
    assert _new_delivery(integration, "E-4", 10.95, 30.55).json()["zoneId"] == str(downtown.pk)
    zone_update(zone_id=city.pk, priority_level=1)  # reprioritised
    assert _new_delivery(integration, "E-5", 10.95, 30.55).json()["zoneId"] == str(city.pk)

    city.delete()
    assert _new_delivery(integration, "E-6", 10.95, 30.55).json()["zoneId"] == str(downtown.pk)
    downtown.delete()  # no zone left: a pickup anywhere is taken, without a zone
    last = _new_delivery(integration, "E-7", 10.95, 30.55)
    assert last.status_code == 201, last.content
    assert last.json()["zoneId"] is None


def test_zones_stored_with_an_edge_round_the_globe_are_mended_by_the_migration():
    """zones 0007: a zone stored before such edges were refused (here written behind the
    services' back) broke every zone query; cut into short edges it covers what was drawn,
    and the queries run again. A zone without such an edge is left as it was."""
    from importlib import import_module

    from django.db import connection, transaction

    from zones.selectors import zone_for_point_and_any

    segmentize = import_module("zones.migrations.0007_segmentize_zones_with_edges_round_the_globe").SEGMENTIZE
    downtown = ZoneFactory(name="Downtown", bbox=DOWNTOWN, priority_level=1)
    world = DeliveryZone.objects.create(
        name="World", priority_level=5, geometry=Polygon.from_bbox((-180, -90, 180, 90)),
    )
    with pytest.raises(Exception, match="Antipodal"), transaction.atomic():
        zone_for_point_and_any(at(30.55, 10.95))
    before = downtown.geometry

    with connection.cursor() as cursor:
        cursor.execute(segmentize)

    world.refresh_from_db()
    downtown.refresh_from_db()
    assert world.geometry.num_coords > 5 and world.geometry.extent == (-180, -90, 180, 90)
    assert downtown.geometry.equals_exact(before)
    assert zone_for_point_and_any(at(30.55, 10.95)) == (downtown, True)  # priority 1 first
    assert zone_for_point_and_any(at(-170, 0)) == (world, True)
    assert zone_for_point_and_any(at(0, 70)) == (world, True)
