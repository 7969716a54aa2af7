"""The route of a driver carrying several deliveries (order stacking, docs/dispatch.md): when
each is picked up and dropped off, with the routing backend of the customer ETA (the same legs
and speeds). Pure: deliveries, position and clock in, times out.

The model, kept simple on purpose: the driver first collects every order it has not picked up
yet, in the order they were assigned (waiting at the store while one is still being prepared),
then drops them off in that same order (first assigned, first delivered: a customer is never
made to wait for a later order's door). With one delivery this is the single-delivery ETA of
`tracking.services.eta_compute`.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from dispatch.models import DeliveryStatus as S
from tracking import eta
from tracking.routing import RoutingBackend, get_routing_backend

# Not yet collected: the driver goes to the store first.
TO_COLLECT = (S.READY, S.ASSIGNED)


@dataclass(frozen=True)
class StopTimes:
    pickup_at: datetime
    delivery_at: datetime


@dataclass(frozen=True)
class Route:
    times: dict  # delivery id → StopTimes
    end_at: datetime  # the last handover done
    source: str  # the backend that answered every leg, or "mixed"


def _latlon(point) -> tuple[float, float]:
    return (point.y, point.x)


def route_plan(
    deliveries: list, *, vehicle_type: str, driver_lat: float, driver_lon: float, now: datetime,
    backend: RoutingBackend | None = None,
) -> Route:
    """`deliveries` in the order they were assigned (a candidate last)."""
    backend = backend or get_routing_backend()
    position, t, sources = (driver_lat, driver_lon), now, set()
    pickups: dict = {}
    for d in deliveries:
        if d.status in TO_COLLECT:
            leg = backend.leg(origin=position, destination=_latlon(d.pickup_location), vehicle_type=vehicle_type)
            sources.add(leg.source)
            t = max(t + timedelta(seconds=leg.seconds), now + timedelta(seconds=eta.remaining_prep_seconds(d, now)))
            position = _latlon(d.pickup_location)
            pickups[d.pk] = t
        else:
            pickups[d.pk] = d.picked_up_at or now
    times = {}
    for d in deliveries:
        leg = backend.leg(origin=position, destination=_latlon(d.dropoff_location), vehicle_type=vehicle_type)
        sources.add(leg.source)
        t = t + timedelta(seconds=leg.seconds + eta.HANDOVER_SECONDS)
        position = _latlon(d.dropoff_location)
        times[d.pk] = StopTimes(pickup_at=pickups[d.pk], delivery_at=t)
    source = sources.pop() if len(sources) == 1 else ("mixed" if sources else backend.name)
    return Route(times=times, end_at=t, source=source)


def stacking_detour_seconds(
    carried: list, candidate, *, vehicle_type: str, driver_lat: float, driver_lon: float, now: datetime,
    backend: RoutingBackend | None = None,
) -> float:
    """How much later the driver finishes with `candidate` stacked onto `carried` (assigned
    order): any wait for the order at the store, the pickup stop, and the leg from the last
    drop-off to its drop-off with the handover. Every carried customer is delayed by at most
    this (by the pickup part only: their drop-offs come first)."""
    backend = backend or get_routing_backend()
    kwargs = dict(vehicle_type=vehicle_type, driver_lat=driver_lat, driver_lon=driver_lon, now=now, backend=backend)
    before = route_plan(carried, **kwargs)
    after = route_plan([*carried, candidate], **kwargs)
    return (after.end_at - before.end_at).total_seconds()
