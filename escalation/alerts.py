"""Ops alerts for escalations: an e-mail to `OPS_ALERT_EMAILS` through Django's e-mail backend,
and a message to the Slack-compatible chat webhook `OPS_ALERT_CHAT_WEBHOOK_URL`, each sent by a
Celery task enqueued after commit (the socket side is the `unassigned_order_escalated` event).
Nothing is sent for a transaction that rolls back. The chat task lives in `notifications`
(a higher layer): it is enqueued by name."""
from __future__ import annotations

import logging
from datetime import datetime

from django.conf import settings
from django.core.mail import send_mail

from common.bidi import bidi_isolated
from common.broadcast import OPS_ALERT_KEEP_SECONDS, enqueue_task_on_commit
from common.errors import iso

logger = logging.getLogger(__name__)

CHAT_TASK = "notifications.send_ops_alert_chat"
WARNING = "warning"
CRITICAL = "critical"


def _url(path: str) -> str:
    return settings.SITE_URL.rstrip("/") + path


def ops_alert_on_commit(
    *, record, delivery, level: int, severity: str, reason: str, waited_minutes: int, now: datetime, notes: str = ""
) -> None:
    """Queue the alert e-mail and chat message for after commit (each only when configured)."""
    recipients = list(settings.OPS_ALERT_EMAILS)
    if not recipients and not settings.OPS_ALERT_CHAT_WEBHOOK_URL:
        return
    prefix = "CRITICAL: " if severity == CRITICAL else ""
    subject = f"[dispatch] {prefix}order {delivery.seller_order_id} unassigned for {waited_minutes} min (level {level})"
    lines = [
        f"Order {delivery.seller_order_id} from {bidi_isolated(delivery.store_name)} has no driver.",
        "",
        f"Escalation level: {level} ({severity})",
        f"Reason: {reason}",
        f"Failure reason: {record.failure_reason}",
        f"Ready since: {iso(delivery.ready_at)} ({waited_minutes} min)",
        f"Dispatch attempts: {record.attempt_count}",
        f"Escalated at: {iso(now)}",
    ]
    if notes:
        lines.append(f"Notes: {notes}")
    if record.support_ticket_id:
        lines.append(f"Support ticket: {_url(f'/support/tickets/{record.support_ticket_id}/')}")
    lines.append(f"Unassigned order (admin): {_url(f'/admin/escalation/unassignedorder/{record.pk}/change/')}")
    lines.append(f"Delivery (admin): {_url(f'/admin/dispatch/delivery/{delivery.pk}/change/')}")
    body = "\n".join(lines)
    if recipients:
        enqueue_task_on_commit(
            "escalation.send_ops_alert_email", subject, body, recipients, durable_seconds=OPS_ALERT_KEEP_SECONDS
        )
    if settings.OPS_ALERT_CHAT_WEBHOOK_URL:
        enqueue_task_on_commit(CHAT_TASK, subject, body, durable_seconds=OPS_ALERT_KEEP_SECONDS)


def ops_alert_email_send(*, subject: str, body: str, recipients: list[str]) -> int:
    """Send one alert e-mail now (called by the task)."""
    return send_mail(subject, body, settings.DEFAULT_FROM_EMAIL, recipients, fail_silently=False)
