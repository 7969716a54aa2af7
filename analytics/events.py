"""Live events of driver performance, as TypedDicts."""
from typing import Literal, TypedDict


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


EVENT_TYPES = ("driver_performance_updated",)
