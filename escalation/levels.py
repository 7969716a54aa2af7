"""Escalation levels: when each is due and how it is explained (no writes, no other app).

Shared by the selectors (which deliveries are due), the services and the escalation workflow.
"""
from __future__ import annotations

from datetime import datetime

from django.conf import settings

from common.exceptions import InvalidInput
from escalation.models import MAX_ESCALATION_LEVEL


class EscalationLevelExceeded(InvalidInput):
    """Seed: EscalationLevelExceededException (a 400 on the field `level`)."""

    def __init__(self, level: int):
        if level > MAX_ESCALATION_LEVEL:
            message = f"Escalation level {level} exceeded maximum allowed level"
        else:
            message = f"Escalation level must be between 1 and {MAX_ESCALATION_LEVEL}."
        super().__init__({"level": [message]})


def level_thresholds() -> dict[int, int]:
    """Seconds since the delivery became ready at which each level is due."""
    return {
        1: int(settings.ESCALATION_LEVEL1_SECONDS),
        2: int(settings.ESCALATION_LEVEL2_SECONDS),
        3: int(settings.ESCALATION_LEVEL3_SECONDS),
    }


def escalation_level_due(*, ready_at: datetime, now: datetime) -> int:
    waited = (now - ready_at).total_seconds()
    return max((level for level, seconds in level_thresholds().items() if waited >= seconds), default=0)


def threshold_reason(level: int) -> str:
    """The seed's reason codes: 5_min_unassigned, 15_min_unassigned, 30_min_unassigned."""
    seconds = level_thresholds()[level]
    return f"{seconds // 60}_min_unassigned" if seconds % 60 == 0 else f"{seconds}_s_unassigned"


def waited_minutes(delivery, now: datetime) -> int:
    """Whole minutes the delivery has been ready without a driver."""
    return max(0, int((now - delivery.ready_at).total_seconds() // 60))
