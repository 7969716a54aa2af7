"""Helpers for the wire-convention tests (SPEC "Wire conventions"): a valid delivery body, the
error body checked field by field, posting with an Idempotency-Key, throttle rates, an ASGI
HTTP scope for driving the app without a client."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone as dt_timezone
from http import HTTPStatus

from django.utils import timezone

from dispatch.models import Delivery
from tests.api import assert_error

CLOSED_REDIS_URL = "redis://127.0.0.1:6399/0"  # nothing listens there
ERROR_KEYS = {"statusCode", "timestamp", "path", "message", "error", "details"}
MID_MINUTE = datetime(2026, 3, 2, 10, 0, 5, tzinfo=dt_timezone.utc)  # 55 s left in the window


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]] = (), port: int = 50000) -> dict:
    """The ASGI scope of one HTTP request to the app (headers as lower-case byte pairs)."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": list(headers), "client": ("127.0.0.1", port), "server": ("testserver", 80),
    }


def delivery_body(**overrides) -> dict:
    body = {
        "sellerOrderId": "ORD-CONV-1",
        "storeName": "Corner Shop",
        "pickupLocation": {"lat": 12.9716, "lon": 77.5946},
        "dropoffLocation": {"lat": 12.9916, "lon": 77.6046},
        "prepTimeMinutes": 10,
        "deliveryFee": "4.50",
        "autoDispatch": False,
    }
    body.update(overrides)
    return body


def assert_error_body(response, status: int, *, path: str, extra_keys: frozenset = frozenset()) -> dict:
    """The SPEC's error body, checked field by field."""
    body = assert_error(response, status)
    assert response["Content-Type"].startswith("application/json")
    assert set(body) <= ERROR_KEYS | extra_keys, set(body) - ERROR_KEYS
    assert body["error"] == HTTPStatus(status).phrase
    assert body["path"] == path
    assert isinstance(body["message"], str) and body["message"]
    stamp = datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00"))
    assert stamp.utcoffset() == timedelta(0)
    assert abs(stamp - timezone.now()) < timedelta(seconds=30)
    return body


def deliveries_of(user):
    return Delivery.objects.filter(created_by=user)


def post_delivery(client, body=None, *, key: str | None = None):
    extra = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post("/v2/deliveries", body if body is not None else delivery_body(), format="json", **extra)


def with_throttle_rates(settings, **rates) -> None:
    rest = dict(settings.REST_FRAMEWORK)
    rest["DEFAULT_THROTTLE_RATES"] = {**rest["DEFAULT_THROTTLE_RATES"], **rates}
    settings.REST_FRAMEWORK = rest
