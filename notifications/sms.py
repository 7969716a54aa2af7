"""SMS providers behind one small interface, chosen by `CUSTOMER_SMS_BACKEND`.

`send(to=E.164, body=…, message_id=our CustomerMessage id)` returns the provider's message id, or raises `SmsNotSent` (the
provider refused it, or we could not reach it: nothing was sent, it may be retried when
`retry` is true) or `SmsOutcomeUnknown` (it may have been sent: never retried, so a customer
gets a message at most once)."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Iterable
from urllib.parse import urlencode, urlsplit, urlunsplit

from django.conf import settings
from django.urls import reverse
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

    def send(self, *, to: str, body: str, message_id: str = "") -> str:
        message_id = f"console-{uuid.uuid4().hex[:12]}"
        logger.info("sms %s to %s: %r", message_id, to, body)  # repr: one log line whatever the body holds
        return message_id


class TwilioSmsBackend:
    """Twilio's Programmable Messaging REST API: `POST /2010-04-01/Accounts/{AccountSid}/
    Messages.json` (form fields To, From, Body; HTTP Basic auth with the account SID and auth
    token) answers 201 with the message resource (`sid`), or an error object `{code, message,
    status}`. `TWILIO_API_BASE` points elsewhere for tests (a local server answering alike)."""

    def send(self, *, to: str, body: str, message_id: str = "") -> str:
        sid, token = settings.TWILIO_ACCOUNT_SID, settings.TWILIO_AUTH_TOKEN
        if not (sid and token and settings.TWILIO_FROM_NUMBER):
            raise SmsNotSent("Twilio is not configured (TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN, TWILIO_FROM_NUMBER)", retry=False)
        url = f"{settings.TWILIO_API_BASE.rstrip('/')}/2010-04-01/Accounts/{sid}/Messages.json"
        fields = {"To": to, "From": settings.TWILIO_FROM_NUMBER, "Body": body}
        if settings.TWILIO_WEBHOOK_BASE_URL:  # (Twilio reports the message's fate there: notifications.api.twilio)
            # (our id in the URL, which the signature covers: a report may come before the
            # provider's id is written, and finds the message by it)
            fields["StatusCallback"] = settings.TWILIO_WEBHOOK_BASE_URL.rstrip("/") + reverse("twilio-sms-status") + (
                f"?message={message_id}" if message_id else "")
        form = urlencode(fields).encode()
        auth = base64.b64encode(f"{sid}:{token}".encode()).decode()
        result = post_json(url, form, {
            "Content-Type": "application/x-www-form-urlencoded", "Authorization": f"Basic {auth}", "Accept": "application/json",
        }, timeout=settings.WEBHOOK_TIMEOUT_SECONDS, trusted=True)
        if result.status is None:
            if not result.sent:  # never reached Twilio (the name, or a refused, unreachable or timed-out connect)
                raise SmsNotSent(result.error, retry=True)
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


def twilio_signature(token: str, url: str, params: Iterable[tuple[str, list[str]]]) -> str:
    """What Twilio puts in `X-Twilio-Signature`: HMAC-SHA1 with the account's auth token over
    the URL it called (query string included) followed by each form field, sorted by name, as
    name + value with nothing between (a field given several times: each value, sorted), in
    base64 (twilio.com/docs/usage/webhooks/webhooks-security)."""
    signed = url + "".join(name + value for name, values in sorted(params) for value in sorted(set(values)))
    return base64.b64encode(hmac.new(token.encode(), signed.encode(), hashlib.sha1).digest()).decode()


def twilio_request_signed(token: str, url: str, params: Iterable[tuple[str, list[str]]], signature: str) -> bool:
    """Whether `signature` is Twilio's for this request. The URL as called, and with its
    default port added or taken away (Twilio's own libraries accept both: a proxy may show
    either)."""
    if not token or not signature or not signature.isascii():  # (compare_digest refuses other str: a 500)
        return False
    params = [(name, list(values)) for name, values in params]
    return any(hmac.compare_digest(twilio_signature(token, candidate, params), signature) for candidate in _with_and_without_port(url))


def _with_and_without_port(url: str) -> list[str]:
    parts = urlsplit(url)
    default = {"https": 443, "http": 80}.get(parts.scheme)
    try:
        port = parts.port
    except ValueError:  # (a malformed port: only the URL as called)
        return [url]
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port == default:
        return [url, urlunsplit(parts._replace(netloc=host))]
    if port is None and default is not None:
        return [url, urlunsplit(parts._replace(netloc=f"{host}:{default}"))]
    return [url]


def get_sms_backend():
    return import_string(settings.CUSTOMER_SMS_BACKEND)()
