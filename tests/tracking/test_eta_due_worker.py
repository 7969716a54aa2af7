"""The ETA refresh after status changes on a real `celery worker` (tests/common/test_celery_worker.py):
a burst of changes sends one kick, which the worker on the `eta` queue runs
`ETA_REFRESH_BATCH_SECONDS` later (3 s here: the burst's commits take milliseconds), refreshing
the delivery once, as of the run."""
import re
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from common.actors import Actor
from common.redis import get_redis
from dispatch.models import Delivery
from tests.common.test_celery_worker import sending_to_workers, worker_on  # noqa: F401 (fixture)
from tests.factories import DeliveryFactory, DriverFactory, km_north
from tracking.services import ETA_DUE_KEY, ETA_REFRESH_DUE_TASK
from workflows.deliveries import assignment_create, delivery_advance

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def eta_queue_worker(transactional_db, tmp_path, sending_to_workers):  # noqa: F811
    """A real worker on the `eta` queue."""
    with worker_on("eta", tmp_path / "worker.log") as worker:
        yield worker


def test_a_burst_of_status_changes_is_one_refresh_on_a_real_worker(eta_queue_worker, settings):
    settings.ETA_REFRESH_BATCH_SECONDS = 3  # the four commits below come well within it
    now = timezone.now()
    driver = DriverFactory(location=km_north(-2.0), location_recorded_at=now, location_accuracy_m=8)
    delivery = DeliveryFactory(prep_time_minutes=0, ready_at=now - timedelta(minutes=10), dropoff_location=km_north(3.0))
    actor = Actor("driver", driver.pk)
    assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started"):
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=actor)
    last_change = timezone.now()

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and get_redis().exists(ETA_DUE_KEY):
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "succeeded" not in eta_queue_worker.log():
        time.sleep(0.1)
    log = eta_queue_worker.log()
    assert log.count(f"Task {ETA_REFRESH_DUE_TASK}[") == 2, log  # received and succeeded: one run
    assert re.search(r"succeeded in [0-9.]+s: 1\b", log), log  # it refreshed one delivery
    refreshed = Delivery.objects.get(pk=delivery.pk)
    assert refreshed.status == "in_transit"
    # refreshed as of the run: after the last change, by about the countdown
    assert refreshed.eta_calculated_at is not None and refreshed.eta_calculated_at >= last_change
