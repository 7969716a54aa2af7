"""Live events of customer tracking, as TypedDicts and their builders."""
from typing import Literal, NotRequired, TypedDict

from common.errors import iso

# Customer tracking (seed "ETA & Tracking Events"; docs/tracking.md). Sent to the delivery's
# group (its customer sockets) and to ops.

# The accuracy of a fix sent without one (`accuracyMeters` is optional on the location
# endpoint): what the customer's payloads show (the seed types it as a number; it was null) and
# what the ETA's confidence counts.
UNKNOWN_ACCURACY_M = 100.0


def accuracy_shown(accuracy_m: float | None) -> float:
    return UNKNOWN_ACCURACY_M if accuracy_m is None else accuracy_m


class TrackedLocation(TypedDict):
    lat: float
    lon: float
    accuracyMeters: float


class DeliveryLocationUpdatedEvent(TypedDict):
    type: Literal["delivery_location_updated"]
    deliveryId: str
    location: TrackedLocation
    speed: NotRequired[float]  # km/h (fixes carry m/s)
    heading: NotRequired[float]  # degrees
    updatedAt: str  # when the fix was recorded


class DeliveryEtaUpdatedEvent(TypedDict):
    type: Literal["delivery_eta_updated"]
    deliveryId: str
    estimatedPickupTime: str
    estimatedDeliveryTime: str
    confidence: float
    updatedAt: str


def delivery_location_updated(
    *, delivery_id, lat: float, lon: float, accuracy_m: float | None, speed_mps: float | None,
    heading: float | None, recorded_at,
) -> DeliveryLocationUpdatedEvent:
    event: DeliveryLocationUpdatedEvent = {
        "type": "delivery_location_updated",
        "deliveryId": str(delivery_id),
        "location": {"lat": round(lat, 7), "lon": round(lon, 7), "accuracyMeters": accuracy_shown(accuracy_m)},
        "updatedAt": iso(recorded_at),
    }
    if speed_mps is not None:
        event["speed"] = round(speed_mps * 3.6, 1)
    if heading is not None:
        event["heading"] = heading
    return event


def delivery_eta_updated(*, delivery_id, pickup_at, delivery_at, confidence: float, calculated_at) -> DeliveryEtaUpdatedEvent:
    return {
        "type": "delivery_eta_updated",
        "deliveryId": str(delivery_id),
        "estimatedPickupTime": iso(pickup_at),
        "estimatedDeliveryTime": iso(delivery_at),
        "confidence": confidence,
        "updatedAt": iso(calculated_at),
    }


EVENT_TYPES = ("delivery_location_updated", "delivery_eta_updated")
