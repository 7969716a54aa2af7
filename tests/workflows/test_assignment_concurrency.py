"""Both assignment invariants under real concurrent transactions (STYLE rule 3 and 10)."""
import pytest
from django.db import IntegrityError, transaction

from common.actors import Actor
from common.exceptions import Conflict
from dispatch.models import Assignment
from workflows.deliveries import assignment_create
from tests.concurrency import race
from tests.factories import DeliveryFactory, DriverFactory

pytestmark = pytest.mark.django_db(transaction=True)


def test_two_drivers_racing_for_one_delivery_one_wins():
    delivery = DeliveryFactory()
    drivers = DriverFactory.create_batch(4)

    results, errors = race(
        [lambda d=d: assignment_create(delivery_id=delivery.pk, driver_id=d.pk, actor=Actor.system()) for d in drivers]
    )

    assert len(results) == 1
    assert len(errors) == 3 and all(isinstance(e, Conflict) for e in errors)
    assert Assignment.objects.filter(delivery=delivery, status="active").count() == 1
    winner = results[0].driver_id
    busy = {d.pk for d in drivers if d.__class__.objects.get(pk=d.pk).availability == "busy"}
    assert busy == {winner}


def test_two_deliveries_racing_for_one_driver_one_wins():
    driver = DriverFactory()
    deliveries = DeliveryFactory.create_batch(4)

    results, errors = race(
        [lambda d=d: assignment_create(delivery_id=d.pk, driver_id=driver.pk, actor=Actor.system()) for d in deliveries]
    )

    assert len(results) == 1
    assert all(isinstance(e, Conflict) for e in errors) and len(errors) == 3
    assert Assignment.objects.filter(driver=driver, status="active").count() == 1
    assigned = [d for d in deliveries if d.__class__.objects.get(pk=d.pk).status == "assigned"]
    assert [d.pk for d in assigned] == [results[0].delivery_id]


def test_the_database_itself_refuses_a_second_active_assignment():
    """One active assignment per delivery; per driver at most its vehicle's capacity (walking:
    1, so a second is refused by the database itself, whatever the code above it does)."""
    delivery = DeliveryFactory()
    a, b = DriverFactory.create_batch(2, vehicle_type="walking")
    Assignment.objects.create(delivery=delivery, driver=a)

    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(delivery=delivery, driver=b)
    with pytest.raises(IntegrityError), transaction.atomic():
        Assignment.objects.create(delivery=DeliveryFactory(), driver=a)
    # ended assignments do not count
    Assignment.objects.filter(delivery=delivery).update(status="completed")
    Assignment.objects.create(delivery=delivery, driver=b)
