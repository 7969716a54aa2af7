"""In-process setup and teardown for tracking_fanout.py: drivers and deliveries through the
workflows (Django set up in this process), and the clean-up of an interrupted run."""
from __future__ import annotations

import logging
import math
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")


class Pair:
    def __init__(self, n: int, driver_id: str, driver_token: str, lat: float, lon: float):
        self.n, self.driver_id, self.driver_token, self.lat, self.lon = n, driver_id, driver_token, lat, lon
        self.delivery_id = ""
        self.store: float | None = None  # (--movement route) the store's latitude, and the driver's pace in m/s
        self.pace = 0.0
        self.tracking_token = ""
        self.path = f"/v2/drivers/{driver_id}/location"
        self.headers = {"Authorization": f"Token {driver_token}", "Content-Type": "application/json"}

    def auth(self) -> dict:
        return {"Authorization": f"Token {self.driver_token}"}


# ------------------------------------------------------------------- setup in-process (orm)


def orm_setup(count: int, centre: tuple[float, float], rng: random.Random, run_id: str, ops_username: str,
              parallel: int) -> list[Pair]:
    """Drivers and deliveries through the workflows, delivery i assigned to driver i by ops."""
    from concurrent.futures import ThreadPoolExecutor
    from datetime import timedelta

    from django.contrib.auth import get_user_model
    from django.contrib.gis.geos import Point
    from django.db import connection
    from django.utils import timezone as dj_tz

    from availability.services import driver_create
    from common.actors import Actor
    from dispatch.services import DeliveryInput
    from workflows.deliveries import assignment_create, delivery_create
    from workflows.drivers import availability_resume, driver_location_record

    # In this process Celery's tasks are not registered: the ETA refresh each assignment
    # enqueues is skipped with a logged warning (the consumer refreshes ETAs on fixes anyway).
    logging.getLogger("common.broadcast").setLevel(logging.ERROR)
    ops = get_user_model().objects.get(username=ops_username)
    ops_actor = Actor("admin", ops.pk)
    spots = [(centre[0] + rng.uniform(-0.03, 0.03), centre[1] + rng.uniform(-0.03, 0.03)) for _ in range(count)]

    def one(n: int) -> Pair:
        lat, lon = spots[n]
        driver, token = driver_create(name=f"Track Bench {run_id} {n}", phone=f"+1 555 {n:07d}", vehicle="Bench scooter",
                                      vehicle_type="scooter")
        driver_location_record(driver_id=driver.pk, lat=lat, lon=lon, recorded_at=dj_tz.now() - timedelta(seconds=5),
                               accuracy_m=10)
        availability_resume(driver_id=driver.pk, actor=Actor("driver", driver.pk))
        delivery = delivery_create(data=DeliveryInput(
            seller_order_id=f"TRACK-BENCH-{run_id}-{n}", store_name="Bench store",
            pickup_location=Point(lon, lat + 0.005, srid=4326), dropoff_location=Point(lon + 0.01, lat + 0.02, srid=4326),
        ), created_by=ops, actor=ops_actor)
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=ops_actor)
        pair = Pair(n, str(driver.pk), token, lat, lon)
        pair.delivery_id = str(delivery.pk)
        pair.tracking_token = delivery.tracking_token
        return pair

    def chunk(indices: range) -> list[Pair]:
        try:
            return [one(n) for n in indices]
        finally:
            connection.close()

    size = math.ceil(count / parallel)
    with ThreadPoolExecutor(parallel) as pool:
        parts = list(pool.map(chunk, [range(k, min(count, k + size)) for k in range(0, count, size)]))
    return [p for part in parts for p in part]


def orm_teardown(pairs: list[Pair], ops_username: str, parallel: int) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from django.contrib.auth import get_user_model
    from django.db import connection

    from common.actors import Actor
    from workflows.deliveries import delivery_cancel
    from workflows.drivers import availability_end_shift

    ops = get_user_model().objects.get(username=ops_username)

    def chunk(part: list[Pair]) -> int:
        failed = 0
        try:
            for p in part:
                try:
                    delivery_cancel(delivery_id=p.delivery_id, reason="tracking bench finished", actor=Actor("admin", ops.pk))
                    availability_end_shift(driver_id=p.driver_id, actor=Actor("driver", p.driver_id))
                except Exception:  # noqa: BLE001 - counted
                    failed += 1
            return failed
        finally:
            connection.close()

    size = max(1, math.ceil(len(pairs) / parallel))
    with ThreadPoolExecutor(parallel) as pool:
        return sum(pool.map(chunk, [pairs[k:k + size] for k in range(0, len(pairs), size)]))


def etas_stored(pairs: list[Pair]) -> int:
    """How many of the pairs' deliveries have an ETA stored (the stream consumer has refreshed
    it after their driver's fix)."""
    from django.db import connection

    from dispatch.models import Delivery

    try:
        return Delivery.objects.filter(pk__in=[p.delivery_id for p in pairs], eta_calculated_at__isnull=False).count()
    finally:
        connection.close()


# ------------------------------------------------------------------------- the bench


def cleanup_run(run_id: str, ops_username: str, parallel: int) -> int:
    """A run that was interrupted: cancel its deliveries still open, end its drivers' shift."""
    import django

    django.setup()
    from availability.models import Driver
    from dispatch.models import Delivery

    logging.getLogger("common.broadcast").setLevel(logging.ERROR)
    prefix = f"TRACK-BENCH-{run_id}-"
    pairs = []
    for n, (delivery_id, driver_id) in enumerate(
        Delivery.objects.filter(seller_order_id__startswith=prefix).exclude(status__in=("cancelled", "delivered", "failed"))
        .values_list("pk", "assignments__driver_id")
    ):
        pair = Pair(n, str(driver_id) if driver_id else "", "", 0, 0)
        pair.delivery_id = str(delivery_id)
        pairs.append(pair)
    failed = orm_teardown(pairs, ops_username, parallel)
    from common.actors import Actor
    from workflows.drivers import availability_end_shift

    left = Driver.objects.filter(name__startswith=f"Track Bench {run_id} ").exclude(availability="shift_ended")
    ended = 0
    for driver_id in left.values_list("pk", flat=True):
        try:
            availability_end_shift(driver_id=driver_id, actor=Actor("driver", driver_id))
            ended += 1
        except Exception:  # noqa: BLE001 - reported below
            pass
    print(f"run {run_id}: {len(pairs)} open deliveries cancelled ({failed} failed), {ended} more drivers' shift ended")
    return 0


