import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Group
from django.contrib.gis.geos import Point
from django.utils import timezone
from rest_framework.authtoken.models import Token

from common.roles import INTEGRATIONS_GROUP, SUPPORT_GROUP
from dispatch.models import Delivery, Driver

CITY = (12.9716, 77.5946)


def point(lat=CITY[0], lon=CITY[1]):
    return Point(lon, lat, srid=4326)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"user{n}")
    password = factory.django.Password("pw-123456")

    @factory.post_generation
    def token(obj, create, extracted, **kwargs):
        if create:
            Token.objects.get_or_create(user=obj)


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
    from availability.geo import index_driver

    driver = DriverFactory(location=km_north(km), **kwargs)
    index_driver(
        driver_id=driver.pk, availability=driver.availability, lat=driver.location.y, lon=driver.location.x,
        recorded_at=driver.location_recorded_at,
    )
    return driver
