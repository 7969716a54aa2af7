"""Travel estimates: great-circle distance × road factor ÷ typical speed per vehicle type.

The customer-facing ETA service (tracking) builds on these with a pluggable routing backend;
dispatch uses them directly because ranking must not wait on an HTTP router.
"""
from __future__ import annotations

import math
from datetime import datetime, timedelta

EARTH_RADIUS_KM = 6371.0088
ROAD_FACTOR = 1.3  # city streets are ~30 % longer than the straight line
SPEED_KMH = {"car": 25.0, "motorbike": 30.0, "scooter": 25.0, "bicycle": 15.0, "van": 20.0, "walking": 5.0}
HANDOVER_SECONDS = 120  # parking, stairs, handing over the order


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


def point_distance_km(a, b) -> float:
    """Distance between two GEOS points (x = lon, y = lat)."""
    return haversine_km(a.y, a.x, b.y, b.x)


def travel_seconds(distance_km: float, vehicle_type: str) -> float:
    speed = SPEED_KMH.get(vehicle_type, SPEED_KMH["car"])
    return distance_km * ROAD_FACTOR / speed * 3600.0


def remaining_prep_seconds(delivery, now: datetime) -> float:
    ready_by = delivery.ready_at + timedelta(minutes=delivery.prep_time_minutes or 0)
    return max(0.0, (ready_by - now).total_seconds())


def pickup_eta_seconds(*, delivery, distance_to_pickup_km: float, vehicle_type: str, now: datetime) -> float:
    """The driver drives while the order is being prepared: whichever takes longer."""
    return max(travel_seconds(distance_to_pickup_km, vehicle_type), remaining_prep_seconds(delivery, now))


def delivery_leg_km(delivery) -> float:
    return point_distance_km(delivery.pickup_location, delivery.dropoff_location)
