"""The webhook sweep on a real `celery worker` that takes the `webhooks` queue alone (its own
worker, docs/notifications.md): a seller's commit kicks it there, and it signs and sends the
event to a real receiver. A worker on the other queues leaves the kick alone."""
import time

import pytest

from notifications.outbox import DELIVER_TASK
from tests.api import client_for
from tests.common.test_celery_worker import sending_to_workers, worker_on  # noqa: F401 (fixture)
from tests.factories import CITY, IntegrationUserFactory
from tests.notifications.webhook_helpers import endpoint_via_api

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

NEW = {"sellerOrderId": "ORD-WORKER-1", "storeName": "Corner Shop", "autoDispatch": False,
       "pickupLocation": {"lat": CITY[0], "lon": CITY[1]}, "dropoffLocation": {"lat": CITY[0] + 0.01, "lon": CITY[1]}}


def _create(merchant) -> str:
    created = client_for(merchant).post("/v2/deliveries", NEW, format="json")
    assert created.status_code == 201, created.content
    return created.json()["id"]


def _wait_for(receiver, count: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(receiver.requests) < count:
        time.sleep(0.05)


def test_a_commits_kick_goes_to_the_webhooks_worker_which_sends_the_event(
        receiver, transactional_db, tmp_path, sending_to_workers):  # noqa: F811
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)

    with worker_on("timers,celery,eta", tmp_path / "general.log") as general:
        delivery_id = _create(merchant)
        _wait_for(receiver, 1, 3)
        assert receiver.requests == []  # (the general worker does not take the kick)
        assert f"Task {DELIVER_TASK}[" not in general.log()

    with worker_on("webhooks", tmp_path / "webhooks.log") as worker:
        _wait_for(receiver, 1, 30)  # the kick queued above
        payload = receiver.requests[0].verified(secret)
        assert payload["type"] == "delivery.created" and payload["data"]["id"] == delivery_id
        assert f"Task {DELIVER_TASK}[" in worker.log()
