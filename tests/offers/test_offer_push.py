"""An offer's push reaches the driver's phone once, even when its task was never queued.

The push is a Celery task queued after commit; a publish that fails (the broker down, or the
Redis breaker open after a hang) used to lose it, and the driver heard of the offer only if its
socket was up. The offer row is the outbox: the push claims it (`notification_sent_at`), and a
sweep every 5 s queues the pushes of pending offers nobody claimed.
"""
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import time_machine

from common.redis import breaker, redis_address
from config.celery import app as celery_app
from offers import events, services, tasks
from offers.models import DriverOffer
from tests.api import client_for
from tests.common.test_redis_breaker import open_breaker
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
            open_breaker(redis_address(celery_app.conf.broker_url))
        with capture(execute=True):
            r = ops.post(f"/v2/deliveries/{delivery.pk}/offers", {"driverId": str(driver.pk), **body}, format="json")
        breaker.reset()
    assert r.status_code == 201, r.content
    return DriverOffer.objects.get(pk=r.json()["offerId"])


def sweep_at(seconds: float, capture) -> int:
    with time_machine.travel(T0 + timedelta(seconds=seconds), tick=False), capture(execute=True):
        return tasks.push_unsent_offers.apply().get()


def test_a_push_whose_task_was_never_queued_is_sent_by_the_sweep_once(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=True)
    assert SENT == [] and offer.notification_sent_at is None

    assert sweep_at(4.9, capture) == 0  # its task may only be late
    assert SENT == []
    assert sweep_at(5, capture) == 1
    assert SENT == [(str(offer.driver_id), events.offer_created(offer))]
    offer.refresh_from_db()
    assert offer.notification_sent_at == T0 + timedelta(seconds=5) and offer.notification_method == "both"

    assert sweep_at(10, capture) == 0
    assert len(SENT) == 1


def test_the_sweep_leaves_an_offer_with_too_little_time_left_to_answer(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    make_offer(ops, delivery, capture, lost=True, expiresInSeconds=10)

    assert sweep_at(7.5, capture) == 0  # 2.5 s left
    assert SENT == []
    assert sweep_at(6.5, capture) == 1  # 3.5 s left
    assert len(SENT) == 1


def test_a_push_that_ran_late_or_twice_is_sent_once(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=False)
    assert len(SENT) == 1

    with time_machine.travel(T0 + timedelta(seconds=6), tick=False):
        assert tasks.push_offer.apply(args=(str(offer.pk), str(offer.driver_id), SENT[0][1])).get() is False
    assert sweep_at(6, capture) == 0
    assert len(SENT) == 1


def test_an_offer_answered_while_its_push_waited_is_not_pushed(ops, delivery, django_capture_on_commit_callbacks):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=True)
    me = client_for(offer.driver.user)
    with time_machine.travel(T0 + timedelta(seconds=2), tick=False), capture(execute=True):
        r = me.post(f"/v2/drivers/{offer.driver_id}/offers/{offer.pk}/reject", {"reason": "too_far"}, format="json")
    assert r.status_code == 200, r.content

    with time_machine.travel(T0 + timedelta(seconds=3), tick=False):
        assert tasks.push_offer.apply(args=(str(offer.pk), str(offer.driver_id), events.offer_created(offer))).get() is False
    assert sweep_at(6, capture) == 0
    assert SENT == []


def test_a_gateway_failure_keeps_the_claim_for_the_retries(ops, delivery, django_capture_on_commit_callbacks, settings):
    capture = django_capture_on_commit_callbacks
    offer = make_offer(ops, delivery, capture, lost=True)
    event = events.offer_created(offer)
    settings.PUSH_BACKEND = f"{__name__}.FailingPush"
    with time_machine.travel(T0 + timedelta(seconds=1), tick=False), pytest.raises(ConnectionError):
        services.offer_push(offer_id=offer.pk, driver_id=offer.driver_id, event=event)
    offer.refresh_from_db()
    assert offer.notification_sent_at == T0 + timedelta(seconds=1) and offer.notification_method == "websocket"

    settings.PUSH_BACKEND = "tests.fakes.RecordingPush"
    assert sweep_at(6, capture) == 0  # the task's retries have it
    with time_machine.travel(T0 + timedelta(seconds=7), tick=False):
        assert services.offer_push(offer_id=offer.pk, driver_id=offer.driver_id, event=event, retrying=True) is True
    offer.refresh_from_db()
    assert offer.notification_method == "both" and len(SENT) == 1


def test_the_tasks_retry_sends_what_its_first_run_claimed(ops, delivery, django_capture_on_commit_callbacks, settings):
    """Eager Celery does not run retries: the retry is run by hand as the worker would."""
    capture = django_capture_on_commit_callbacks
    FlakyPush.calls = 0
    settings.PUSH_BACKEND = f"{__name__}.FlakyPush"
    offer = make_offer(ops, delivery, capture, lost=False)  # the first run fails: the task retries
    assert FlakyPush.calls == 1 and SENT == []
    args = (str(offer.pk), str(offer.driver_id), events.offer_created(offer))

    with time_machine.travel(T0 + timedelta(seconds=2), tick=False):
        assert tasks.push_offer.apply(args=args).get() is False  # a copy: claimed already
        assert tasks.push_offer.apply(args=args, retries=1).get() is True
    assert FlakyPush.calls == 2 and len(SENT) == 1
    offer.refresh_from_db()
    assert offer.notification_method == "both"
