"""Live events of driver availability (seed: Availability Events)."""

from typing import Literal, NotRequired, TypedDict

from common.errors import iso


class AvailabilityChangedEvent(TypedDict):
    type: Literal["availability_changed"]
    driverId: str
    fromState: str
    toState: str
    reason: NotRequired[str]
    until: NotRequired[str]
    changedAt: str


class BreakExpiredEvent(TypedDict):
    type: Literal["break_expired"]
    driverId: str
    breakDurationMinutes: int
    expiredAt: str


EVENT_TYPES = ("availability_changed", "break_expired")


def availability_changed(*, driver_id, from_state, to_state, reason, until, changed_at) -> AvailabilityChangedEvent:
    event: AvailabilityChangedEvent = {
        "type": "availability_changed",
        "driverId": str(driver_id),
        "fromState": from_state,
        "toState": to_state,
        "changedAt": iso(changed_at),
    }
    if reason:
        event["reason"] = reason
    if until is not None:
        event["until"] = iso(until)
    return event


def break_expired(*, driver_id, duration_minutes: int, expired_at) -> BreakExpiredEvent:
    return {
        "type": "break_expired",
        "driverId": str(driver_id),
        "breakDurationMinutes": int(duration_minutes),
        "expiredAt": iso(expired_at),
    }
