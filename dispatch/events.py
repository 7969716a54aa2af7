"""Live events of deliveries, for `/ws/ops/` and the delivery's own group."""

from typing import Literal, NotRequired, TypedDict

from common.errors import iso
from common.fields import point_json


class LatLon(TypedDict):
    lat: float
    lon: float


class DeliveryCreatedEvent(TypedDict):
    type: Literal["delivery_created"]
    deliveryId: str
    sellerOrderId: str
    storeName: str
    status: str
    zoneId: str | None
    pickupLocation: LatLon
    dropoffLocation: LatLon
    createdAt: str


class DeliveryStatusChangedEvent(TypedDict):
    type: Literal["delivery_status_changed"]
    deliveryId: str
    sellerOrderId: str
    fromStatus: str
    status: str
    driverId: str | None
    reason: NotRequired[str]
    changedAt: str


class DeliveryCancelledEvent(TypedDict):
    type: Literal["delivery_cancelled"]
    deliveryId: str
    sellerOrderId: str
    fromStatus: str
    reason: str
    cancelledAt: str


def delivery_created(delivery) -> DeliveryCreatedEvent:
    return {
        "type": "delivery_created",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "storeName": delivery.store_name,
        "status": delivery.status,
        "zoneId": str(delivery.zone_id) if getattr(delivery, "zone_id", None) else None,
        "pickupLocation": point_json(delivery.pickup_location),
        "dropoffLocation": point_json(delivery.dropoff_location),
        "createdAt": iso(delivery.created_at),
    }


def delivery_status_changed(delivery, *, from_status: str, driver_id, changed_at, reason: str = "") -> DeliveryStatusChangedEvent:
    event: DeliveryStatusChangedEvent = {
        "type": "delivery_status_changed",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "fromStatus": from_status,
        "status": delivery.status,
        "driverId": str(driver_id) if driver_id else None,
        "changedAt": iso(changed_at),
    }
    if reason:
        event["reason"] = reason
    return event


def delivery_cancelled(delivery, *, from_status: str, reason: str, cancelled_at) -> DeliveryCancelledEvent:
    return {
        "type": "delivery_cancelled",
        "deliveryId": str(delivery.pk),
        "sellerOrderId": delivery.seller_order_id,
        "fromStatus": from_status,
        "reason": reason,
        "cancelledAt": iso(cancelled_at),
    }


# Customer tracking (seed "ETA & Tracking Events"; docs/tracking.md). Sent to the delivery's
# group (its customer sockets) and to ops.


class TrackedLocation(TypedDict):
    lat: float
    lon: float
    accuracyMeters: float | None


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
        "location": {"lat": round(lat, 7), "lon": round(lon, 7), "accuracyMeters": accuracy_m},
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


class PerformanceMetrics(TypedDict):
    deliveriesCompleted: int
    acceptanceRate: float
    onTimeRate: float
    customerRating: float
    avgResponseTimeMs: int
    totalEarnings: float


class DriverPerformanceUpdatedEvent(TypedDict):
    type: Literal["driver_performance_updated"]
    driverId: str
    driverName: str
    metrics: PerformanceMetrics
    updatedAt: str


EVENT_TYPES = (
    "delivery_created", "delivery_status_changed", "delivery_cancelled", "delivery_location_updated",
    "delivery_eta_updated", "driver_performance_updated",
)
