"""Standard Webhooks signatures (https://www.standardwebhooks.com): `webhook-id`,
`webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>`, made
with the `standardwebhooks` reference library. After a rotation the previous secret signs too
(space-separated signatures) until it expires, so receivers can switch over."""
from __future__ import annotations

import base64
import secrets
from datetime import datetime

from standardwebhooks.webhooks import Webhook

SECRET_PREFIX = "whsec_"


def secret_new() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def signed_headers(*, webhook_id: str, timestamp: datetime, body: str, secrets_: list[str]) -> dict[str, str]:
    signatures = " ".join(Webhook(s).sign(webhook_id, timestamp, body) for s in secrets_)
    return {
        "webhook-id": webhook_id,
        "webhook-timestamp": str(int(timestamp.timestamp())),
        "webhook-signature": signatures,
    }
