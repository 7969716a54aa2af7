"""Push notifications of offers to drivers' phones, behind a small interface.

The default logs the push; a deployment sets PUSH_BACKEND to a class that talks to its push
gateway: `notifications.push.FcmPushBackend` (FCM HTTP v1, docs/notifications.md). Tests
replace it with a recording backend: it is the one thing that
leaves the machine.
"""
from __future__ import annotations

import logging

from django.conf import settings
from django.utils.module_loading import import_string

logger = logging.getLogger(__name__)


class PushBackend:
    method = "push"

    def send_offer(self, *, driver_id: str, event: dict) -> bool:
        """Send an offer notification; return True when the gateway accepted it."""
        raise NotImplementedError

    def send_notice(self, *, driver_id: str, kind: str, event: dict) -> bool:
        """Tell the driver of `offer_cancelled` (withdrawn), `assignment_cancelled` (a delivery
        taken away), `break_expired` or `customer_replied` (the customer's text); True when sent."""
        return False


class LoggingPushBackend(PushBackend):
    def send_offer(self, *, driver_id: str, event: dict) -> bool:
        logger.info("push offer %s to driver %s (expires %s)", event["offerId"], driver_id, event["expiresAt"])
        return True

    def send_notice(self, *, driver_id: str, kind: str, event: dict) -> bool:
        logger.info("push %s to driver %s", kind, driver_id)
        return True


def get_push_backend() -> PushBackend:
    return import_string(settings.PUSH_BACKEND)()
