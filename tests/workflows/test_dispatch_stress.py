"""Many flows at once over a few drivers, with real threads and transactions: nothing but
clean conflicts (no deadlock, no 500), and the invariants hold afterwards."""
import random
import threading
import uuid

import pytest
from django.contrib.gis.geos import Point
from django.db import connection

from workflows import drivers as availability
from common.actors import Actor
from common.exceptions import Conflict, NotFound
from dispatch.models import Assignment, Delivery
from dispatch.services import DeliveryInput
from workflows.deliveries import delivery_advance, delivery_create
from workflows import offers
from offers.models import DriverOffer
from tests.factories import CITY, IntegrationUserFactory, driver_at_dropoff, online_driver

pytestmark = pytest.mark.django_db(transaction=True)

STEPS = ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed")


def test_mixed_concurrent_flows_never_deadlock_and_keep_the_invariants():
    drivers = [online_driver(km=0.2 + 0.15 * i) for i in range(4)]
    owner = IntegrationUserFactory()
    failures, lock = [], threading.Lock()

    def flow(seed):
        rng = random.Random(seed)
        try:
            for _ in range(6):
                delivery = delivery_create(
                    data=DeliveryInput(
                        seller_order_id=f"S-{uuid.uuid4().hex[:10]}", store_name="Store",
                        pickup_location=Point(CITY[1], CITY[0], srid=4326),
                        dropoff_location=Point(CITY[1] + 0.01, CITY[0] + 0.01, srid=4326),
                    ),
                    created_by=owner, actor=Actor.system(), auto_dispatch=True,
                )
                offer = DriverOffer.objects.filter(delivery=delivery, status="PENDING").first()
                if offer is None:
                    continue
                action = rng.choice(["accept", "accept", "reject", "expire", "break"])
                try:
                    if action == "accept":
                        offers.offer_accept(offer_id=offer.pk, driver_id=offer.driver_id, actor=Actor.system())
                        for step in STEPS:
                            if step == "delivery-completed":
                                driver_at_dropoff(offer.driver_id, delivery)
                            delivery_advance(delivery_id=delivery.pk, driver_id=offer.driver_id, step=step, actor=Actor.system())
                    elif action == "reject":
                        offers.offer_reject(offer_id=offer.pk, driver_id=offer.driver_id, reason="other", actor=Actor.system())
                    elif action == "expire":
                        offers.offer_expire(offer_id=offer.pk, force=True)
                    else:
                        availability.availability_take_break(driver_id=offer.driver_id, duration_minutes=1, reason="", actor=Actor.system())
                        availability.availability_resume(driver_id=offer.driver_id, actor=Actor.system())
                except (Conflict, NotFound):
                    pass  # lost a race cleanly: exactly what may happen
        except Exception as exc:  # anything else (a deadlock, an IntegrityError) fails the test
            with lock:
                failures.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=flow, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)

    assert failures == []
    for driver in drivers:
        assert DriverOffer.objects.filter(driver=driver, status="PENDING").count() <= 1
        assert Assignment.objects.filter(driver=driver, status="active").count() <= 1
    for delivery in Delivery.objects.all():
        assert DriverOffer.objects.filter(delivery=delivery, status="PENDING").count() <= 1
        assert DriverOffer.objects.filter(delivery=delivery, status="ACCEPTED").count() <= 1
