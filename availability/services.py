"""Driver state: creating drivers, the availability state machine, location fixes.

`apply_availability_change` is the only way a driver's availability changes, whoever asks
(SPEC "Driver availability"); the workflows in `workflows/drivers.py` lock the rows and
withdraw a pending offer around it."""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone as dt_timezone

from django.contrib.auth import get_user_model
from django.contrib.gis.geos import Point
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from availability import events, geo, live
from availability.models import Driver, DriverAvailabilityHistory
from availability.models import DriverAvailability as A
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit, driver_group, enqueue_task_on_commit
from common.exceptions import Conflict, Forbidden
from common.tokens import api_token_create
from common.txbuffer import insert_rows

# What drivers, jobs and the offer flow may do. busy → available is not here: it happens only
# when the driver's assignment ends (`releasing=True`), never because someone asked.
TRANSITIONS: dict[str, frozenset[str]] = {
    A.AVAILABLE: frozenset({A.ON_BREAK, A.SHIFT_ENDED, A.OFFLINE, A.BUSY}),
    A.ON_BREAK: frozenset({A.AVAILABLE, A.SHIFT_ENDED}),
    A.BUSY: frozenset(),
    A.SHIFT_ENDED: frozenset({A.AVAILABLE}),
    A.OFFLINE: frozenset({A.AVAILABLE}),
    A.PAUSED: frozenset(),
}
# What ops may do on top: pause an available driver, and override any state of a driver who
# is not busy (a busy driver's delivery must be reassigned or cancelled first).
OPS_TARGETS = frozenset({A.AVAILABLE, A.ON_BREAK, A.SHIFT_ENDED, A.OFFLINE, A.PAUSED})


def transition_allowed(from_state: str, to_state: str, *, by_ops: bool, releasing: bool = False) -> bool:
    if from_state == to_state:
        return False
    if from_state == A.BUSY:
        return releasing and to_state == A.AVAILABLE
    if to_state in TRANSITIONS.get(from_state, ()):
        return True
    return by_ops and from_state != A.BUSY and to_state in OPS_TARGETS


# A driver free again (a delivery done or called off, a break over, back on shift, resumed by
# ops) is offered the oldest delivery waiting near it, a moment later: the task
# `dispatch.driver_freed` (workflows.dispatching.driver_freed_pull). Before it, a delivery that
# had found nobody waited for the retry job, up to 30 s, with a free driver next to it.
# On the `celery` queue, not `timers`: a break job freeing 500 drivers at once, or a surge of
# completions while hundreds of orders wait, would queue that many looks (each up to ten
# dispatches) ahead of the offers' expiry. Dropped if not started within 30 s: the retry job
# has looked by then.
DRIVER_FREED_TASK = "dispatch.driver_freed"
DRIVER_FREED_DELAY_SECONDS = 0.2
DRIVER_FREED_EXPIRES_SECONDS = 30


def apply_availability_change(
    driver: Driver,
    *,
    to_state: str,
    reason: str,
    actor: Actor,
    until: datetime | None = None,
    by_ops: bool = False,
    releasing: bool = False,
    now: datetime | None = None,
) -> DriverAvailabilityHistory:
    """Move a driver the caller has already locked (select_for_update) to `to_state`.

    Writes the history row and the driver row, and emits `availability_changed` after commit.
    `releasing` marks the end of the driver's assignment, the only way out of `busy`.
    Raises Conflict when the state machine does not allow the move.
    """
    now = now or timezone.now()
    from_state = driver.availability
    if not transition_allowed(from_state, to_state, by_ops=by_ops, releasing=releasing):
        if from_state == A.PAUSED and to_state == A.AVAILABLE:
            # SPEC: resume is for the driver and ops, "paused: ops only" — a permission rule.
            raise Forbidden("Driver is paused; only ops can resume a paused driver.")
        if from_state == A.BUSY:
            raise Conflict(f"Driver is busy with a delivery; cannot change to {to_state}.")
        raise Conflict(f"Driver is {from_state}; cannot change to {to_state}.")
    previous = driver.last_availability_change
    if previous is not None and now <= previous:
        # The caller read the clock, then waited for the driver's lock behind a change stamped
        # later: stamped just after that one, the history reads as the chain it is (by time,
        # "paused → on_break" was listed before the "offline → paused" it followed).
        now = previous + timedelta(microseconds=1)

    driver.availability = to_state
    driver.availability_until = until
    driver.availability_reason = reason or ""
    driver.last_availability_change = now
    driver.availability_change_actor = actor.id
    driver.availability_change_actor_type = actor.type
    driver.save_fields(
        "availability", "availability_until", "availability_reason", "last_availability_change",
        "availability_change_actor", "availability_change_actor_type", "updated_at",
    )
    row = DriverAvailabilityHistory(
        driver=driver, from_state=from_state, to_state=to_state, reason=reason or "",
        actor_id=actor.id, actor_type=actor.type, timestamp=now,
    )
    insert_rows([row])  # in a workflow: with its audit and outbox rows, one statement before commit
    event = events.availability_changed(
        driver_id=driver.pk, from_state=from_state, to_state=to_state, reason=reason, until=until, changed_at=now
    )
    broadcast_on_commit([driver_group(driver.pk), OPS_GROUP], event)
    geo.index_driver_on_commit(driver)
    if to_state == A.AVAILABLE:
        driver_freed_on_commit(driver)
    return row


def driver_freed_on_commit(driver: Driver) -> None:
    """After commit, a moment later, off the request: the deliveries waiting near `driver`, free
    again (DRIVER_FREED_TASK, workflows.dispatching.driver_freed_pull), unless its state changes
    meanwhile. Also after a reject: the driver is free of its offer."""
    if driver.last_availability_change is None:  # (never changed: made available by SQL or an import)
        return
    drivers_freed_on_commit([driver.pk], at=driver.last_availability_change)


def drivers_freed_on_commit(driver_ids, *, at: datetime) -> None:
    """DRIVER_FREED_TASK for each of `driver_ids`, after commit, unless its state changes after
    `at`. Also for the drivers whose pending offers were withdrawn at `at` (the delivery
    cancelled, a round taken by another driver): free of their offers, they are as free as
    after a reject, and a delivery that had found nobody while those offers were pending
    waited for the retry job, up to 30 s, beside them (a race audit: 9 of 20 runs)."""
    for driver_id in driver_ids:
        enqueue_task_on_commit(DRIVER_FREED_TASK, str(driver_id), at.isoformat(),
                               countdown=DRIVER_FREED_DELAY_SECONDS,
                               expires=DRIVER_FREED_DELAY_SECONDS + DRIVER_FREED_EXPIRES_SECONDS)



# ----------------------------------------------------------------------------- drivers


@transaction.atomic
def driver_create(
    *,
    name: str,
    phone: str,
    vehicle: str,
    vehicle_type: str = "car",
    username: str | None = None,
    home_location: Point | None = None,
) -> tuple[Driver, str]:
    """Create a driver with its own login and API token; returns (driver, token key).

    A new driver is `offline` until it resumes work.
    """
    User = get_user_model()
    if username is None:
        base = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:100] or "driver"
        username = f"driver-{base}-{secrets.token_hex(3)}"
    elif User.objects.filter(username=username).exists():
        raise Conflict(f"Username {username!r} is taken.")
    try:
        with transaction.atomic():
            user = User.objects.create_user(username=username)  # (no password: an unusable one)
    except IntegrityError:
        raise Conflict(f"Username {username!r} is taken.")
    driver = Driver.objects.create(
        user=user, name=name, phone=phone, vehicle=vehicle, vehicle_type=vehicle_type, home_location=home_location
    )
    return driver, api_token_create(user, name="onboarding")


# ------------------------------------------------------------------------------ jobs


def breaks_expire(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """Return drivers whose break is over to `available` (reason `break_expired`).

    Safe when two run at once: each driver is claimed with SKIP LOCKED and re-checked under
    its lock. Returns how many breaks ended.
    """
    now = now or timezone.now()
    ended = 0
    with transaction.atomic():
        drivers = list(
            Driver.objects.select_for_update(of=("self",), skip_locked=True)
            .filter(availability=A.ON_BREAK, availability_until__lte=now)
            .order_by("pk")[:batch_size]
        )
        for driver in drivers:
            # Read before the change clears it: the event says when the break ended, not when
            # this job (which may run late) noticed.
            ended_at = driver.availability_until
            started = driver.last_availability_change or ended_at
            minutes = max(0, round((ended_at - started).total_seconds() / 60))
            apply_availability_change(driver, to_state=A.AVAILABLE, reason="break_expired", actor=Actor.system(), now=now)
            broadcast_on_commit(
                [driver_group(driver.pk), OPS_GROUP],
                events.break_expired(driver_id=driver.pk, duration_minutes=minutes, expired_at=ended_at),
            )
            ended += 1
    return ended


# ---------------------------------------------------------------------------- location

_LOCATION_UPDATE_SQL = """
UPDATE dispatch_driver
SET location = ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326)::geography,
    location_accuracy_m = %(accuracy)s,
    location_speed = %(speed)s,
    location_heading = %(heading)s,
    location_recorded_at = %(recorded_at)s,
    updated_at = %(now)s
WHERE id = %(id)s AND (location_recorded_at IS NULL OR location_recorded_at < %(recorded_at)s
                       OR (%(again)s AND location_recorded_at = %(recorded_at)s))
RETURNING availability,
    -- the deliveries this driver is on (several with order stacking, in the order assigned), for
    -- their customers' tracking: one probe of the partial index assignment_active_driver_idx,
    -- no second round trip (docs/tracking.md)
    (SELECT string_agg(a.delivery_id::text, ',' ORDER BY a.created_at, a.id) FROM dispatch_assignment a
     WHERE a.driver_id = dispatch_driver.id AND a.status = 'active')
"""


@dataclass(frozen=True)
class LocationResult:
    accepted: bool
    availability: str | None
    active_delivery_ids: tuple[str, ...] = ()  # in the order assigned


def driver_location_update(
    *,
    driver_id,
    lat: float,
    lon: float,
    recorded_at: datetime,
    accuracy_m: float | None = None,
    speed: float | None = None,
    heading: float | None = None,
    now: datetime | None = None,
    handed_over: bool = False,
) -> LocationResult:
    """Store a driver's fix: one conditional UPDATE, so two fixes racing can never move the
    driver back in time; a fix not newer than the stored one is ignored. No audit row per fix.
    The GEO index is updated after commit; the result names the delivery the driver is on,
    for its customer's tracking (the workflow hands the fix on). A fix not newer than the live
    position in Redis (one the fast lane accepted that the stream consumer has not yet written
    here) is ignored too, as the fast lane would.

    `handed_over`: the fast lane's wait for Redis ran out (a busy event loop) and it handed the
    fix here; Redis may have stored it all the same. The very fix Redis holds as the live
    position (same time and place) is then the fast lane's own write, and accepted: it was
    answered "older_than_last_fix" though stored, and its customer was not told. (Any other
    fix at the same time, and a client's repeat, are ignored, as the fast lane's script does.)"""
    now = now or timezone.now()
    live_fix = live.fix_of(driver_id)
    again = False
    if live_fix is not None and live_fix[0] >= recorded_at.timestamp():
        if not handed_over or live_fix != (recorded_at.timestamp(), float(lat), float(lon)):
            return LocationResult(accepted=False, availability=None)
        again = True
    with connection.cursor() as cur:
        cur.execute(
            _LOCATION_UPDATE_SQL,
            {"lat": lat, "lon": lon, "accuracy": accuracy_m, "speed": speed, "heading": heading,
             "recorded_at": recorded_at, "now": now, "id": driver_id, "again": again},
        )
        row = cur.fetchone()
    if row is None:
        return LocationResult(accepted=False, availability=None)
    availability, active = row
    fix = live.Fix(driver_id=str(driver_id), lat=lat, lon=lon, recorded_at=recorded_at.timestamp(),
                   accuracy_m=accuracy_m, speed=speed, heading=heading)

    def after_commit():
        live.fix_record_persisted(fix)  # the live position (and GEO entry, when Redis knows the status)
        if availability == A.AVAILABLE:
            geo.index_driver(
                driver_id=driver_id, availability=availability, lat=lat, lon=lon, recorded_at=recorded_at, from_fix=True
            )

    transaction.on_commit(after_commit, robust=True)
    return LocationResult(accepted=True, availability=availability, active_delivery_ids=live.split_ids(active))


# The stream consumer's batch write: the newest fix per driver, one statement, with the same
# recorded-at guard as the direct write (PostgreSQL never moves a driver back in time).
_BATCH_FIXES = """unnest(%(id)s::uuid[], %(lat)s::float8[], %(lon)s::float8[], %(t)s::timestamptz[],
    %(acc)s::float8[], %(speed)s::float8[], %(heading)s::float8[]) AS v(id, lat, lon, t, acc, speed, heading)"""
_BATCH_NEWER = "(d.location_recorded_at IS NULL OR d.location_recorded_at < v.t)"
_BATCH_SET = """SET location = ST_SetSRID(ST_MakePoint(v.lon, v.lat), 4326)::geography,
    location_accuracy_m = v.acc, location_speed = v.speed, location_heading = v.heading,
    location_recorded_at = v.t, updated_at = %(now)s"""
_BATCH_RETURNING = """RETURNING d.id, d.availability,
    (SELECT string_agg(a.delivery_id::text, ',' ORDER BY a.created_at, a.id) FROM dispatch_assignment a
     WHERE a.driver_id = d.id AND a.status = 'active')"""


def _batch_update_sql(lock: str) -> str:
    return f"""
WITH v AS (SELECT * FROM {_BATCH_FIXES}),
locked AS (SELECT d.id FROM dispatch_driver d JOIN v ON v.id = d.id WHERE {_BATCH_NEWER} {lock})
UPDATE dispatch_driver AS d {_BATCH_SET}
FROM v JOIN locked ON locked.id = v.id
WHERE d.id = v.id AND {_BATCH_NEWER}
{_BATCH_RETURNING}
"""


# The rows locked in primary-key order, as the services lock contested rows (no deadlock with
# a request that holds one driver and wants another).
_BATCH_UPDATE_SQL = _batch_update_sql("ORDER BY d.id FOR NO KEY UPDATE OF d")
# The same, leaving out the rows another transaction holds locked (a request working on that
# driver) instead of waiting for them while holding the rest of the batch's rows.
_BATCH_UPDATE_SKIP_LOCKED_SQL = _batch_update_sql("FOR NO KEY UPDATE OF d SKIP LOCKED")


@dataclass(frozen=True)
class PersistedFix:
    fix: live.Fix
    availability: str
    active_delivery_ids: tuple[str, ...]


def positions_persist(fixes: list[live.Fix], *, now: datetime | None = None,
                      skip_locked: bool = False) -> list[PersistedFix]:
    """Write a batch of fixes from the stream: the newest per driver, in one UPDATE … FROM
    unnest(…). Returns the fixes PostgreSQL took (a fix older than the stored one is not).
    `skip_locked`: the drivers whose row another transaction holds locked are left out (not
    returned, not waited for); the caller writes them later."""
    newest: dict[str, live.Fix] = {}
    for fix in fixes:
        if fix.driver_id not in newest or fix.recorded_at > newest[fix.driver_id].recorded_at:
            newest[fix.driver_id] = fix
    if not newest:
        return []
    now = now or timezone.now()
    # One array per column, not one placeholder per value: the statement's text is the same
    # for every batch, so psycopg parses it once (a VALUES list of n rows was parsed anew for
    # each batch: a sixth of the stream consumer's CPU).
    fs = list(newest.values())
    params = {"now": now, "id": [f.driver_id for f in fs], "lat": [f.lat for f in fs], "lon": [f.lon for f in fs],
              "t": [datetime.fromtimestamp(f.recorded_at, tz=dt_timezone.utc) for f in fs],
              "acc": [f.accuracy_m for f in fs], "speed": [f.speed for f in fs], "heading": [f.heading for f in fs]}
    with connection.cursor() as cur:
        cur.execute(_BATCH_UPDATE_SKIP_LOCKED_SQL if skip_locked else _BATCH_UPDATE_SQL, params)
        rows = cur.fetchall()
    return [PersistedFix(newest[str(pk)], availability, live.split_ids(active)) for pk, availability, active in rows]
