"""An offer's push reaches the driver's phone once, even when its task's publish failed.

The push is a Celery task queued after commit; a publish that failed (the broker down, or the
Redis breaker open after a hang) used to lose it, and the driver heard of the offer only if its
socket was up. Now the publish is kept and published again (common.deferred), and the push
claims its offer (`notification_sent_at`), so a second copy, or a push of an offer answered or
expired meanwhile, sends nothing.
"""
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine
from celery.exceptions import Retry

from common.deferred import deferred_tasks_republish
from common.models import DeferredTask
from common.redis import breaker
from offers import events, services, tasks
from offers.models import DriverOffer
from tests.api import client_for
from tests.common.test_deferred_tasks import broker_hung
from tests.factories import online_driver
from tests.fakes import SENT

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 2, 1, 10, 0, tzinfo=dt_timezone.utc)


@pytest.fixture(autouse=True)
def recording_push(settings):
    SENT.clear()
    settings.PUSH_BACKEND = "tests.fakes.RecordingPush"
    return SENT


class FailingPush:
    """A gateway that cannot take the message (the task retries)."""

    def send_offer(self, *, driver_id, event):
        raise ConnectionError("gateway unreachable")


class FlakyPush:
    """Fails the first send, takes the next ones."""

    calls = 0

    def send_offer(self, *, driver_id, event):
        FlakyPush.calls += 1
        if FlakyPush.calls == 1:
            raise ConnectionError("gateway unreachable")
        SENT.append((driver_id, event))
        return True


def make_offer(ops, delivery, capture, *, lost: bool, **body) -> DriverOffer:
    """An offer made by ops at T0; `lost`: its after-commit publishes fail (the breaker is open
    for the broker's Redis, as after a hang)."""
    driver = online_driver()
    with time_machine.travel(T0, tick=False):
        if lost:
            broker_hung()
        with capture(execute=True):
            r = ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": str(driver.pk), **body}, format="json")
        breaker.reset()
    assert r.status_code == 201, r.content
    return DriverOffer.objects.get(pk=r.json()["offerId"])


def republish_at(seconds: float, capture) -> int:
    with time_machine.travel(T0 + timedelta(seconds=seconds), tick=False), capture(execute=True):
        return deferred_tasks_republish()


def push_copy(offer, at: float, **kwargs):
    with time_machine.travel(T0 + timedelta(seconds=at), tick=False):
        return tasks.push_offer.apply(args=(str(offer.pk), str(offer.driver_id), events.offer_created(offer)), **kwargs).get()


def test_a_push_whose_publish_failed_is_kept_and_sent_once(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=True)
    assert SENT == [] and offer.notification_sent_at is None
    kept = DeferredTask.objects.get(task=services.PUSH_TASK)
    assert kept.expires_at == offer.expires_at  # worth sending while the driver can answer

    assert republish_at(10, capture) == 1
    assert SENT == [(str(offer.driver_id), events.offer_created(offer))]
    offer.refresh_from_db()
    assert offer.notification_sent_at == T0 + timedelta(seconds=10) and offer.notification_method == "both"
    assert push_copy(offer, 11) is False  # the first publish reached the broker after all: one push
    assert len(SENT) == 1 and not DeferredTask.objects.exists()


def test_a_kept_push_of_an_offer_past_its_time_is_dropped(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    make_offer(ops, delivery, capture, lost=True, expiresInSeconds=10)

    assert republish_at(10, capture) == 0
    assert SENT == [] and not DeferredTask.objects.exists()


def test_an_offer_answered_while_its_push_waited_is_not_pushed(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=True)
    me = client_for(offer.driver.user)
    with time_machine.travel(T0 + timedelta(seconds=2), tick=False), capture(execute=True):
        r = me.post(f"/v2/drivers/{offer.driver_id}/offers/{offer.pk}/reject", {"reason": "too_far"}, format="json")
    assert r.status_code == 200, r.content

    assert republish_at(10, capture) == 1  # published; the push finds nothing to send
    assert SENT == []
    offer.refresh_from_db()
    assert offer.notification_sent_at is None


def test_a_push_that_ran_twice_is_sent_once(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=False)
    assert len(SENT) == 1 and not DeferredTask.objects.exists()

    assert push_copy(offer, 6) is False
    assert len(SENT) == 1


def test_a_gateway_failure_keeps_the_claim_for_the_retries_only(ops, delivery, django_capture_on_commit_callbacks, settings):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=True)
    event = events.offer_created(offer)
    settings.PUSH_BACKEND = f"{__name__}.FailingPush"
    with time_machine.travel(T0 + timedelta(seconds=1), tick=False), pytest.raises(services.PushFailed) as failed:
        services.offer_push(offer_id=offer.pk, driver_id=offer.driver_id, event=event)
    claimed_at = failed.value.claimed_at
    offer.refresh_from_db()
    assert offer.notification_sent_at == claimed_at == T0 + timedelta(seconds=1)
    assert offer.notification_method == "websocket"

    settings.PUSH_BACKEND = "tests.fakes.RecordingPush"
    with time_machine.travel(T0 + timedelta(seconds=7), tick=False):
        assert services.offer_push(offer_id=offer.pk, driver_id=offer.driver_id, event=event) is False  # a copy
        stale = claimed_at - timedelta(seconds=1)
        assert services.offer_push(offer_id=offer.pk, driver_id=offer.driver_id, event=event, claimed_at=stale) is False
        assert services.offer_push(offer_id=offer.pk, driver_id=offer.driver_id, event=event, claimed_at=claimed_at) is True
    offer.refresh_from_db()
    assert offer.notification_method == "both" and len(SENT) == 1


def test_the_tasks_retry_carries_the_claim_its_first_run_made(ops, delivery, django_capture_on_commit_callbacks, settings):
    """Eager Celery raises the retry instead of running it: it is run by hand as the worker would."""
    FlakyPush.calls = 0
    settings.PUSH_BACKEND = f"{__name__}.FlakyPush"
    offer = make_offer(ops, delivery, django_capture_on_commit_callbacks, lost=True)

    with time_machine.travel(T0 + timedelta(seconds=1), tick=False), pytest.raises(Retry) as retry:
        tasks.push_offer.apply(args=(str(offer.pk), str(offer.driver_id), events.offer_created(offer))).get()
    assert FlakyPush.calls == 1 and SENT == []
    claimed_at = retry.value.sig.kwargs["claimed_at"]
    offer.refresh_from_db()
    assert offer.notification_sent_at.isoformat() == claimed_at

    assert push_copy(offer, 3, kwargs={"claimed_at": claimed_at}, retries=1) is True
    assert FlakyPush.calls == 2 and len(SENT) == 1


def test_a_push_redelivered_after_its_worker_died_takes_over_the_claim(ops, delivery, django_capture_on_commit_callbacks):
    offer = make_offer(ops, delivery, django_capture_on_commit_callbacks, lost=True)
    # what a worker killed while the push was out leaves (acks late: the task is redelivered)
    DriverOffer.objects.filter(pk=offer.pk).update(notification_sent_at=T0 + timedelta(seconds=1), notification_method="push")
    args = (str(offer.pk), str(offer.driver_id), events.offer_created(offer))
    assert push_copy(offer, 3) is False  # a copy that was not redelivered: claimed

    def redelivered_run():
        tasks.push_offer.push_request(delivery_info={"redelivered": True}, retries=0)
        try:
            with time_machine.travel(T0 + timedelta(seconds=3), tick=False):
                return tasks.push_offer.run(*args)
        finally:
            tasks.push_offer.pop_request()

    assert redelivered_run() is True
    offer.refresh_from_db()
    assert offer.notification_method == "both" and len(SENT) == 1
    assert redelivered_run() is False  # a push that went out is not sent again
    assert len(SENT) == 1
