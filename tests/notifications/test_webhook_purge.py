"""The hourly purge of the outbox: events past `WEBHOOK_RETENTION_DAYS` with nothing left to
send go, with their messages and attempts; a switched-off endpoint's messages are given up
once they have waited that long (they were kept for ever, and their events with them), and
go with their events unless another endpoint still waits for one."""
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
