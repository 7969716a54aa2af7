"""The ops console for webhooks: an endpoint's page with its recent attempts, the message list,
replaying one message, replaying an endpoint's failed events since a time."""
from __future__ import annotations

import re
import zoneinfo
from datetime import timedelta

import pytest
from django.utils import timezone

from notifications.models import MessageStatus, WebhookMessage
from tests.factories import IntegrationUserFactory
from tests.notifications.receiver import Answer
from tests.notifications.webhook_helpers import delivery_walk, endpoint_via_api, messages_of

pytestmark = pytest.mark.django_db(transaction=True)


def _failed_walk(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    receiver.answer(Answer(404))
    delivery, _ = delivery_walk(merchant, steps=())
    (message,) = messages_of(delivery)
    assert message.status == MessageStatus.FAILED
    return endpoint_id, message


def test_the_endpoint_page_shows_its_attempt_log(admin_client, receiver):
    endpoint_id, message = _failed_walk(receiver)
    page = admin_client.get(f"/admin/notifications/webhookendpoint/{endpoint_id}/change/")
    assert page.status_code == 200
    html = page.content.decode()
    assert message.event.webhook_id in html and "delivery.assigned" in html and "HTTP 404" in html
    assert message.endpoint.secret not in html
    for path in ("webhookendpoint", "webhookmessage", "webhookattempt", "outboxevent"):
        assert admin_client.get(f"/admin/notifications/{path}/").status_code == 200
    assert admin_client.get(f"/admin/notifications/webhookmessage/{message.pk}/change/").status_code == 200


def test_replaying_one_message_from_the_admin(admin_client, receiver):
    _, message = _failed_walk(receiver)
    response = admin_client.post("/admin/notifications/webhookmessage/", {"action": "replay", "_selected_action": [message.pk]})
    assert response.status_code == 302
    message.refresh_from_db()
    assert message.status == MessageStatus.DELIVERED
    assert [r.headers["webhook-id"] for r in receiver.requests] == [message.event.webhook_id] * 2


def _console_time(moment, settings) -> dict:
    """The split date/time fields as ops type them: in the console's time zone when the
    console has one (OPS_TIME_ZONE), else UTC."""
    zone = "UTC"
    if "common.middleware.OpsTimeZoneMiddleware" in settings.MIDDLEWARE:
        zone = settings.OPS_TIME_ZONE
    local = timezone.localtime(moment, zoneinfo.ZoneInfo(zone))
    return {"since_0": local.strftime("%Y-%m-%d"), "since_1": local.strftime("%H:%M:%S")}


def test_replaying_an_endpoints_failed_events_since_a_time(admin_client, receiver, settings):
    endpoint_id, message = _failed_walk(receiver)
    url = "/admin/notifications/webhookendpoint/"
    form = admin_client.post(url, {"action": "replay_failed_since", "_selected_action": [endpoint_id]})
    assert form.status_code == 200 and b"Replay failed webhook events" in form.content
    since = message.event.created_at + timedelta(seconds=5)  # after it: nothing to replay
    admin_client.post(url, {"action": "replay_failed_since", "_selected_action": [endpoint_id], "apply": "1",
                            **_console_time(since, settings)})
    assert WebhookMessage.objects.get(pk=message.pk).status == MessageStatus.FAILED
    since = message.event.created_at - timedelta(minutes=1)
    done = admin_client.post(url, {"action": "replay_failed_since", "_selected_action": [endpoint_id], "apply": "1",
                                   **_console_time(since, settings)})
    assert done.status_code == 302
    assert WebhookMessage.objects.get(pk=message.pk).status == MessageStatus.DELIVERED


def test_an_endpoint_changed_in_the_admin_goes_through_the_service(admin_client, receiver, settings):
    endpoint_id, _ = _failed_walk(receiver)
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    page = admin_client.post(f"/admin/notifications/webhookendpoint/{endpoint_id}/change/", {
        "url": "http://10.0.0.8/hook", "description": "", "events": "delivery.assigned", "active": "on",
    })
    assert page.status_code == 200 and b"not allowed" in page.content


def test_an_edit_of_a_failing_endpoints_description_keeps_its_failure_record(admin_client):
    """The page passed `active` always: saving a new description cleared the failure record
    (and the 24 h clock to disabling it) and made every waiting retry due now."""
    from django.utils import timezone

    from notifications import services as webhook_services
    from notifications.models import WebhookEndpoint
    from tests.factories import IntegrationUserFactory
    from tests.zones.test_zones_admin import form_data

    endpoint = webhook_services.endpoint_create(owner=IntegrationUserFactory(), all_deliveries=False,
                                                url="https://hooks.example.com/h", events=["*"])
    failing = timezone.now()
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(failing_since=failing)
    url = f"/admin/notifications/webhookendpoint/{endpoint.pk}/change/"
    data = {**form_data(admin_client.get(url)), "description": "the new one"}

    assert admin_client.post(url, data).status_code == 302
    endpoint.refresh_from_db()
    assert endpoint.description == "the new one" and endpoint.failing_since == failing


def test_a_post_to_a_message_page_changes_nothing(admin_client, receiver):
    """Its page is read-only, but a POST saved the row as the page had read it (over the
    sender's record of an attempt); the list's replay action still works."""
    _, message = _failed_walk(receiver)
    before = WebhookMessage.objects.values().get(pk=message.pk)

    r = admin_client.post(f"/admin/notifications/webhookmessage/{message.pk}/change/", {"_save": "Save"})

    assert r.status_code == 403 and WebhookMessage.objects.values().get(pk=message.pk) == before


def test_delete_selected_endpoints_goes_through_the_service(admin_client, monkeypatch):
    """(Django deleted the rows itself, without the service's lock on the endpoint.)"""
    from notifications import services as webhook_services
    from notifications.models import WebhookEndpoint
    from tests.factories import IntegrationUserFactory

    endpoint = webhook_services.endpoint_create(owner=IntegrationUserFactory(), all_deliveries=False,
                                                url="https://hooks.example.com/h", events=["*"])
    deleted = []
    real = webhook_services.endpoint_delete
    monkeypatch.setattr(webhook_services, "endpoint_delete", lambda **kw: deleted.append(kw) or real(**kw))

    r = admin_client.post("/admin/notifications/webhookendpoint/", {
        "action": "delete_selected", "_selected_action": [str(endpoint.pk)], "post": "yes"}, follow=True)

    assert r.status_code == 200 and deleted == [{"endpoint_id": endpoint.pk}]
    assert not WebhookEndpoint.objects.filter(pk=endpoint.pk).exists()


def test_an_endpoint_that_was_sent_events_can_be_deleted_and_the_page_counts_what_goes(receiver, admin_client):
    """Django's confirmation asked for the delete permission on its messages and attempts, which
    their read-only pages never give: "your account doesn't have permission to delete", even for
    a superuser (a Dispatcher may not delete a merchant's endpoint at all), and nothing was deleted."""
    from notifications.models import WebhookAttempt, WebhookEndpoint

    endpoint_id, message = _failed_walk(receiver)
    url = f"/admin/notifications/webhookendpoint/{endpoint_id}/delete/"

    page = admin_client.get(url)
    html = page.content.decode()
    assert page.status_code == 200 and "permission to delete" not in html
    assert "Webhook messages: 1" in html and "Webhook attempts: 1" in html, html

    r = admin_client.post(url, {"post": "yes"})

    assert r.status_code == 302
    assert not WebhookEndpoint.objects.filter(pk=endpoint_id).exists()
    assert not WebhookMessage.objects.filter(pk=message.pk).exists()
    assert not WebhookAttempt.objects.filter(endpoint_id=endpoint_id).exists()


def test_the_admin_finds_a_message_by_the_webhook_id_a_receiver_logged(admin_client, receiver):
    """The search read the event's UUID with hyphens: `msg_<hex>` matched nothing."""
    _, message = _failed_walk(receiver)
    _, other = _failed_walk(receiver)
    webhook_id = receiver.requests[0].headers["webhook-id"]
    assert webhook_id == message.event.webhook_id

    for path, row in (("webhookmessage", message.pk), ("webhookattempt", message.attempts.get().pk),
                      ("outboxevent", message.event.pk)):
        for term in (webhook_id, f" {webhook_id.upper().replace('MSG_', 'msg_')} "):
            page = admin_client.get(f"/admin/notifications/{path}/", {"q": term})
            assert page.status_code == 200
            assert [r.pk for r in page.context["cl"].result_list] == [row], (path, term)
    by_delivery = admin_client.get("/admin/notifications/webhookmessage/", {"q": str(other.delivery_id)})
    assert [r.pk for r in by_delivery.context["cl"].result_list] == [other.pk]
    nothing = admin_client.get("/admin/notifications/webhookmessage/", {"q": "msg_" + "0" * 32})
    assert list(nothing.context["cl"].result_list) == []


def test_a_whole_id_or_a_url_is_searched_by_indexed_paths(admin_client, receiver):
    """A delivery id or an endpoint URL was matched as text against every message and attempt
    (`UPPER(…::text) LIKE`): a scan of tables that grow by millions. Now the delivery's
    events and the URL's endpoints are looked up first; the rows found are the same."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from notifications.models import OutboxEvent

    _, message = _failed_walk(receiver)
    _, other = _failed_walk(receiver)
    attempt = message.attempts.get()
    host = receiver.url.split("://", 1)[1].split("/", 1)[0]
    cases = [
        ("webhookmessage", str(message.delivery_id), [message.pk]),
        ("webhookmessage", str(message.delivery_id).upper().replace("-", ""), [message.pk]),
        ("webhookattempt", str(message.delivery_id), [attempt.pk]),
        ("outboxevent", str(message.delivery_id), sorted(OutboxEvent.objects.filter(delivery_id=message.delivery_id)
                                                         .values_list("pk", flat=True))),
        ("outboxevent", str(message.event.event_id), [message.event.pk]),
        ("webhookmessage", receiver.url, sorted([message.pk, other.pk])),
        ("webhookattempt", host, sorted([attempt.pk, other.attempts.get().pk])),
        ("webhookmessage", "https://nowhere.invalid/hook", []),
    ]
    for path, term, rows in cases:
        with CaptureQueriesContext(connection) as queries:
            page = admin_client.get(f"/admin/notifications/{path}/", {"q": term})
        assert page.status_code == 200
        assert sorted(r.pk for r in page.context["cl"].result_list) == rows, (path, term)
        read_as_text = {m for q in queries for m in re.findall(r'("\w+"\."\w+")::text', q["sql"])}
        assert read_as_text <= {'"notifications_webhookendpoint"."url"'}, (path, term, read_as_text)  # (a few rows)
    partial = admin_client.get("/admin/notifications/webhookmessage/", {"q": str(other.delivery_id)[:8]})
    assert [r.pk for r in partial.context["cl"].result_list] == [other.pk]  # (part of an id: the text search)
