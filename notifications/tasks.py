import logging
from smtplib import SMTPException

from celery import shared_task

from common.broadcast import kick_started
from offers.push import get_push_backend

from notifications import alerts, customers, services
from notifications.outbox import DELIVER_TASK, eta_updates_held_back_write
from notifications.push import PushTransientError

logger = logging.getLogger(__name__)


@shared_task(name="notifications.deliver_webhooks", ignore_result=True)
def deliver_webhooks() -> int:
    """After each commit that wrote outbox rows, and every 15 s as the sweep: write the ETA
    updates held back whose interval has ended, fan out and send
    what is due (idempotent; several may run at once). A commit kicks it only when no kick is
    queued yet (`common.broadcast.enqueue_kick_on_commit`): taking the kick first means any
    commit from now on queues the next one."""
    kick_started(DELIVER_TASK)
    try:
        eta_updates_held_back_write()  # (the ETA updates whose throttle interval has ended)
    except Exception:  # (marked again for the next run) one failure never stops the sweep's sending
        logger.exception("the held-back ETA updates could not be written")
    return services.webhooks_deliver_due()


@shared_task(name="notifications.purge_webhook_events", ignore_result=True)
def purge_webhook_events() -> int:
    return services.webhooks_purge()


@shared_task(
    name="notifications.send_ops_alert_email", ignore_result=True,
    autoretry_for=(SMTPException, OSError), retry_backoff=True, max_retries=5,
)
def send_ops_alert_email(subject: str, body: str) -> int:
    return alerts.ops_alert_email_send(subject=subject, body=body)


@shared_task(
    name="notifications.send_ops_alert_chat", ignore_result=True,
    autoretry_for=(alerts.ChatAlertFailed, OSError), retry_backoff=True, max_retries=8,
)
def send_ops_alert_chat(subject: str, body: str) -> int:
    return alerts.ops_alert_chat_send(subject=subject, body=body)


@shared_task(name="notifications.send_customer_messages", ignore_result=True)
def send_customer_messages() -> int:
    """After a fan-out made customer messages, and every 15 s for retries: send what is due."""
    return customers.customer_messages_send_due()


@shared_task(
    name="notifications.push_driver_notice", ignore_result=True,
    autoretry_for=(PushTransientError, OSError), retry_backoff=2, max_retries=3,
)
def push_driver_notice(driver_id: str, kind: str, event: dict) -> bool:
    """An offer withdrawn, a delivery taken away or a break ended, to the driver's phone (PUSH_BACKEND)."""
    return bool(get_push_backend().send_notice(driver_id=driver_id, kind=kind, event=event))
