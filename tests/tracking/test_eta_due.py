"""The ETA refresh after a status change (`workflows.unit.eta_refresh_enqueue`): the delivery
is marked due in Redis and one `tracking.refresh_due_etas` kick is queued per burst
(`common.broadcast.enqueue_due_on_commit`), not one Celery message per change; the run takes
every delivery marked before it started, a mark after that kicks the next run, and with Redis
down each change enqueues its own `tracking.refresh_eta` as before. (With Celery eager, as in
the rest of the suite, the kick runs at commit: tests/tracking/test_eta.py sees the events.)"""
import logging
from unittest.mock import patch
from datetime import datetime, timedelta, timezone as dt_timezone

import pytest
import redis
import time_machine
from celery.app.task import Task
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction

from common import broadcast
from common.actors import Actor
from common.broadcast import done_due, enqueue_due_on_commit, kick_key, taken_key, take_due
from common.redis import get_redis
from tracking.services import ETA_DUE_KEY, ETA_REFRESH_DUE_TASK, ETA_REFRESH_TASK
import tracking.tasks
from tracking.tasks import refresh_due_etas
from workflows.deliveries import assignment_create, delivery_advance
from tests.factories import DeliveryFactory, DriverFactory, km_north

pytestmark = pytest.mark.django_db(transaction=True)

T0 = datetime(2026, 2, 1, 9, 45, tzinfo=dt_timezone.utc)
STEPS = ("pickup-started", "pickup-completed", "delivery-started")


class Published(list):
    countdowns: list

    def clear(self):
        super().clear()
        self.countdowns.clear()


@pytest.fixture
def published(monkeypatch):
    """The ETA tasks published to the broker, (name, args), in order (no task runs)."""
    sent = Published()

    def publish(self, args=None, **kwargs):
        if self.name in (ETA_REFRESH_DUE_TASK, ETA_REFRESH_TASK):
            sent.append((self.name, tuple(args or ())))
            countdowns.append(kwargs.get("countdown"))

    countdowns = []

    monkeypatch.setattr(Task, "apply_async", publish)
    sent.countdowns = countdowns
    return sent


def assigned_delivery(published=None):
    """A delivery assigned to a driver 2 km south of its store (the assignment's own ETA
    refresh is taken and its kick forgotten, so each test starts with nothing due)."""
    with time_machine.travel(T0, tick=False):
        driver = DriverFactory(location=km_north(-2.0), location_recorded_at=T0 - timedelta(seconds=1), location_accuracy_m=8)
        delivery = DeliveryFactory(prep_time_minutes=0, ready_at=T0 - timedelta(minutes=10), dropoff_location=km_north(3.0))
        assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    get_redis().delete(ETA_DUE_KEY, kick_key(ETA_REFRESH_DUE_TASK))
    if published is not None:
        published.clear()
    return delivery, driver


def advance(delivery, driver, step, minutes):
    with time_machine.travel(T0 + timedelta(minutes=minutes), tick=False):
        delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor("driver", driver.pk))


def test_status_changes_while_a_run_is_queued_queue_nothing_more_and_the_run_refreshes_them(published, listen):
    delivery, driver = assigned_delivery(published)
    customer = listen(f"delivery.{delivery.pk}")
    for minutes, step in enumerate(STEPS, start=1):
        advance(delivery, driver, step, minutes)

    assert published == [(ETA_REFRESH_DUE_TASK, ())]  # one kick for the burst, no message per change
    assert published.countdowns == [settings.ETA_REFRESH_BATCH_SECONDS]  # the changes of the next second ride on it
    # picked_up and in_transit are tracked: the delivery is due once, at its latest change's time
    assert get_redis().hgetall(ETA_DUE_KEY) == {str(delivery.pk): "2026-02-01T09:48:00Z"}

    with time_machine.travel(T0 + timedelta(minutes=3, seconds=1), tick=False):
        assert refresh_due_etas() == 1  # the worker runs the kick, a second after the last change
    assert get_redis().hgetall(ETA_DUE_KEY) == {}
    assert get_redis().hgetall(taken_key(ETA_DUE_KEY)) == {}  # done: nothing left leased
    assert not get_redis().exists(kick_key(ETA_REFRESH_DUE_TASK))
    (eta_event,) = [e for e in customer.drain() if e["type"] == "delivery_eta_updated"]
    assert eta_event["deliveryId"] == str(delivery.pk)
    delivery.refresh_from_db()
    # as of the run, not of the change (a fix's ETA since the change must not make it a no-op)
    assert delivery.eta_calculated_at == datetime(2026, 2, 1, 9, 48, 1, tzinfo=dt_timezone.utc)


def test_one_run_refreshes_every_delivery_marked_before_it_started(published, listen):
    jobs = [assigned_delivery(published) for _ in range(3)]
    groups = listen(*(f"delivery.{d.pk}" for d, _ in jobs))
    for delivery, driver in jobs:
        advance(delivery, driver, "pickup-started", 1)
        advance(delivery, driver, "pickup-completed", 2)

    assert published == [(ETA_REFRESH_DUE_TASK, ())]
    assert refresh_due_etas() == 3
    announced = {e["deliveryId"] for e in groups.drain() if e["type"] == "delivery_eta_updated"}
    assert announced == {str(d.pk) for d, _ in jobs}


def test_a_run_that_started_lets_the_next_change_kick_again_and_takes_only_what_was_marked_before(published):
    (delivery, driver), (second, _) = assigned_delivery(), assigned_delivery(published)
    other = str(second.pk)
    advance(delivery, driver, "pickup-started", 1)
    advance(delivery, driver, "pickup-completed", 2)
    marks_at_the_take = []

    def start_then_change(name):
        broadcast.kick_started(name)
        # the kick is taken; a change committed now, before the take, is taken by this run
        with transaction.atomic():
            enqueue_due_on_commit(ETA_REFRESH_DUE_TASK, ETA_DUE_KEY, other, "2026-02-01T09:47:30Z",
                                  fallback=(ETA_REFRESH_TASK, (other, "2026-02-01T09:47:30Z")))
        marks_at_the_take.append(get_redis().hgetall(ETA_DUE_KEY))

    with patch.object(tracking.tasks, "kick_started", start_then_change):
        assert refresh_due_etas() == 2
    assert marks_at_the_take == [{str(delivery.pk): "2026-02-01T09:47:00Z", other: "2026-02-01T09:47:30Z"}]
    assert published == [(ETA_REFRESH_DUE_TASK, ()), (ETA_REFRESH_DUE_TASK, ())]  # the change kicked the next run
    assert get_redis().hgetall(ETA_DUE_KEY) == {}  # this run took both

    with transaction.atomic():
        enqueue_due_on_commit(ETA_REFRESH_DUE_TASK, ETA_DUE_KEY, other, "2026-02-01T09:49:00Z",
                              fallback=(ETA_REFRESH_TASK, (other, "2026-02-01T09:49:00Z")))
    assert take_due(ETA_DUE_KEY, "next", 60) == {other: "2026-02-01T09:49:00Z"}  # a mark after the take: the next run's


def test_a_rolled_back_change_marks_nothing(published):
    delivery, driver = assigned_delivery(published)
    with pytest.raises(RuntimeError), transaction.atomic():
        advance(delivery, driver, "pickup-started", 1)
        advance(delivery, driver, "pickup-completed", 2)
        raise RuntimeError("no")
    assert published == [] and get_redis().hgetall(ETA_DUE_KEY) == {}


def test_a_failed_kick_is_logged_frees_the_slot_and_the_sweep_takes_what_waits(monkeypatch, caplog, listen):
    delivery, driver = assigned_delivery()
    customer = listen(f"delivery.{delivery.pk}")

    def down(self, *args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(Task, "apply_async", down)
    advance(delivery, driver, "pickup-started", 1)
    with caplog.at_level(logging.WARNING, logger="common.broadcast"):
        advance(delivery, driver, "pickup-completed", 2)
    assert any(f"enqueue of {ETA_REFRESH_DUE_TASK} failed" in r.getMessage() for r in caplog.records)
    assert not get_redis().exists(kick_key(ETA_REFRESH_DUE_TASK))
    assert get_redis().hgetall(ETA_DUE_KEY) == {str(delivery.pk): "2026-02-01T09:47:00Z"}

    assert refresh_due_etas() == 1  # the 15 s sweep (config.periodic)
    assert [e["type"] for e in customer.drain() if e["type"] == "delivery_eta_updated"] == ["delivery_eta_updated"]


def test_with_redis_down_each_change_enqueues_its_own_refresh(published, monkeypatch):
    delivery, driver = assigned_delivery(published)

    class Down:
        def __getattr__(self, name):
            raise ConnectionError("redis down")

    monkeypatch.setattr(broadcast, "get_redis", lambda: Down())
    advance(delivery, driver, "pickup-started", 1)
    advance(delivery, driver, "pickup-completed", 2)
    advance(delivery, driver, "delivery-started", 3)
    assert published == [
        (ETA_REFRESH_TASK, (str(delivery.pk), "2026-02-01T09:47:00Z")),
        (ETA_REFRESH_TASK, (str(delivery.pk), "2026-02-01T09:48:00Z")),
    ]
    assert take_due(ETA_DUE_KEY, "run", 60) == {}  # Redis down for the take too: nothing, no error


def test_a_run_out_of_time_puts_back_what_it_did_not_do_and_keeps_newer_marks(published, monkeypatch):
    jobs = [assigned_delivery(published) for _ in range(3)]
    for delivery, driver in jobs:
        advance(delivery, driver, "pickup-started", 1)
        advance(delivery, driver, "pickup-completed", 2)
    done = []
    newer = {}

    def refresh(delivery_id, now):
        if len(done) == 1:  # the second delivery: a newer mark arrives, then the time is up
            newer[delivery_id] = "2026-02-01T09:59:00Z"
            get_redis().hset(ETA_DUE_KEY, delivery_id, newer[delivery_id])
            raise SoftTimeLimitExceeded()
        done.append(delivery_id)

    monkeypatch.setattr(tracking.tasks, "refresh_eta", refresh)
    assert refresh_due_etas() == 3
    (second,) = newer
    (third,) = {str(d.pk) for d, _ in jobs} - set(done) - {second}
    assert get_redis().hgetall(ETA_DUE_KEY) == {second: newer[second], third: "2026-02-01T09:47:00Z"}
    assert get_redis().hgetall(taken_key(ETA_DUE_KEY)) == {}  # the done one released, the others put back


def test_what_a_run_took_goes_back_when_its_worker_died_and_its_lease_ended(published, listen):
    (delivery, driver), (second, second_driver) = assigned_delivery(), assigned_delivery(published)
    customer = listen(f"delivery.{delivery.pk}", f"delivery.{second.pk}")
    advance(delivery, driver, "pickup-started", 1)
    advance(delivery, driver, "pickup-completed", 1)
    advance(second, second_driver, "pickup-started", 1)
    advance(second, second_driver, "pickup-completed", 2)
    # a run takes both and its worker dies before it is done: its lease ends (0 s here)
    assert take_due(ETA_DUE_KEY, "dead-run", 0) == {str(delivery.pk): "2026-02-01T09:46:00Z",
                                                   str(second.pk): "2026-02-01T09:47:00Z"}
    assert get_redis().hgetall(ETA_DUE_KEY) == {}
    # meanwhile the second delivery changes again: its newer mark wins over the dead run's
    get_redis().hset(ETA_DUE_KEY, str(second.pk), "2026-02-01T09:48:00Z")

    with time_machine.travel(T0 + timedelta(minutes=4), tick=False):
        assert refresh_due_etas() == 2  # the next run (a kick or the sweep) takes them back
    assert get_redis().hgetall(ETA_DUE_KEY) == {} and get_redis().hgetall(taken_key(ETA_DUE_KEY)) == {}
    announced = [e["deliveryId"] for e in customer.drain() if e["type"] == "delivery_eta_updated"]
    assert sorted(announced) == sorted([str(delivery.pk), str(second.pk)])


def test_what_a_live_run_took_is_not_taken_by_another_and_its_done_releases_only_its_own(published):
    (delivery, driver), (second, second_driver) = assigned_delivery(), assigned_delivery(published)
    for job in ((delivery, driver), (second, second_driver)):
        advance(*job, "pickup-started", 1)
        advance(*job, "pickup-completed", 2)
    taken = take_due(ETA_DUE_KEY, "slow-run", 60)  # still running, its lease a minute long
    assert set(taken) == {str(delivery.pk), str(second.pk)}

    assert refresh_due_etas() == 0  # another run (the sweep) leaves the live run's items alone
    get_redis().hset(ETA_DUE_KEY, str(second.pk), "2026-02-01T09:49:00Z")  # a newer change...
    assert take_due(ETA_DUE_KEY, "next-run", 60) == {str(second.pk): "2026-02-01T09:49:00Z"}  # ...is the next run's
    done_due(ETA_DUE_KEY, "slow-run", taken)
    # the slow run released its own; the second delivery is the next run's now, leased to it
    assert list(get_redis().hgetall(taken_key(ETA_DUE_KEY))) == [str(second.pk)]
    assert get_redis().hget(taken_key(ETA_DUE_KEY), str(second.pk)).endswith("|next-run|2026-02-01T09:49:00Z")


def test_the_kick_holds_its_slot_past_its_countdown(published, settings):
    settings.ETA_REFRESH_BATCH_SECONDS = 8
    delivery, driver = assigned_delivery(published)
    advance(delivery, driver, "pickup-started", 1)
    advance(delivery, driver, "pickup-completed", 2)
    assert broadcast.KICK_TTL_MS + 7000 < get_redis().pttl(kick_key(ETA_REFRESH_DUE_TASK)) <= broadcast.KICK_TTL_MS + 8000
    advance(delivery, driver, "delivery-started", 3)
    assert published == [(ETA_REFRESH_DUE_TASK, ())]


def test_a_redis_that_refuses_the_write_still_gets_each_change_refreshed(published, monkeypatch):
    delivery, driver = assigned_delivery(published)

    class ReadOnly:
        def pipeline(self, *args, **kwargs):
            raise redis.exceptions.ReadOnlyError("You can't write against a read only replica.")

    advance(delivery, driver, "pickup-started", 1)
    monkeypatch.setattr(broadcast, "get_redis", lambda: ReadOnly())
    advance(delivery, driver, "pickup-completed", 2)
    assert published == [(ETA_REFRESH_TASK, (str(delivery.pk), "2026-02-01T09:47:00Z"))]


def test_an_unreadable_mark_is_dropped_not_retried_forever(published, caplog):
    delivery, driver = assigned_delivery(published)
    advance(delivery, driver, "pickup-started", 1)
    advance(delivery, driver, "pickup-completed", 2)
    get_redis().hset(ETA_DUE_KEY, "junk", "not a time")
    with caplog.at_level(logging.WARNING, logger="tracking.tasks"):
        assert refresh_due_etas() == 2
    assert "unreadable change time" in caplog.text
    assert get_redis().hgetall(ETA_DUE_KEY) == {} and get_redis().hgetall(taken_key(ETA_DUE_KEY)) == {}


def test_a_run_redelivered_after_its_worker_died_takes_its_own_items_back_at_once(published):
    delivery, driver = assigned_delivery(published)
    advance(delivery, driver, "pickup-started", 1)
    advance(delivery, driver, "pickup-completed", 2)
    assert list(take_due(ETA_DUE_KEY, "task-1", 60)) == [str(delivery.pk)]  # then the worker dies
    assert take_due(ETA_DUE_KEY, "task-2", 60) == {}  # another run: the lease holds
    # Celery redelivers task-1 (acks_late): the same id takes its items back without waiting
    assert take_due(ETA_DUE_KEY, "task-1", 60) == {str(delivery.pk): "2026-02-01T09:47:00Z"}
