from datetime import timedelta

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.gis.geos import Point, Polygon
from django.utils import timezone

from common.roles import INTEGRATIONS_GROUP, SUPPORT_GROUP
from tests.api import token_for
from availability import live
from availability.geo import index_driver
from availability.models import Driver
from availability.services import driver_location_update
from dispatch.models import Delivery
from offers.models import DriverOffer
from zones.models import DeliveryZone

CITY = (12.9716, 77.5946)
# A zone far from the demo city, which other tests crowd with drivers and deliveries, so that
# foreign rows cannot fall in it: (lon min, lat min, lon max, lat max).
ZONE_BBOX = (30.50, 10.90, 30.60, 11.00)


def point(lat=CITY[0], lon=CITY[1]):
    return Point(lon, lat, srid=4326)


def box(xmin, ymin, xmax, ymax):
    """The rectangle (lon xmin..xmax, lat ymin..ymax) as a WGS84 polygon."""
    polygon = Polygon.from_bbox((xmin, ymin, xmax, ymax))
    polygon.srid = 4326
    return polygon


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw-123456")

    @factory.post_generation
    def token(obj, create, extracted, **kwargs):
        # Every login a factory makes has an API token (tests.api.token_for reads it), made
        # here, in sync code, so that async tests can use it without a database call.
        if create:
            token_for(obj)


class OpsUserFactory(UserFactory):
    username = factory.Sequence(lambda n: f"ops{n}")
    is_staff = True


def _add_group(name):
    def add(obj, create, extracted, **kwargs):
        if create:
            obj.groups.add(Group.objects.get_or_create(name=name)[0])

    return add


class IntegrationUserFactory(UserFactory):
    username = factory.Sequence(lambda n: f"integration{n}")
    group = factory.PostGeneration(_add_group(INTEGRATIONS_GROUP))


class SupportUserFactory(UserFactory):
    username = factory.Sequence(lambda n: f"agent{n}")
    group = factory.PostGeneration(_add_group(SUPPORT_GROUP))


class DriverFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Driver

    user = factory.SubFactory(UserFactory, username=factory.Sequence(lambda n: f"driver{n}"))
    name = factory.Faker("name")
    phone = factory.Sequence(lambda n: f"+1555{n:07d}")
    vehicle = "Honda Civic, Blue"
    availability = "available"
    location = factory.LazyFunction(point)
    location_accuracy_m = 10.0
    location_recorded_at = factory.LazyFunction(timezone.now)


class DeliveryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Delivery

    seller_order_id = factory.Sequence(lambda n: f"ORD-{n:06d}")
    created_by = factory.SubFactory(IntegrationUserFactory)
    store_name = "Downtown Market"
    pickup_location = factory.LazyFunction(point)
    dropoff_location = factory.LazyFunction(lambda: point(CITY[0] + 0.02, CITY[1] + 0.01))
    customer_name = "Jane Customer"
    customer_phone = "+15550001234"
    prep_time_minutes = 5
    ready_at = factory.LazyFunction(timezone.now)


def km_north(km, lat=CITY[0], lon=CITY[1]):
    """A point `km` kilometres north of (lat, lon)."""
    return point(lat + km / 111.195, lon)


def online_driver(km=0.5, **kwargs):
    """An available driver with a fresh fix `km` north of the city centre, in the GEO index."""
    driver = DriverFactory(location=km_north(km), **kwargs)
    index_driver(
        driver_id=driver.pk, availability=driver.availability, lat=driver.location.y, lon=driver.location.x,
        recorded_at=driver.location_recorded_at,
    )
    return driver


def driver_at_dropoff(driver, delivery, *, at=None, metres_off: float = 0.0):
    """Record a fix of `driver` at `delivery`'s drop-off (`metres_off` north of it) through the
    location service (the stored fix; the live position after commit), so that
    delivery-completed passes the drop-off geofence (DROPOFF_GEOFENCE_METERS, docs/dispatch.md
    "Geofence"). Call it just before completing; it sends nothing to the customer's tracking.
    The fix is taken at `at`, default now — or just after the driver's latest known fix when
    that is later (a test that travelled back in time after the factory gave the driver a fix
    "now"). `driver` and `delivery`: rows or ids. Returns the fix's time."""
    if not isinstance(delivery, Delivery):
        delivery = Delivery.objects.get(pk=delivery)
    driver_id = getattr(driver, "pk", driver)
    recorded_at = at
    if recorded_at is None:
        known = [Driver.objects.filter(pk=driver_id).values_list("location_recorded_at", flat=True).first()]
        known += [p.recorded_at for p in live.positions_of([driver_id]).values()]
        recorded_at = max([timezone.now()] + [t + timedelta(milliseconds=1) for t in known if t is not None])
    lat, lon = delivery.dropoff_location.y + metres_off / 111_195.0, delivery.dropoff_location.x
    result = driver_location_update(driver_id=driver_id, lat=lat, lon=lon, recorded_at=recorded_at, accuracy_m=5.0)
    assert result.accepted, f"driver {driver_id} has a fix newer than {recorded_at}"
    if isinstance(driver, Driver):
        driver.location, driver.location_recorded_at = point(lat, lon), recorded_at
    return recorded_at


class ZoneFactory(factory.django.DjangoModelFactory):
    """A delivery zone written straight to the table (the zone services validate what callers
    draw; tests that check that call them). `bbox=(lon min, lat min, lon max, lat max)` draws
    a rectangle; pass `geometry=` for any other polygon."""

    class Meta:
        model = DeliveryZone

    class Params:
        bbox = ZONE_BBOX

    name = factory.Sequence(lambda n: f"Zone {n}")
    geometry = factory.LazyAttribute(lambda o: box(*o.bbox))


def offer_payload_for(delivery) -> dict:
    """An offer payload of the seed's shape (offers.events.OfferPayload) for `delivery`."""
    return {
        "pickupLocation": {"lat": delivery.pickup_location.y, "lon": delivery.pickup_location.x},
        "pickupStoreName": delivery.store_name,
        "estimatedPickupTimeMin": 5,
        "estimatedDeliveryTime": (timezone.now() + timedelta(minutes=25)).isoformat().replace("+00:00", "Z"),
        "estimatedDistanceKm": 3.0,
        "estimatedEarning": 6.5,
    }


class OfferFactory(factory.django.DjangoModelFactory):
    """A PENDING offer written straight to the table: no dispatch, no locks, no events. For
    constraint and race tests; an offer made the way dispatch makes it comes from the services.
    `expires_in` (seconds, default 30) sets `expires_at` after `created_at`."""

    class Meta:
        model = DriverOffer

    class Params:
        expires_in = 30

    delivery = factory.SubFactory(DeliveryFactory)
    driver = factory.SubFactory(DriverFactory)
    status = "PENDING"
    offer_payload = factory.LazyAttribute(lambda o: offer_payload_for(o.delivery))
    created_at = factory.LazyFunction(timezone.now)
    expires_at = factory.LazyAttribute(lambda o: o.created_at + timedelta(seconds=o.expires_in))
