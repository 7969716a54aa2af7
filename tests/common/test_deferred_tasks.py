"""A durable task whose publish fails after commit is kept and published again (common.deferred).

Before, a failed publish (the broker down, or the Redis breaker open after a hang) was logged
and lost: an escalation's alert e-mail never left, a driver never heard a withdrawn offer.
"""
from datetime import timedelta

import pytest
import time_machine
from django.core import mail

from common import broadcast
from common.deferred import deferred_tasks_republish
from common.models import DeferredTask
from common.redis import breaker, redis_address
from common.tasks import republish_deferred_tasks
from config.celery import app as celery_app
from tests.common.test_redis_breaker import open_breaker
from tests.escalation.test_escalation import T0, check, stuck_delivery
from tests.factories import OpsUserFactory

pytestmark = pytest.mark.django_db

EMAIL_TASK = "escalation.send_ops_alert_email"


def broker_hung() -> None:
    open_breaker(redis_address(celery_app.conf.broker_url))


def enqueue(capture, *args, **kwargs) -> None:
    with capture(execute=True):
        broadcast.enqueue_task_on_commit(*args, **kwargs)


def test_an_escalation_alert_whose_publish_failed_is_sent_by_the_sweep(settings, django_capture_on_commit_callbacks):
    settings.OPS_ALERT_EMAILS = ["ops-oncall@example.com"]
    with time_machine.travel(T0, tick=False) as t:
        delivery = stuck_delivery(seller_order_id="ORD-DEFERRED")
        t.shift(timedelta(minutes=5))
        broker_hung()
        check(django_capture_on_commit_callbacks)
        assert mail.outbox == []
        assert DeferredTask.objects.get().task == EMAIL_TASK

        assert republish_deferred_tasks.apply().get() == 0  # still hung: kept
        assert mail.outbox == [] and DeferredTask.objects.get().task == EMAIL_TASK

        breaker.reset()
        t.shift(10)
        with django_capture_on_commit_callbacks(execute=True):
            assert republish_deferred_tasks.apply().get() == 1

    (email,) = mail.outbox
    assert email.to == ["ops-oncall@example.com"] and delivery.seller_order_id in email.subject
    assert not DeferredTask.objects.exists()


def test_only_durable_tasks_are_kept(django_capture_on_commit_callbacks):
    broker_hung()
    enqueue(django_capture_on_commit_callbacks, "offers.expire_overdue_offers")
    assert not DeferredTask.objects.exists()  # its sweep runs anyway
    enqueue(django_capture_on_commit_callbacks, "notifications.push_driver_notice", "d-1", "break_expired",
            {"type": "break_expired"}, durable_seconds=60)
    row = DeferredTask.objects.get()
    assert row.args == ["d-1", "break_expired", {"type": "break_expired"}]
    assert (row.expires_at - row.created_at) == timedelta(seconds=60)


def test_a_durable_task_takes_no_options():
    with pytest.raises(ValueError):
        broadcast.enqueue_task_on_commit("simulation.run", 1, durable_seconds=60, countdown=5)


def test_a_kept_task_past_its_time_is_dropped_unsent(django_capture_on_commit_callbacks, settings):
    settings.OPS_ALERT_EMAILS = ["ops-oncall@example.com"]
    with time_machine.travel(T0, tick=False) as t:
        broker_hung()
        enqueue(django_capture_on_commit_callbacks, EMAIL_TASK, "late", "body", ["ops-oncall@example.com"], durable_seconds=60)
        assert DeferredTask.objects.count() == 1
        breaker.reset()
        t.shift(60)
        with django_capture_on_commit_callbacks(execute=True):
            assert deferred_tasks_republish() == 0
    assert mail.outbox == [] and not DeferredTask.objects.exists()


def test_a_publish_that_fails_again_keeps_its_row_and_the_others_still_go(django_capture_on_commit_callbacks, settings, monkeypatch):
    settings.OPS_ALERT_EMAILS = ["ops-oncall@example.com"]
    broker_hung()
    for subject in ("first", "second"):
        enqueue(django_capture_on_commit_callbacks, EMAIL_TASK, subject, "body", ["ops-oncall@example.com"], durable_seconds=600)
    breaker.reset()
    registered = broadcast._registered_task
    refused = []

    class FirstPublishRefused:
        def __init__(self, task):
            self.task = task

        def apply_async(self, **kwargs):
            if not refused:
                refused.append(kwargs)
                raise OSError("connection refused")
            return self.task.apply_async(**kwargs)

    monkeypatch.setattr(broadcast, "_registered_task", lambda name: FirstPublishRefused(registered(name)))
    with django_capture_on_commit_callbacks(execute=True):
        assert deferred_tasks_republish() == 1

    assert [m.subject for m in mail.outbox] == ["second"]
    row = DeferredTask.objects.get()
    assert row.args[0] == "first" and row.attempts == 1
    with django_capture_on_commit_callbacks(execute=True):
        assert deferred_tasks_republish() == 1
    assert [m.subject for m in mail.outbox] == ["second", "first"]
    assert not DeferredTask.objects.exists()


def test_ops_see_the_kept_publishes_in_the_admin_and_may_drop_one(client, django_capture_on_commit_callbacks):
    broker_hung()
    enqueue(django_capture_on_commit_callbacks, EMAIL_TASK, "kept", "body", ["ops-oncall@example.com"], durable_seconds=600)
    row = DeferredTask.objects.get()
    client.force_login(OpsUserFactory(is_superuser=True))

    assert EMAIL_TASK in client.get("/admin/common/deferredtask/").content.decode()
    assert client.get("/admin/common/deferredtask/add/").status_code == 403
    r = client.post(f"/admin/common/deferredtask/{row.pk}/delete/", {"post": "yes"})
    assert r.status_code == 302 and not DeferredTask.objects.exists()


def test_a_kept_task_no_longer_registered_is_dropped(django_capture_on_commit_callbacks):
    broker_hung()
    enqueue(django_capture_on_commit_callbacks, EMAIL_TASK, "kept", "body", ["ops-oncall@example.com"], durable_seconds=600)
    breaker.reset()
    DeferredTask.objects.update(task="escalation.renamed_since")
    with django_capture_on_commit_callbacks(execute=True):
        assert deferred_tasks_republish() == 1
    assert not DeferredTask.objects.exists() and mail.outbox == []


def test_every_durable_caller_keeps_its_failed_publish(django_capture_on_commit_callbacks, settings):
    """Ops alerts (notifications.alerts), a driver's notice (notifications.push) and escalation
    alerts are enqueued durable."""
    from notifications import alerts
    from notifications.push import NOTICE_TASK, push_notice_capture

    settings.OPS_ALERT_EMAILS = ["ops-oncall@example.com"]
    settings.OPS_ALERT_CHAT_WEBHOOK_URL = "http://127.0.0.1:9/hook"
    broker_hung()
    with django_capture_on_commit_callbacks(execute=True):
        alerts.ops_alert_on_commit(subject="webhook endpoint disabled", body="body")
        push_notice_capture({"type": "offer_cancelled", "driverId": "d-1", "offerId": "o-1", "reason": "x"})
    assert sorted(DeferredTask.objects.values_list("task", flat=True)) == sorted(
        [alerts.EMAIL_TASK, alerts.CHAT_TASK, NOTICE_TASK]
    )
