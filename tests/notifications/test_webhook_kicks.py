"""The webhook worker's kick (`notifications.deliver_webhooks`) is queued once per burst, not
once per commit (`common.broadcast.enqueue_kick_on_commit`): while a kick is queued and has
not started, later commits queue none; the task takes the kick before it reads what is due,
so a commit after that queues the next. Nothing committed waits for a kick that never comes."""
import logging

import pytest
from celery.app.task import Task
from django.db import transaction

from common import broadcast
from common.broadcast import enqueue_kick_on_commit, kick_key
from common.redis import get_redis
from notifications import services
from notifications.outbox import DELIVER_TASK
from notifications.tasks import deliver_webhooks

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def published(monkeypatch):
    """The tasks published to the broker, by name (none runs)."""
    names = []

    def publish(self, *args, **kwargs):
        names.append(self.name)

    monkeypatch.setattr(Task, "apply_async", publish)
    return names


def commit_kick():
    with transaction.atomic():
        enqueue_kick_on_commit(DELIVER_TASK)


def test_commits_while_a_kick_is_queued_queue_no_other(published):
    for _ in range(5):
        commit_kick()
    assert published == [DELIVER_TASK]


def test_a_kick_that_started_lets_the_next_commit_queue_one(published, monkeypatch):
    commit_kick()
    seen = []
    monkeypatch.setattr(services, "webhooks_deliver_due", lambda: seen.append(get_redis().exists(kick_key(DELIVER_TASK))) or 0)
    deliver_webhooks()  # the worker runs the queued kick
    assert seen == [0]  # the kick was taken before it read what is due
    commit_kick()
    assert published == [DELIVER_TASK, DELIVER_TASK]


def test_a_rolled_back_transaction_queues_no_kick(published):
    with pytest.raises(RuntimeError), transaction.atomic():
        enqueue_kick_on_commit(DELIVER_TASK)
        raise RuntimeError("no")
    assert published == []
    commit_kick()
    assert published == [DELIVER_TASK]


def test_a_failed_enqueue_is_logged_and_frees_the_slot(monkeypatch, caplog, published):
    def down(self, *args, **kwargs):
        raise ConnectionError("broker down")

    monkeypatch.setattr(Task, "apply_async", down)
    with caplog.at_level(logging.WARNING, logger="common.broadcast"):
        commit_kick()
    assert any("enqueue of notifications.deliver_webhooks failed" in r.getMessage() for r in caplog.records)
    assert not get_redis().exists(kick_key(DELIVER_TASK))


def test_redis_down_still_queues_the_kick(published, monkeypatch):
    class Down:
        def set(self, *args, **kwargs):
            raise ConnectionError("redis down")

        def delete(self, *args):
            raise ConnectionError("redis down")

    monkeypatch.setattr(broadcast, "get_redis", lambda: Down())
    commit_kick()
    commit_kick()
    assert published == [DELIVER_TASK, DELIVER_TASK]


def test_a_queued_kick_stops_holding_the_slot_after_its_ttl(published):
    commit_kick()
    assert 0 < get_redis().pttl(kick_key(DELIVER_TASK)) <= broadcast.KICK_TTL_MS


def test_a_fan_out_backlog_is_gone_through_in_slices_each_sweep_kicking_the_next(published, monkeypatch):
    """After an outage of the workers: a sweep fanned out for its whole budget (30 s), holding a
    worker process the ETA refreshes and customer messages share (a live check: two sweeps held
    both for 30 s each). Now it fans out for at most FAN_OUT_SLICE_SECONDS and kicks the next."""
    from celery import current_app

    from common.actors import Actor
    from notifications.models import OutboxEvent
    from tests.factories import DeliveryFactory
    from workflows.deliveries import delivery_cancel

    for _ in range(10):
        delivery_cancel(delivery_id=DeliveryFactory().pk, reason="backlog", actor=Actor.system())
    assert OutboxEvent.objects.filter(fanned_out_at__isnull=True).count() == 10
    one_at_a_time = services.webhooks_fan_out
    monkeypatch.setattr(services, "webhooks_fan_out", lambda now: one_at_a_time(now=now, batch_size=1))
    monkeypatch.setattr(services, "FAN_OUT_SLICE_SECONDS", 0.0)  # (a slice: one batch)
    published.clear()
    get_redis().delete(kick_key(DELIVER_TASK))  # (as the task does when it starts: the backlog's kick was taken)

    eager, current_app.conf.task_always_eager = current_app.conf.task_always_eager, False  # (kicks are queued)
    try:
        services.webhooks_deliver_due(max_seconds=30)
    finally:
        current_app.conf.task_always_eager = eager

    assert 0 < OutboxEvent.objects.filter(fanned_out_at__isnull=True).count() < 10
    assert published == [DELIVER_TASK]
