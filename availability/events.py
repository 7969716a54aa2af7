"""Live events of driver availability (seed: Availability Events)."""

from datetime import datetime, timezone
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


class DriverPosition(TypedDict):
    driverId: str
    lat: float
    lon: float
    heading: float | None
    availability: str | None
    availabilityChangedAt: str | None
    recordedAt: str


class DriverPositionsEvent(TypedDict):
    """Ops: every driver that moved in the last second, in one message (the live map's feed;
    one message per fix would not scale to a fleet)."""

    type: Literal["driver_positions"]
    drivers: list[DriverPosition]
    sentAt: str


EVENT_TYPES = ("availability_changed", "break_expired", "driver_positions")


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


def driver_positions(moved: dict[str, str], *, sent_at) -> DriverPositionsEvent:
    """From availability.live.moved_drain(): driver id → "lat,lon,t,heading,status,status since".
    `availabilityChangedAt`: when that availability began (null when unknown), to be compared
    with an `availability_changed` event's `changedAt`: the newer one is the driver's state."""
    drivers: list[DriverPosition] = []
    for driver_id, packed in moved.items():
        lat, lon, t, heading, status, since = (packed.split(",") + [""] * 6)[:6]
        drivers.append({
            "driverId": driver_id,
            "lat": round(float(lat), 7),
            "lon": round(float(lon), 7),
            "heading": float(heading) if heading else None,
            "availability": status or None,
            "availabilityChangedAt": iso(datetime.fromtimestamp(float(since), tz=timezone.utc)) if since else None,
            "recordedAt": iso(datetime.fromtimestamp(float(t), tz=timezone.utc)),
        })
    return {"type": "driver_positions", "drivers": drivers, "sentAt": iso(sent_at)}
