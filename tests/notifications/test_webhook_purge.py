"""The hourly purge of the outbox: events past `WEBHOOK_RETENTION_DAYS` with nothing left to
send go, with their messages and attempts; a switched-off endpoint's messages are given up
once they have waited that long (they were kept for ever, and their events with them), and
go with their events unless another endpoint still waits for one. Ops are warned two days
before."""
from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from notifications import services
from notifications.models import MessageStatus, OutboxEvent, WebhookAttempt, WebhookMessage
from tests.factories import IntegrationUserFactory

pytestmark = pytest.mark.django_db

DAY = timedelta(days=1)


@pytest.fixture
def merchant():
    return IntegrationUserFactory()


def endpoint(merchant, name, *, active=True):
    made = services.endpoint_create(owner=merchant, all_deliveries=False, url=f"https://{name}.example.com/h", events=["*"])
    if not active:
        services.endpoint_update(endpoint_id=made.pk, active=False)
    return made


def message(merchant, to, *, age: timedelta, status=MessageStatus.PENDING) -> WebhookMessage:
    at = timezone.now() - age
    event = OutboxEvent.objects.create(type="webhook.test", endpoint=to, owner=merchant, payload={}, created_at=at,
                                       fanned_out_at=at)
    return WebhookMessage.objects.create(event=event, endpoint=to, status=status, next_attempt_at=at,
                                         window_started_at=at, created_at=at)


def test_old_events_with_nothing_left_to_send_go_with_their_messages_and_attempts(merchant, settings):
    settings.WEBHOOK_RETENTION_DAYS = 14
    on = endpoint(merchant, "on")
    old = message(merchant, on, age=15 * DAY, status=MessageStatus.DELIVERED)
    WebhookAttempt.objects.create(message=old, endpoint=on, attempted_at=old.created_at, status_code=200, duration_ms=5)
    recent = message(merchant, on, age=13 * DAY, status=MessageStatus.DELIVERED)
    waiting = message(merchant, on, age=15 * DAY)  # an active endpoint's: its retry window decides

    assert services.webhooks_purge() == 1

    assert set(OutboxEvent.objects.values_list("seq", flat=True)) == {recent.event_id, waiting.event_id}
    assert not WebhookAttempt.objects.exists()
    assert WebhookMessage.objects.get(pk=waiting.pk).status == MessageStatus.PENDING


def test_a_switched_off_endpoints_messages_are_given_up_after_the_retention_and_purged(merchant, settings):
    settings.WEBHOOK_RETENTION_DAYS = 14
    off = endpoint(merchant, "off", active=False)
    stale = [message(merchant, off, age=15 * DAY) for _ in range(3)]
    kept = message(merchant, off, age=13 * DAY)

    assert services.webhooks_purge(batch_size=2) == 3  # (given up two at a time)

    assert not WebhookMessage.objects.filter(pk__in=[m.pk for m in stale]).exists()
    assert not OutboxEvent.objects.filter(seq__in=[m.event_id for m in stale]).exists()
    assert WebhookMessage.objects.get(pk=kept.pk).status == MessageStatus.PENDING


def test_a_given_up_message_whose_event_another_endpoint_still_waits_for_says_why_and_can_be_replayed(
        merchant, settings, caplog):
    settings.WEBHOOK_RETENTION_DAYS = 14
    off, on = endpoint(merchant, "off", active=False), endpoint(merchant, "on")
    given_up = message(merchant, off, age=15 * DAY)
    at = given_up.created_at
    WebhookMessage.objects.create(event_id=given_up.event_id, endpoint=on, next_attempt_at=at, window_started_at=at,
                                  created_at=at)  # (pending: its retry window decides, at its next attempt)

    assert services.webhooks_purge() == 0  # the event stays: the active endpoint still waits for it

    given_up.refresh_from_db()
    assert given_up.status == MessageStatus.FAILED
    assert given_up.last_error == "gave up: waited 14 days for a switched-off endpoint"
    assert "gave up 1 messages queued before" in caplog.text and str(off.pk) in caplog.text
    assert services.endpoint_replay_failed(endpoint_id=off.pk, since=at - DAY) == 1
    assert services.webhooks_purge() == 0  # replayed: it waits 14 days more
    assert WebhookMessage.objects.get(pk=given_up.pk).status == MessageStatus.PENDING


def test_a_purge_stops_at_its_time_budget_and_the_next_run_goes_on(merchant, settings):
    settings.WEBHOOK_RETENTION_DAYS = 14
    on = endpoint(merchant, "on")
    for _ in range(3):
        message(merchant, on, age=15 * DAY, status=MessageStatus.DELIVERED)

    assert services.webhooks_purge(batch_size=1, max_seconds=0) == 1  # (at least one batch a run)
    assert services.webhooks_purge(batch_size=1) == 2


@pytest.mark.django_db(transaction=True)
def test_ops_are_warned_two_days_before_a_switched_off_endpoints_events_are_dropped_and_not_every_hour(
        merchant, settings, receiver, time_machine):
    """Before, the first ops heard of it was the purge's warning log line, with the events gone."""
    settings.WEBHOOK_RETENTION_DAYS, settings.OPS_ALERT_CHAT_WEBHOOK_URL = 14, receiver.url
    start = timezone.now()
    time_machine.move_to(start, tick=False)
    off, on = endpoint(merchant, "off", active=False), endpoint(merchant, "on")
    message(merchant, on, age=13 * DAY)  # (an active endpoint's wait is its retry window's business)
    message(merchant, off, age=11 * DAY)
    services.webhooks_purge()
    assert receiver.requests == []  # three days before: not yet

    message(merchant, off, age=12 * DAY + timedelta(hours=1))
    message(merchant, off, age=12 * DAY + timedelta(hours=2))
    services.webhooks_purge()
    services.webhooks_purge()  # (the next hour's run: no second alert)
    texts = [r.json()["text"] for r in receiver.requests]
    assert len(texts) == 1, texts
    assert texts[0].startswith("*[dispatch] webhook events about to be dropped: https://off.example.com/h*")
    assert "3 of its events are waiting." in texts[0] and "has waited 14 days since it was queued: 2 by " in texts[0]
    assert f"the first at {(start + 2 * DAY - timedelta(hours=2)).isoformat()[:16]}" in texts[0]
    assert f"the last of those waiting now at {(start + 3 * DAY).isoformat()[:16]}" in texts[0]  # (the one queued 11 days before)
    assert f"/admin/notifications/webhookendpoint/{off.pk}/change/" in texts[0]
    off.refresh_from_db()
    assert off.drop_warned_at == start

    time_machine.move_to(start + timedelta(hours=1), tick=False)
    message(merchant, off, age=timedelta(0))  # queued after the warning
    time_machine.move_to(start + 3 * DAY + timedelta(hours=1), tick=False)
    services.webhooks_purge()  # all three warned about are dropped by now; no new alert
    assert len(receiver.requests) == 1
    time_machine.move_to(start + 12 * DAY + timedelta(hours=2), tick=False)
    services.webhooks_purge()
    assert len(receiver.requests) == 2  # a reminder: the endpoint is still off and still losing events
    assert "1 of its events are waiting." in receiver.requests[1].json()["text"]

    services.endpoint_update(endpoint_id=off.pk, active=True)
    off.refresh_from_db()
    assert off.drop_warned_at is None
