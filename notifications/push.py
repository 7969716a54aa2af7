"""Push to drivers' phones through Firebase Cloud Messaging's HTTP v1 API.

`FcmPushBackend` is a `PUSH_BACKEND` (offers.push): new offers (with their expiry as the
message's time to live), and `send_notice` for an offer withdrawn, a delivery taken away
(cancelled, or reassigned by ops) and a break that has ended.
It sends to every device the driver registered (`PushDevice`); a token FCM reports as no
longer valid (UNREGISTERED, SENDER_ID_MISMATCH, or an INVALID_ARGUMENT about the token) is
deleted. Credentials: a Google service account (`FCM_SERVICE_ACCOUNT_FILE`), exchanged for an
OAuth2 access token by `google-auth` (cached until it expires). Without them the logging
backend stays the default (PUSH_BACKEND)."""
from __future__ import annotations

import json
import logging
import threading
from datetime import datetime

import urllib3
from django.conf import settings
from django.utils import timezone
from google.auth.transport.urllib3 import Request as GoogleRequest
from google.oauth2 import service_account

from common.broadcast import enqueue_task_on_commit
from notifications.egress import post_json
from notifications.models import PushDevice

logger = logging.getLogger(__name__)

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
INVALID_TOKEN_CODES = {"UNREGISTERED", "SENDER_ID_MISMATCH"}

_credentials_lock = threading.Lock()
_credentials: dict[str, service_account.Credentials] = {}


class PushTransientError(Exception):
    """FCM could not take the message now (429, 5xx, unreachable): the task retries."""


def _access_token() -> str:
    path = settings.FCM_SERVICE_ACCOUNT_FILE
    with _credentials_lock:
        credentials = _credentials.get(path)
        if credentials is None:
            credentials = service_account.Credentials.from_service_account_file(path, scopes=[FCM_SCOPE])
            _credentials[path] = credentials
        if not credentials.valid:
            credentials.refresh(GoogleRequest(urllib3.PoolManager(timeout=settings.WEBHOOK_TIMEOUT_SECONDS)))
        return credentials.token


def _project_id() -> str:
    if settings.FCM_PROJECT_ID:
        return settings.FCM_PROJECT_ID
    with open(settings.FCM_SERVICE_ACCOUNT_FILE) as f:
        return json.load(f)["project_id"]


def _error_code(body: bytes) -> tuple[str, str]:
    """(FCM error code or status, message) of an error response."""
    try:
        error = json.loads(body or b"{}").get("error", {})
    except ValueError:
        return "", ""
    for detail in error.get("details", []):
        if detail.get("errorCode"):
            return detail["errorCode"], error.get("message", "")
    return error.get("status", ""), error.get("message", "")


class FcmPushBackend:
    method = "push"

    def send_offer(self, *, driver_id: str, event: dict) -> bool:
        expires = datetime.fromisoformat(event["expiresAt"].replace("Z", "+00:00"))
        ttl = max(int((expires - timezone.now()).total_seconds()), 0)
        pickup = event.get("pickup", {}) if isinstance(event.get("pickup"), dict) else {}
        body = f"{pickup.get('storeName') or 'A new delivery'}: answer within {ttl} s"
        data = {"type": "offer_created", "offerId": event["offerId"], "deliveryId": event.get("deliveryId", ""),
                "expiresAt": event["expiresAt"]}
        return self._send(driver_id=driver_id, title="New delivery offer", body=body, data=data, ttl=ttl)

    def send_notice(self, *, driver_id: str, kind: str, event: dict) -> bool:
        if kind == "offer_cancelled":
            title, body = "Offer withdrawn", "The delivery offer was withdrawn."
            data = {"type": kind, "offerId": event["offerId"], "reason": event.get("reason", "")}
        elif kind == "assignment_cancelled":
            reassigned = event.get("reason") == "reassigned"
            title = "Delivery reassigned" if reassigned else "Delivery cancelled"
            body = ("Ops took this delivery off you: do not pick it up." if reassigned
                    else "The delivery was cancelled: do not pick it up or deliver it.")
            data = {"type": kind, "deliveryId": event["deliveryId"], "assignmentId": event["assignmentId"],
                    "reason": event.get("reason", "")}
        elif kind == "break_expired":
            title, body = "Break over", "Your break has ended: you are available for offers again."
            data = {"type": kind, "expiredAt": event.get("expiredAt", "")}
        elif kind == "customer_replied":
            title = f"Customer of {event.get('sellerOrderId') or 'your delivery'}"
            body = event["body"].encode()[:PUSH_TEXT_BYTES].decode("utf-8", "ignore")  # (not cut inside a character)
            data = {"type": kind, "replyId": event["replyId"], "deliveryId": event.get("deliveryId") or ""}
        else:
            return False
        return self._send(driver_id=driver_id, title=title, body=body, data=data, ttl=300)

    def _send(self, *, driver_id: str, title: str, body: str, data: dict, ttl: int) -> bool:
        devices = list(PushDevice.objects.filter(driver_id=driver_id))
        if not devices:
            return False
        url = f"{settings.FCM_API_BASE.rstrip('/')}/v1/projects/{_project_id()}/messages:send"
        headers = {"Authorization": f"Bearer {_access_token()}", "Content-Type": "application/json; UTF-8"}
        delivered, transient = False, []
        for device in devices:
            message = {"message": {
                "token": device.token,
                "notification": {"title": title, "body": body},
                "data": {k: str(v) for k, v in data.items()},
                "android": {"priority": "high", "ttl": f"{ttl}s"},
                "apns": {"headers": {"apns-priority": "10", "apns-expiration": str(int(timezone.now().timestamp()) + ttl)}},
                "webpush": {"headers": {"TTL": str(ttl), "Urgency": "high"}},
            }}
            result = post_json(url, json.dumps(message).encode(), headers, timeout=settings.WEBHOOK_TIMEOUT_SECONDS, trusted=True)
            if result.status == 200:
                delivered = True
                continue
            code, text = _error_code(result.body)
            if code in INVALID_TOKEN_CODES or (code == "INVALID_ARGUMENT" and "token" in text.lower()):
                logger.info("push token of driver %s removed: %s", driver_id, code)
                PushDevice.objects.filter(pk=device.pk).delete()
            elif result.status is None or result.status == 429 or result.status >= 500:
                transient.append(result.error or f"HTTP {result.status}")
            else:
                logger.warning("push to driver %s refused: %s %s", driver_id, result.status, code or text)
        if not delivered and transient:
            raise PushTransientError("; ".join(transient))
        return delivered


NOTICE_TASK = "notifications.push_driver_notice"
NOTICE_EVENTS = ("offer_cancelled", "break_expired", "assignment_cancelled", "customer_replied")
# A customer's text in a notice, in UTF-8 bytes (FCM takes 4,096 in all; the whole text is in the
# socket's event and the driver's snapshot)
PUSH_TEXT_BYTES = 1000
NOTICE_KEEP_SECONDS = 60  # a notice whose publish failed is kept and sent this late at most


def push_notice_capture(event: dict) -> None:
    """The `common.hooks.on_event_emitted` handler: an offer withdrawn, a delivery taken away,
    a break ended or a customer's text is also pushed to the driver's phone, after commit, from
    a task."""
    if event.get("type") in NOTICE_EVENTS and event.get("driverId"):
        enqueue_task_on_commit(
            NOTICE_TASK, event["driverId"], event["type"], dict(event), durable_seconds=NOTICE_KEEP_SECONDS
        )
