"""Routing backends for the customer ETA: how far and how long one leg is on the road.

`ROUTING_BACKEND` picks one: `great_circle` (default, no I/O: dispatch/eta.py's distance ×
road factor ÷ speed per vehicle type) or `osrm` (an OSRM server at `OSRM_URL`), or a dotted
path to a class with the same `leg()` method. The OSRM backend never fails a caller: a timeout,
an HTTP error or an unusable answer falls back to the great-circle estimate, and after a
transport failure OSRM is skipped for `OSRM_COOLDOWN_SECONDS` so a dead router costs one
timeout per process per cooldown, not one per location fix. See docs/tracking.md.
"""
from __future__ import annotations

import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Protocol

from django.conf import settings
from django.utils.module_loading import import_string

from tracking import eta

logger = logging.getLogger(__name__)

LatLon = tuple[float, float]

# OSRM's `driving` profile times cars; for these we keep its road distance and use our speed.
UNMOTORISED = frozenset({"bicycle", "walking"})


@dataclass(frozen=True)
class Leg:
    distance_km: float  # on the road
    seconds: float
    source: str  # the backend that answered: "great_circle" or "osrm"


class RoutingBackend(Protocol):
    name: str
    # How much an estimate from this backend is trusted before fix age and accuracy (0–1).
    base_confidence: float

    def leg(self, *, origin: LatLon, destination: LatLon, vehicle_type: str) -> Leg: ...


class GreatCircleBackend:
    name = "great_circle"
    base_confidence = 0.8

    def leg(self, *, origin: LatLon, destination: LatLon, vehicle_type: str) -> Leg:
        km = eta.haversine_km(origin[0], origin[1], destination[0], destination[1])
        return Leg(distance_km=km * eta.ROAD_FACTOR, seconds=eta.travel_seconds(km, vehicle_type), source=self.name)


class RoutingError(Exception):
    pass


class OsrmBackend:
    """`GET {OSRM_URL}/route/v1/driving/{lon},{lat};{lon},{lat}?overview=false`."""

    name = "osrm"
    base_confidence = 0.9

    def __init__(
        self,
        *,
        url: str | None = None,
        timeout: float | None = None,
        cooldown: float | None = None,
        fallback: RoutingBackend | None = None,
    ):
        self.url = (url if url is not None else settings.OSRM_URL).rstrip("/")
        self.timeout = timeout if timeout is not None else settings.OSRM_TIMEOUT_SECONDS
        self.cooldown = cooldown if cooldown is not None else settings.OSRM_COOLDOWN_SECONDS
        self.fallback = fallback or GreatCircleBackend()
        self._down_until = 0.0
        self._lock = threading.Lock()

    def _request(self, origin: LatLon, destination: LatLon) -> dict:
        path = f"/route/v1/driving/{origin[1]:.6f},{origin[0]:.6f};{destination[1]:.6f},{destination[0]:.6f}"
        request = urllib.request.Request(self.url + path + "?overview=false", headers={"Accept": "application/json"})
        # The timeout bounds the connect and each read of the socket.
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            return json.loads(response.read(1_000_000))

    def leg(self, *, origin: LatLon, destination: LatLon, vehicle_type: str) -> Leg:
        if time.monotonic() < self._down_until:
            return self.fallback.leg(origin=origin, destination=destination, vehicle_type=vehicle_type)
        try:
            body = self._request(origin, destination)
        except urllib.error.HTTPError as exc:
            # OSRM answers 400 with {"code": "NoRoute"/"InvalidQuery"} for a bad leg: the router is
            # up, only this leg has no answer.
            logger.warning("OSRM answered %s; using the great-circle estimate", exc.code)
            return self.fallback.leg(origin=origin, destination=destination, vehicle_type=vehicle_type)
        except (OSError, ValueError) as exc:  # timeout, refused, reset, not JSON
            with self._lock:
                self._down_until = time.monotonic() + self.cooldown
            logger.warning("OSRM unavailable (%s); great-circle estimates for %ss", exc, self.cooldown)
            return self.fallback.leg(origin=origin, destination=destination, vehicle_type=vehicle_type)
        try:
            if body.get("code") != "Ok":
                raise RoutingError(body.get("code"))
            route = body["routes"][0]
            km = float(route["distance"]) / 1000.0
            seconds = float(route["duration"])
            if not (km >= 0 and seconds >= 0):
                raise RoutingError("negative route")
        except (RoutingError, KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            logger.warning("OSRM gave no usable route (%s); using the great-circle estimate", exc)
            return self.fallback.leg(origin=origin, destination=destination, vehicle_type=vehicle_type)
        if vehicle_type in UNMOTORISED:
            seconds = km / eta.SPEED_KMH[vehicle_type] * 3600.0
        return Leg(distance_km=km, seconds=seconds, source=self.name)


ALIASES = {"great_circle": "tracking.routing.GreatCircleBackend", "osrm": "tracking.routing.OsrmBackend"}

_backends: dict[str, RoutingBackend] = {}
_backends_lock = threading.Lock()


def get_routing_backend() -> RoutingBackend:
    """The configured backend, one instance per process (and per setting value, for tests)."""
    name = settings.ROUTING_BACKEND
    key = f"{name}|{settings.OSRM_URL}|{settings.OSRM_TIMEOUT_SECONDS}|{settings.OSRM_COOLDOWN_SECONDS}"
    backend = _backends.get(key)
    if backend is None:
        with _backends_lock:
            backend = _backends.get(key)
            if backend is None:
                backend = import_string(ALIASES.get(name, name))()
                _backends[key] = backend
    return backend
