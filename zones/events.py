"""Live events of zones (seed: Analytics Events → zone_health_updated) and the ZoneHealth shape."""

from typing import Literal, TypedDict


class ZoneHealth(TypedDict):
    """The seed's ZoneHealth: what `zone:health:{id}` holds and `GET /v2/zones/{id}/health` returns."""

    zoneId: str
    currentDriversOnline: int
    minDriversRequired: int
    avgWaitTimeSeconds: int
    targetWaitTimeSeconds: int
    demandLevel: int
    healthScore: int
    updatedAt: str


class ZoneHealthMetrics(TypedDict):
    currentDriversOnline: int
    minDriversRequired: int
    avgWaitTimeSeconds: int
    targetWaitTimeSeconds: int
    demandLevel: int  # 1-10
    healthScore: int  # 0-100


class ZoneHealthUpdatedEvent(TypedDict):
    type: Literal["zone_health_updated"]
    zoneId: str
    zoneName: str
    metrics: ZoneHealthMetrics
    updatedAt: str


def zone_health_updated(*, zone_name: str, health: ZoneHealth) -> ZoneHealthUpdatedEvent:
    return {
        "type": "zone_health_updated",
        "zoneId": health["zoneId"],
        "zoneName": zone_name,
        "metrics": {
            "currentDriversOnline": health["currentDriversOnline"],
            "minDriversRequired": health["minDriversRequired"],
            "avgWaitTimeSeconds": health["avgWaitTimeSeconds"],
            "targetWaitTimeSeconds": health["targetWaitTimeSeconds"],
            "demandLevel": health["demandLevel"],
            "healthScore": health["healthScore"],
        },
        "updatedAt": health["updatedAt"],
    }


EVENT_TYPES = ("zone_health_updated",)
