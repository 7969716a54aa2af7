from __future__ import annotations

from datetime import datetime
from typing import Any

from django.utils import timezone

from audit.models import DeliveryAuditLog
from common.actors import Actor


def audit_record(
    *, delivery, event_type: str, actor: Actor, details: dict[str, Any] | None = None, now: datetime | None = None
) -> DeliveryAuditLog:
    """Append one audit row. Call it inside the transaction that makes the change."""
    return DeliveryAuditLog.objects.create(
        delivery=delivery,
        timestamp=now or timezone.now(),
        event_type=event_type,
        actor_id=actor.id,
        actor_type=actor.type,
        details=details or {},
    )
