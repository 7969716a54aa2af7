"""SMS providers behind one small interface, chosen by `CUSTOMER_SMS_BACKEND`.

`send(to=E.164, body=…)` returns the provider's message id, or raises `SmsNotSent` (the
provider refused it, or we could not reach it: nothing was sent, it may be retried when
`retry` is true) or `SmsOutcomeUnknown` (it may have been sent: never retried, so a customer
gets a message at most once)."""
from __future__ import annotations

import base64
import json
import logging
import uuid
from urllib.parse import urlencode

from django.conf import settings
from django.utils.module_loading import import_string

from notifications.egress import post_json

logger = logging.getLogger(__name__)


class SmsNotSent(Exception):
    def __init__(self, message: str, *, retry: bool):
        super().__init__(message)
        self.retry = retry


class SmsOutcomeUnknown(Exception):
    pass


class SmsRecipientOptedOut(SmsNotSent):
    """The provider refused: the number has opted out (replied STOP). Never retried."""

    def __init__(self, message: str):
        super().__init__(message, retry=False)


# Twilio's error for a number that replied STOP (Advanced Opt-Out): "Attempt to send to
# unsubscribed recipient".
TWILIO_UNSUBSCRIBED = 21610


class ConsoleSmsBackend:
    """Development: the message goes to the log."""

    def send(self, *, to: str, body: str) -> str:
        message_id = f"console-{uuid.uuid4().hex[:12]}"
        logger.info("sms %s to %s: %r", message_id, to, body)  # repr: one log line whatever the body holds
        return message_id


class TwilioSmsBackend:
    """Twilio's Programmable Messaging REST API: `POST /2010-04-01/Accounts/{AccountSid}/
    Messages.json` (form fields To, From, Body; HTTP Basic auth with the account SID and auth
    token) answers 201 with the message resource (`sid`), or an error object `{code, message,
    status}`. `TWILIO_API_BASE` points elsewhere for tests (a local server answering alike)."""

    def send(self, *, to: str, body: str) -> str:
        sid, token = settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN
        if not (sid and token and settings.TWILIO_FROM_NUMBER):
            raise SmsNotSent("Twilio is not configured (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_FROM_NUMBER)", retry=False)
        url = f"{settings.TWILIO_API_BASE.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"
        form = urlencode({"To": to, "From": settings.TWILIO_FROM_NUMBER, "Body": body}).encode()
        auth = base64.b64encode(f"{sid}:{token}".encode()).decode()
        result = post_json(url, form, {
            "Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Basic {auth}", "Accept": "application/json",
        }, timeout=settings.WEBHOOK_TIMEOUT_SECONDS, trusted=True)
        if result.status is None:
            if "Refused" in result.error or "DNS" in result.error:
                raise SmsNotSent(result.error, retry=True)  # never reached Twilio
            raise SmsOutcomeUnknown(result.error)
        try:
            answer = json.loads(result.body or b"{}")
        except ValueError:
            answer = {}
        if result.status in (200, 201) and answer.get("sid"):
            return answer["sid"]
        message = f"HTTP {result.status}: {answer.get('code', '')} {answer.get('message', '')}".strip()
        if answer.get("code") == TWILIO_UNSUBSCRIBED:
            raise SmsRecipientOptedOut(message)
        if result.status == 429 or result.status >= 500:
            raise SmsNotSent(message, retry=True)
        raise SmsNotSent(message, retry=False)


def get_sms_backend():
    return import_string(settings.CUSTOMER_SMS_BACKEND)()
