"""Ops alerts beyond the live sockets: an e-mail to `OPS_ALERT_EMAILS` and a message to a
Slack-compatible incoming webhook (`OPS_ALERT_CHAT_WEBHOOK_URL`: Slack, Mattermost, Rocket.Chat
take `{"text": ...}`). Each goes out from its own Celery task enqueued after commit, so a
failing chat never re-sends the e-mail; nothing is configured, nothing is sent."""
from __future__ import annotations

import json

from django.conf import settings
from django.core.mail import send_mail

from common.broadcast import OPS_ALERT_KEEP_SECONDS, enqueue_task_on_commit
from notifications.egress import post_json

EMAIL_TASK = "notifications.send_ops_alert_email"
CHAT_TASK = "notifications.send_ops_alert_chat"


def ops_alert_on_commit(*, subject: str, body: str) -> None:
    """E-mail and chat, after commit (each only when configured)."""
    if settings.OPS_ALERT_EMAILS:
        enqueue_task_on_commit(EMAIL_TASK, subject, body, durable_seconds=OPS_ALERT_KEEP_SECONDS)
    ops_chat_alert_on_commit(subject=subject, body=body)


def ops_chat_alert_on_commit(*, subject: str, body: str) -> None:
    if settings.OPS_ALERT_CHAT_WEBHOOK_URL:
        enqueue_task_on_commit(CHAT_TASK, subject, body, durable_seconds=OPS_ALERT_KEEP_SECONDS)


def ops_alert_email_send(*, subject: str, body: str) -> int:
    return send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, list(settings.OPS_ALERT_EMAILS), fail_silently=False)


class ChatAlertFailed(Exception):
    pass


def chat_escape(text: str) -> str:
    """Slack's control characters as entities (its message formatting guide): a store name of
    `<!channel>` or `<https://…|Open the admin>` is shown as written, not as a mention of
    everyone or a disguised link. Mattermost and Rocket.Chat show the entities as the characters."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def ops_alert_chat_send(*, subject: str, body: str) -> int:
    """POST `{"text": "*subject*\\nbody"}` (escaped: chat_escape) to the chat webhook; raises
    (for the task's retry) on anything but a 2xx."""
    url = settings.OPS_ALERT_CHAT_WEBHOOK_URL
    payload = json.dumps({"text": f"*{chat_escape(subject)}*\n{chat_escape(body)}"}).encode("utf-8")
    result = post_json(url, payload, {}, timeout=settings.WEBHOOK_TIMEOUT_SECONDS, trusted=True)
    if result.status is None or not 200 <= result.status < 300:
        raise ChatAlertFailed(result.error or f"HTTP {result.status}")
    return result.status
