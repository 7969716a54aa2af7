"""Order stacking under real concurrent transactions: however many deliveries are assigned to
one driver at once, it never carries more than its vehicle's capacity (STYLE rule 3)."""
import pytest
from django.db import IntegrityError

from availability.models import Driver
from common.actors import Actor
from common.exceptions import Conflict
from dispatch.models import Assignment
from workflows.deliveries import assignment_create
from tests.concurrency import race
from tests.factories import CITY, DeliveryFactory, ZoneFactory, km_north, online_driver

pytestmark = pytest.mark.django_db(transaction=True)

CITY_BBOX = (CITY[1] - 0.2, CITY[0] - 0.2, CITY[1] + 0.2, CITY[0] + 0.2)


def same_store_orders(zone, n):
    return [
        DeliveryFactory(zone=zone, pickup_location=km_north(0), dropoff_location=km_north(2.0), prep_time_minutes=0)
        for _ in range(n)
    ]


@pytest.mark.parametrize("vehicle_type,capacity", [("bicycle", 2), ("car", 3)])
def test_deliveries_assigned_at_once_to_a_driver_one_below_capacity_only_one_wins(vehicle_type, capacity):
    zone = ZoneFactory(bbox=CITY_BBOX, stacking_enabled=True)
    driver = online_driver(km=0.02, vehicle_type=vehicle_type)
    for d in same_store_orders(zone, capacity - 1):
        assignment_create(delivery_id=d.pk, driver_id=driver.pk, actor=Actor.system())
    racing = same_store_orders(zone, 5)

    results, errors = race(
        [lambda d=d: assignment_create(delivery_id=d.pk, driver_id=driver.pk, actor=Actor.system()) for d in racing]
    )

    assert len(results) == 1, errors
    assert len(errors) == 4 and all(isinstance(e, Conflict) for e in errors), errors
    row = Driver.objects.get(pk=driver.pk)
    assert (row.active_assignments, row.capacity, row.availability) == (capacity, capacity, "busy")
    assert Assignment.objects.filter(driver=driver, status="active").count() == capacity


def test_the_database_alone_keeps_the_capacity_when_writers_skip_every_check():
    """Bare INSERTs from many threads, no row lock taken first: the trigger's count under its
    CHECK lets exactly `capacity` through."""
    driver = online_driver(km=0.02, vehicle_type="bicycle")
    deliveries = [DeliveryFactory() for _ in range(6)]

    results, errors = race([lambda d=d: Assignment.objects.create(delivery=d, driver=driver) for d in deliveries])

    assert len(results) == 2
    assert len(errors) == 4 and all(isinstance(e, IntegrityError) for e in errors), errors
    assert Driver.objects.get(pk=driver.pk).active_assignments == 2
    assert Assignment.objects.filter(driver=driver, status="active").count() == 2
