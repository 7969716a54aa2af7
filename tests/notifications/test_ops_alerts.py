"""Ops alerts by chat: escalation tiers (warning at level 1, critical at level 3) and a disabled
webhook endpoint post `{"text": …}` to the Slack-compatible incoming webhook, a real local HTTP
server here; the alert e-mails go to a real SMTP server (aiosmtpd); a failing chat is retried
by its task without sending the e-mail again."""
from __future__ import annotations

import pytest
from django.db import transaction

from common.actors import Actor
from escalation.models import UnassignedOrder
from notifications import alerts
from notifications.tasks import send_ops_alert_chat as ChatTask
from tests.factories import DeliveryFactory
from tests.notifications.receiver import Answer
from workflows.dispatching import delivery_dispatch
from workflows.escalations import unassigned_escalate

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def chat(receiver, settings):
    settings.OPS_ALERT_CHAT_WEBHOOK_URL = receiver.url
    return receiver


def _stuck():
    delivery = DeliveryFactory(seller_order_id="ORD-STUCK")
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    return delivery


def test_escalation_tiers_alert_ops_by_chat_and_email(chat, smtp_server, settings, ops_user):
    settings.OPS_ALERT_EMAILS = ["oncall@example.com"]
    delivery = _stuck()
    record = UnassignedOrder.objects.get(delivery=delivery)
    unassigned_escalate(record_id=record.pk, level=1, reason="customer called", notes="", actor=Actor.for_user(ops_user), user=ops_user)
    unassigned_escalate(record_id=record.pk, level=3, reason="VIP order", notes="", actor=Actor.for_user(ops_user), user=ops_user)

    texts = [r.json()["text"] for r in chat.requests]
    assert len(texts) == 2
    assert "ORD-STUCK" in texts[0] and "level 1" in texts[0] and "CRITICAL" not in texts[0]
    assert texts[1].startswith("*[dispatch] CRITICAL:") and "level 3" in texts[1]
    assert [e.rcpt_tos for e in smtp_server] == [["oncall@example.com"]] * 2


def test_nothing_goes_for_a_rolled_back_alert_or_without_settings(chat, settings):
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            alerts.ops_alert_on_commit(subject="s", body="b")
            raise RuntimeError
    settings.OPS_ALERT_CHAT_WEBHOOK_URL = ""
    with transaction.atomic():
        alerts.ops_alert_on_commit(subject="s", body="b")
    assert chat.requests == []


def test_a_failing_chat_webhook_raises_for_its_task_and_the_email_still_goes(chat, smtp_server, settings):
    settings.OPS_ALERT_EMAILS = ["oncall@example.com"]
    chat.answer(Answer(500), Answer(503))
    with transaction.atomic():
        alerts.ops_alert_on_commit(subject="[dispatch] webhook endpoint disabled", body="details")
    assert len(smtp_server) == 1  # its own task: the chat failing does not hold it back
    with pytest.raises(alerts.ChatAlertFailed):
        alerts.ops_alert_chat_send(subject="again", body="details")  # the task retries on this
    assert alerts.ops_alert_chat_send(subject="again", body="details") == 200
    assert ChatTask.autoretry_for == (alerts.ChatAlertFailed, OSError)
    assert [r.json()["text"] for r in chat.requests] == [
        "*[dispatch] webhook endpoint disabled*\ndetails", "*again*\ndetails", "*again*\ndetails",
    ]


def test_a_store_name_cannot_mention_everyone_or_disguise_a_link_in_the_chat(chat, ops_user):
    """A seller's store name went into Slack's text as written: `<!channel>` pinged the whole
    channel and `<https://…|Open the admin>` showed as a harmless-looking link."""
    delivery = DeliveryFactory(seller_order_id="ORD-SLACK", store_name="<!channel> <https://evil.example/login|Open the admin> & co")
    assert delivery_dispatch(delivery_id=delivery.pk, actor=Actor.system()).outcome == "unassigned"
    record = UnassignedOrder.objects.get(delivery=delivery)
    unassigned_escalate(record_id=record.pk, level=3, reason="VIP", notes="", actor=Actor.for_user(ops_user), user=ops_user)

    (text,) = [r.json()["text"] for r in chat.requests]
    assert "&lt;!channel&gt; &lt;https://evil.example/login|Open the admin&gt; &amp; co" in text
    assert "<" not in text and ">" not in text
