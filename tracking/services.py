"""Customer ETA: both legs of an assigned delivery from its driver's last fix, stored on the
delivery and pushed to the delivery's group (docs/tracking.md).

- `eta_compute` is pure: (delivery, driver fix, now, routing backend) → `Eta`.
- `delivery_eta_refresh` reads the assignment, delivery and driver in one query, and when the
  new ETA changed meaningfully from the stored one (either time moved by
  `ETA_CHANGE_THRESHOLD_SECONDS` or more, or the confidence by `ETA_CONFIDENCE_THRESHOLD` or
  more, or there was none before) stores it and emits `delivery_eta_updated`; otherwise it
  stores only the calculation time. Both with one conditional UPDATE (never over a newer one).
  So the stored times are always the ones the customer was last told, and an estimate that
  slips a little at every recompute (a driver stuck in traffic) is announced once it has
  slipped by the threshold in all, not never.
- `delivery_track_fix` is what the location hot path calls, after commit, for a driver with an
  active assignment: `delivery_location_updated` for every accepted fix, and an ETA refresh at
  most every `ETA_MIN_INTERVAL_SECONDS` per delivery, or sooner once the driver has moved
  `ETA_MIN_MOVE_METERS` from where the last one was computed. The throttle is one Redis script
  call (no database read); with Redis down the delivery's `eta_calculated_at` throttles instead.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta

import redis
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Avg, OuterRef, Q, Subquery
from django.utils import timezone

from availability.models import Driver
from common.broadcast import OPS_GROUP, OPS_LOCATIONS_GROUP, broadcast_on_commit, delivery_group, send_now
from common.exceptions import Conflict, NotFound
from common.redis import RedisUnavailable, evalsha_many, get_redis
from dispatch.models import Assignment, AssignmentStatus, Delivery
from dispatch.models import DeliveryStatus as S
from tracking import eta, events, selectors
from tracking.models import DeliveryRating
from tracking.route import route_plan
from tracking.routing import Leg, RoutingBackend, get_routing_backend

logger = logging.getLogger(__name__)

TRACKED_STATUSES = (S.ASSIGNED, S.PICKED_UP, S.IN_TRANSIT)
# The ETA refreshes after status changes wait here (delivery id → the change's time) for one
# task to take them all (`common.broadcast.enqueue_due_on_commit`, `workflows.unit.eta_refresh_enqueue`).
ETA_DUE_KEY = "{eta}:due"  # hash-tagged: its `:taken` twin (common.broadcast.taken_key) shares the slot
ETA_REFRESH_DUE_TASK = "tracking.refresh_due_etas"
ETA_REFRESH_TASK = "tracking.refresh_eta"  # one delivery's: when Redis is down, and messages queued before

# Confidence falls with the age of the fix and with its reported accuracy: each factor is 1
# up to the grace value and halves at grace + half-life.
FIX_AGE_GRACE_S, FIX_AGE_HALF_LIFE_S = 30.0, 300.0
ACCURACY_GRACE_M, ACCURACY_HALF_LIFE_M = 25.0, 250.0
MIN_CONFIDENCE = 0.05


@dataclass(frozen=True)
class Eta:
    pickup_at: datetime
    delivery_at: datetime
    confidence: float
    calculated_at: datetime


def fix_confidence(*, base: float, fix_age_s: float, accuracy_m: float | None) -> float:
    age_factor = 1.0 / (1.0 + max(0.0, fix_age_s - FIX_AGE_GRACE_S) / FIX_AGE_HALF_LIFE_S)
    acc = events.UNKNOWN_ACCURACY_M if accuracy_m is None else accuracy_m
    accuracy_factor = 1.0 / (1.0 + max(0.0, acc - ACCURACY_GRACE_M) / ACCURACY_HALF_LIFE_M)
    return round(max(MIN_CONFIDENCE, min(1.0, base * age_factor * accuracy_factor)), 2)


def _latlon(point) -> tuple[float, float]:
    return (point.y, point.x)


# The pickup → dropoff leg does not change during a delivery: remember the last few thousand.
_LEG_CACHE_SIZE = 4096
_leg_cache: OrderedDict[tuple, Leg] = OrderedDict()


def _fixed_leg(backend: RoutingBackend, delivery: Delivery, vehicle_type: str) -> Leg:
    key = (backend.name, _latlon(delivery.pickup_location), _latlon(delivery.dropoff_location), vehicle_type)
    leg = _leg_cache.get(key)
    if leg is None:
        leg = backend.leg(origin=key[1], destination=key[2], vehicle_type=vehicle_type)
        if leg.source == backend.name:  # do not remember a fallback answer
            _leg_cache[key] = leg
            while len(_leg_cache) > _LEG_CACHE_SIZE:
                _leg_cache.popitem(last=False)
    return leg


def eta_compute(
    *, delivery: Delivery, vehicle_type: str, driver_lat: float, driver_lon: float,
    fix_recorded_at: datetime | None, accuracy_m: float | None, now: datetime, backend: RoutingBackend | None = None,
    stack: list | None = None,
) -> Eta | None:
    """Both legs from the driver's position; None unless the delivery is assigned or under way.

    Assigned: pickup = now + max(drive to the store, remaining prep); delivery = pickup + the
    store → dropoff leg + handover. Picked up / in transit: pickup is when it happened;
    delivery = now + drive to the dropoff + handover. `stack`: every delivery the driver
    carries (order stacking), in the order assigned: the times are those of the driver's route
    through all of them (`tracking.route`: the pickups not yet made, then the drop-offs in
    that order), so a stacked delivery's ETA counts the drop-offs before it."""
    backend = backend or get_routing_backend()
    driver = (driver_lat, driver_lon)
    if delivery.status not in TRACKED_STATUSES:
        return None
    if stack and len(stack) > 1 and any(d.pk == delivery.pk for d in stack):
        route = route_plan(stack, vehicle_type=vehicle_type, driver_lat=driver_lat, driver_lon=driver_lon, now=now, backend=backend)
        pickup_at, delivery_at = route.times[delivery.pk].pickup_at, route.times[delivery.pk].delivery_at
        source = route.source
    elif delivery.status == S.ASSIGNED:
        to_store = backend.leg(origin=driver, destination=_latlon(delivery.pickup_location), vehicle_type=vehicle_type)
        pickup_s = max(to_store.seconds, eta.remaining_prep_seconds(delivery, now))
        pickup_at = now + timedelta(seconds=round(pickup_s))
        leg = _fixed_leg(backend, delivery, vehicle_type)
        delivery_at = pickup_at + timedelta(seconds=round(leg.seconds + eta.HANDOVER_SECONDS))
        source = to_store.source if to_store.source == leg.source else "mixed"
    elif delivery.status in (S.PICKED_UP, S.IN_TRANSIT):
        to_door = backend.leg(origin=driver, destination=_latlon(delivery.dropoff_location), vehicle_type=vehicle_type)
        pickup_at = delivery.picked_up_at or now
        delivery_at = now + timedelta(seconds=round(to_door.seconds + eta.HANDOVER_SECONDS))
        source = to_door.source
    else:
        return None
    # A fallback answer is trusted as much as the fallback backend, not the configured one.
    base = backend.base_confidence if source == backend.name else getattr(
        getattr(backend, "fallback", None), "base_confidence", backend.base_confidence
    )
    age_s = max(0.0, (now - fix_recorded_at).total_seconds()) if fix_recorded_at else FIX_AGE_GRACE_S + 3600
    return Eta(
        pickup_at=pickup_at,
        delivery_at=delivery_at,
        confidence=fix_confidence(base=base, fix_age_s=age_s, accuracy_m=accuracy_m),
        calculated_at=now,
    )


def driver_stack(driver_id) -> list[Delivery]:
    """The deliveries a driver carries (order stacking), in the order they were assigned."""
    return [
        a.delivery for a in Assignment.objects.select_related("delivery")
        .filter(driver_id=driver_id, status=AssignmentStatus.ACTIVE).order_by("created_at", "id")
    ]


def eta_changed_meaningfully(*, old: Eta | None, new: Eta) -> bool:
    if old is None:
        return True
    threshold = settings.ETA_CHANGE_THRESHOLD_SECONDS
    return (
        abs((new.pickup_at - old.pickup_at).total_seconds()) >= threshold
        or abs((new.delivery_at - old.delivery_at).total_seconds()) >= threshold
        or abs(new.confidence - old.confidence) >= settings.ETA_CONFIDENCE_THRESHOLD - 1e-9
    )


def stored_eta(delivery: Delivery) -> Eta | None:
    if delivery.eta_calculated_at is None or delivery.eta_pickup_at is None or delivery.eta_delivery_at is None:
        return None
    return Eta(
        pickup_at=delivery.eta_pickup_at,
        delivery_at=delivery.eta_delivery_at,
        confidence=delivery.eta_confidence or 0.0,
        calculated_at=delivery.eta_calculated_at,
    )


def delivery_eta_refresh(
    *, delivery_id, now: datetime | None = None, not_since: datetime | None = None, force_event: bool = False
) -> Eta | None:
    """Recompute and store the ETA of an assigned or under-way delivery from its driver's last
    fix; returns it, or None when there is nothing to compute or a newer one is stored. The
    times and confidence are stored only with an event (see the module's docstring); a
    recompute that moved nothing by the thresholds stores its calculation time.

    `not_since`: only when the stored one was calculated before then (the throttle when Redis
    is down). No row lock and no transaction of its own: the write is one conditional UPDATE
    that never replaces a newer ETA or writes over a status change; the event follows it (after
    the caller's commit, if it has a transaction open)."""
    now = now or timezone.now()
    assignment = (
        Assignment.objects.select_related("delivery", "driver")
        .filter(delivery_id=delivery_id, status=AssignmentStatus.ACTIVE)
        .first()
    )
    if assignment is None:
        return None
    delivery, driver = assignment.delivery, assignment.driver
    if delivery.status not in TRACKED_STATUSES or driver.location is None:
        return None
    if not_since is not None and delivery.eta_calculated_at is not None and delivery.eta_calculated_at >= not_since:
        return None
    new = eta_compute(
        delivery=delivery, vehicle_type=driver.vehicle_type, driver_lat=driver.location.y, driver_lon=driver.location.x,
        fix_recorded_at=driver.location_recorded_at, accuracy_m=driver.location_accuracy_m, now=now,
        stack=driver_stack(driver.pk) if driver.active_assignments > 1 else None,
    )
    if new is None:
        return None
    announce = force_event or eta_changed_meaningfully(old=stored_eta(delivery), new=new)
    fields = {"eta_calculated_at": new.calculated_at}
    if announce:
        fields.update(eta_pickup_at=new.pickup_at, eta_delivery_at=new.delivery_at, eta_confidence=new.confidence)
    updated = (
        Delivery.objects.filter(pk=delivery.pk, status=delivery.status)
        .filter(Q(eta_calculated_at__isnull=True) | Q(eta_calculated_at__lte=now))
        .update(**fields)
    )
    if not updated:
        return None
    if announce:
        event = events.delivery_eta_updated(
            delivery_id=delivery.pk, pickup_at=new.pickup_at, delivery_at=new.delivery_at,
            confidence=new.confidence, calculated_at=new.calculated_at,
        )
        # (ops too after a status change: SPEC, /ws/ops/ gets every event the customers get)
        broadcast_on_commit([delivery_group(delivery.pk), OPS_GROUP], event)
    return new


# The ETAs of several deliveries in one statement: each row only if the delivery still has the
# status its ETA was computed for and no newer ETA is stored (as `delivery_eta_refresh`'s
# UPDATE). The rows are locked in pk order first, so that two consumers' batches (a driver's
# fixes may go to either) cannot deadlock; `FOR NO KEY UPDATE`, the lock the UPDATE itself
# takes, so an insert that references a delivery (its `FOR KEY SHARE`) is not held up.
_BATCH_ETA_SQL = f"""
WITH v (id, status, pickup_at, delivery_at, confidence, calculated_at, announce) AS (
    SELECT * FROM unnest(%s::uuid[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::float8[], %s::timestamptz[],
                         %s::bool[])
),
locked AS (
    SELECT d.id FROM {Delivery._meta.db_table} d JOIN v ON v.id = d.id
    WHERE d.status = v.status AND (d.eta_calculated_at IS NULL OR d.eta_calculated_at <= v.calculated_at)
    ORDER BY d.id FOR NO KEY UPDATE OF d
)
UPDATE {Delivery._meta.db_table} d
SET eta_pickup_at = CASE WHEN v.announce THEN v.pickup_at ELSE d.eta_pickup_at END,
    eta_delivery_at = CASE WHEN v.announce THEN v.delivery_at ELSE d.eta_delivery_at END,
    eta_confidence = CASE WHEN v.announce THEN v.confidence ELSE d.eta_confidence END,
    eta_calculated_at = v.calculated_at
FROM v, locked
WHERE d.id = v.id AND locked.id = d.id AND d.status = v.status
    AND (d.eta_calculated_at IS NULL OR d.eta_calculated_at <= v.calculated_at)
RETURNING d.id
"""


# What `eta_compute` and the stored ETA read of an assignment's delivery and driver (a batch
# reads only these; `tests/tracking/test_eta_batch.py` counts the statements, so a field read
# that is not here, loaded row by row, would show).
_ETA_FIELDS = (
    "delivery_id", "driver_id",
    *(f"delivery__{f}" for f in ("status", "pickup_location", "dropoff_location", "picked_up_at", "ready_at",
                                 "prep_time_minutes", "eta_pickup_at", "eta_delivery_at", "eta_confidence",
                                 "eta_calculated_at")),
    *(f"driver__{f}" for f in ("vehicle_type", "location", "location_recorded_at", "location_accuracy_m",
                               "active_assignments")),
)


def deliveries_eta_refresh(*, due: dict[str, datetime | None], now: datetime) -> dict[str, Eta]:
    """`delivery_eta_refresh` of several deliveries at once (a batch of fixes): one read of
    their assignments, deliveries and drivers, one UPDATE, and the events of those whose ETA
    changed meaningfully emitted in the order of `due`. `due`: delivery id → its `not_since`
    (None: none). Returns the ETAs computed and recorded (as `delivery_eta_refresh`: the
    times only with an event), by delivery id.

    Open a transaction around it with the event batch and the outbox buffer (a workflow's
    `unit_of_work`), so that the events go out together and their outbox rows are one INSERT;
    the UPDATE then holds the rows it changed (locked in pk order) until that commits."""
    if not due:
        return {}
    assignments = {
        str(a.delivery_id): a for a in Assignment.objects.select_related("delivery", "driver")
        .filter(delivery_id__in=list(due), status=AssignmentStatus.ACTIVE).only(*_ETA_FIELDS)
    }
    stacks: dict = {}
    computed: list[tuple[Delivery, Eta]] = []
    for delivery_id, not_since in due.items():
        assignment = assignments.get(str(delivery_id))
        if assignment is None:
            continue
        delivery, driver = assignment.delivery, assignment.driver
        if delivery.status not in TRACKED_STATUSES or driver.location is None:
            continue
        if not_since is not None and delivery.eta_calculated_at is not None and delivery.eta_calculated_at >= not_since:
            continue
        stack = None
        if driver.active_assignments > 1:
            if driver.pk not in stacks:
                stacks[driver.pk] = driver_stack(driver.pk)
            stack = stacks[driver.pk]
        new = eta_compute(
            delivery=delivery, vehicle_type=driver.vehicle_type, driver_lat=driver.location.y,
            driver_lon=driver.location.x, fix_recorded_at=driver.location_recorded_at,
            accuracy_m=driver.location_accuracy_m, now=now, stack=stack,
        )
        if new is not None:
            computed.append((delivery, new, eta_changed_meaningfully(old=stored_eta(delivery), new=new)))
    if not computed:
        return {}
    params = [[d.pk for d, _, _ in computed], [d.status for d, _, _ in computed],
              [e.pickup_at for _, e, _ in computed], [e.delivery_at for _, e, _ in computed],
              [e.confidence for _, e, _ in computed], [e.calculated_at for _, e, _ in computed],
              [announce for _, _, announce in computed]]
    with connection.cursor() as cur:
        cur.execute(_BATCH_ETA_SQL, params)
        updated = {row[0] for row in cur.fetchall()}
    stored = {}
    for delivery, new, announce in computed:
        if delivery.pk not in updated:
            continue
        stored[str(delivery.pk)] = new
        if announce:
            broadcast_on_commit([delivery_group(delivery.pk), OPS_GROUP], events.delivery_eta_updated(
                delivery_id=delivery.pk, pickup_at=new.pickup_at, delivery_at=new.delivery_at,
                confidence=new.confidence, calculated_at=new.calculated_at,
            ))
    return stored


def eta_refresh_on_commit(delivery_id, *, now: datetime | None = None) -> None:
    """After the current transaction commits (a status change): refresh the ETA and tell the
    customer, whether or not the times moved, since the legs it covers have changed."""

    def run():
        try:
            delivery_eta_refresh(delivery_id=delivery_id, now=now or timezone.now(), force_event=True)
        except Exception:
            logger.warning("ETA refresh of delivery %s failed", delivery_id, exc_info=True)

    transaction.on_commit(run, robust=True)


# ------------------------------------------------------------------------- throttle

THROTTLE_KEY = "eta:last:{}"
THROTTLE_TTL_SECONDS = 6 * 3600

# Claim the right to recompute one delivery's ETA: yes when there was no computation yet, when
# the last one is ETA_MIN_INTERVAL_SECONDS old, or when the driver has moved ETA_MIN_MOVE_METERS
# from where it was made (equirectangular distance: exact enough at these ranges).
_THROTTLE_SCRIPT = """
local t, lat, lon = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local interval, min_move = tonumber(ARGV[4]), tonumber(ARGV[5])
local prev = redis.call('HMGET', KEYS[1], 't', 'lat', 'lon')
if prev[1] then
  local elapsed = t - tonumber(prev[1])
  if elapsed < interval then
    local k = math.pi / 180
    local dy = (lat - tonumber(prev[2])) * k
    local dx = (lon - tonumber(prev[3])) * k * math.cos(lat * k)
    if 6371008.8 * math.sqrt(dx * dx + dy * dy) < min_move then return 0 end
  end
end
redis.call('HSET', KEYS[1], 't', ARGV[1], 'lat', ARGV[2], 'lon', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
return 1
"""
_throttle_scripts: dict[int, object] = {}


def eta_recompute_due(*, delivery_id, lat: float, lon: float, now: datetime) -> bool | None:
    """True when this fix should recompute the ETA (and claims it), False when throttled, None
    when Redis cannot say (the caller falls back to the stored calculation time)."""
    try:
        client = get_redis()
        script = _throttle_scripts.get(id(client))
        if script is None:
            script = _throttle_scripts.setdefault(id(client), client.register_script(_THROTTLE_SCRIPT))
        due = script(
            keys=[THROTTLE_KEY.format(delivery_id)],
            args=[repr(now.timestamp()), repr(lat), repr(lon), settings.ETA_MIN_INTERVAL_SECONDS,
                  settings.ETA_MIN_MOVE_METERS, THROTTLE_TTL_SECONDS],
        )
        return bool(due)
    except RedisUnavailable:
        logger.warning("ETA throttle: Redis unavailable, using the stored calculation time")
        return None
    except redis.RedisError:
        logger.exception("ETA throttle failed for delivery %s", delivery_id)
        return None


def etas_recompute_due(fixes: list[tuple[str, float, float]], *, now: datetime) -> list[bool | None]:
    """`eta_recompute_due` of several (delivery id, lat, lon) at once, in one round trip (a
    pipeline of the throttle script, each claim still atomic on its own), in order. All None
    when Redis cannot say."""
    if not fixes:
        return []
    t = repr(now.timestamp())
    interval, min_move = settings.ETA_MIN_INTERVAL_SECONDS, settings.ETA_MIN_MOVE_METERS
    calls = [([THROTTLE_KEY.format(delivery_id)], [t, repr(lat), repr(lon), interval, min_move, THROTTLE_TTL_SECONDS])
             for delivery_id, lat, lon in fixes]
    try:
        return [bool(due) for due in evalsha_many(get_redis(), _THROTTLE_SCRIPT, calls)]
    except RedisUnavailable:
        logger.warning("ETA throttle: Redis unavailable, using the stored calculation time")
    except redis.RedisError:
        logger.exception("ETA throttle failed for %d deliveries", len(fixes))
    return [None] * len(fixes)


def delivery_location_send(
    *, delivery_id, lat: float, lon: float, accuracy_m: float | None, speed: float | None, heading: float | None,
    recorded_at: datetime, ops: bool = True,
) -> None:
    """`delivery_location_updated` to the delivery's customers and, unless `ops` is False (the
    caller tells them itself), to the ops sockets that want each one (OPS_LOCATIONS_GROUP).
    Never raises."""
    event = events.delivery_location_updated(
        delivery_id=delivery_id, lat=lat, lon=lon, accuracy_m=accuracy_m, speed_mps=speed, heading=heading,
        recorded_at=recorded_at,
    )
    send_now([delivery_group(delivery_id), *([OPS_LOCATIONS_GROUP] if ops else [])], event)


def delivery_eta_on_fix(*, delivery_id, lat: float, lon: float, now: datetime) -> bool:
    """A fix of the driver on `delivery_id`: refresh the ETA when due (throttled per delivery
    in Redis; without Redis, by the stored calculation time). Whether it was due (what else
    goes at the ETA's cadence: the customer's arriving check). Never raises."""
    due = eta_recompute_due(delivery_id=delivery_id, lat=lat, lon=lon, now=now)
    if due is False:
        return False
    not_since = now - timedelta(seconds=settings.ETA_MIN_INTERVAL_SECONDS) if due is None else None
    try:
        delivery_eta_refresh(delivery_id=delivery_id, now=now, not_since=not_since)
    except Exception:
        logger.warning("ETA refresh of delivery %s failed", delivery_id, exc_info=True)
    return True


def delivery_track_fix(
    *, delivery_id, lat: float, lon: float, accuracy_m: float | None, speed: float | None, heading: float | None,
    recorded_at: datetime, now: datetime,
) -> bool:
    """An accepted fix of the driver assigned to `delivery_id`, after it committed (the direct
    database path): the location to the customer, the ETA when due; whether it was. Never raises."""
    delivery_location_send(
        delivery_id=delivery_id, lat=lat, lon=lon, accuracy_m=accuracy_m, speed=speed, heading=heading,
        recorded_at=recorded_at,
    )
    return delivery_eta_on_fix(delivery_id=delivery_id, lat=lat, lon=lon, now=now)


# ------------------------------------------------------------------------------ rating


@transaction.atomic
def delivery_rate(
    *, delivery_id, stars: int, comment: str = "", now: datetime | None = None
) -> DeliveryRating:
    """The customer rates a delivered delivery, once; the driver's rating becomes the average
    of all their ratings.

    Locks delivery then driver (the project's lock order). The average is computed by the
    database in an UPDATE issued after the driver's row lock is held, so it sees every rating
    committed before, and two ratings of one driver at once cannot lose each other."""
    now = now or timezone.now()
    delivery = Delivery.objects.select_for_update(of=("self",)).filter(pk=delivery_id).first()
    if delivery is None:
        raise NotFound("Order not found.")
    if delivery.status != S.DELIVERED:
        raise Conflict(f"Only a delivered order can be rated (this one is {selectors.customer_status(delivery.status)}).")
    if DeliveryRating.objects.filter(delivery=delivery).exists():
        raise Conflict("This delivery has already been rated.")
    assignment = (
        Assignment.objects.filter(delivery=delivery, status=AssignmentStatus.COMPLETED).order_by("-ended_at").first()
    )
    if assignment is None:
        raise Conflict("This delivery has no driver to rate.")
    driver_id = assignment.driver_id
    try:
        with transaction.atomic():
            rating = DeliveryRating.objects.create(
                delivery=delivery, driver_id=driver_id, stars=stars, comment=comment, created_at=now
            )
    except IntegrityError:
        raise Conflict("This delivery has already been rated.")
    list(Driver.objects.select_for_update(of=("self",)).filter(pk=driver_id).values_list("pk"))
    average = (
        DeliveryRating.objects.filter(driver_id=OuterRef("pk")).values("driver_id").annotate(a=Avg("stars")).values("a")
    )
    Driver.objects.filter(pk=driver_id).update(rating=Subquery(average))
    return rating
