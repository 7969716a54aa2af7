from smtplib import SMTPException

from celery import shared_task

from escalation import alerts
from workflows import escalations


@shared_task(name="escalation.check")
def escalation_check() -> dict:
    """Every 30 s: escalate unassigned deliveries by how long they have waited (idempotent,
    safe when two run at once, bounded batches)."""
    return escalations.escalation_check().as_dict()


@shared_task(
    name="escalation.send_ops_alert_email", ignore_result=True,
    autoretry_for=(SMTPException, OSError), retry_backoff=True, max_retries=5,
)
def send_ops_alert_email(subject: str, body: str, recipients: list[str]) -> int:
    return alerts.ops_alert_email_send(subject=subject, body=body, recipients=recipients)
