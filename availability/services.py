"""The only way a driver's availability changes, whoever asks (SPEC "Driver availability")."""
from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from availability import events, geo
from availability.models import DriverAvailabilityHistory
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit, driver_group
from rest_framework.exceptions import PermissionDenied

from common.exceptions import Conflict, NotFound
from dispatch.models import Driver, DriverAvailability as A

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
            raise PermissionDenied("Driver is paused; only ops can resume a paused driver.")
        if from_state == A.BUSY:
            raise Conflict(f"Driver is busy with a delivery; cannot change to {to_state}.")
        raise Conflict(f"Driver is {from_state}; cannot change to {to_state}.")

    driver.availability = to_state
    driver.availability_until = until
    driver.availability_reason = reason or ""
    driver.last_availability_change = now
    driver.availability_change_actor = actor.id
    driver.availability_change_actor_type = actor.type
    driver.save(
        update_fields=[
            "availability", "availability_until", "availability_reason", "last_availability_change",
            "availability_change_actor", "availability_change_actor_type", "updated_at",
        ]
    )
    row = DriverAvailabilityHistory.objects.create(
        driver=driver, from_state=from_state, to_state=to_state, reason=reason or "",
        actor_id=actor.id, actor_type=actor.type, timestamp=now,
    )
    event = events.availability_changed(
        driver_id=driver.pk, from_state=from_state, to_state=to_state, reason=reason, until=until, changed_at=now
    )
    broadcast_on_commit([driver_group(driver.pk), OPS_GROUP], event)
    geo.index_driver_on_commit(driver)
    return row


@transaction.atomic
def availability_change(
    *,
    driver_id,
    to_state: str,
    reason: str,
    actor: Actor,
    until: datetime | None = None,
    by_ops: bool = False,
    now: datetime | None = None,
) -> Driver:
    """Lock the driver and move it to `to_state` (see apply_availability_change).

    Going unavailable withdraws the driver's pending offer (CANCELLED) and the delivery moves
    to its next candidate. The offer and its delivery are locked before the driver (the lock
    order every service follows: offer → delivery → driver).
    """
    from dispatch.engine import dispatch_locked
    from offers.services import lock_pending_offer_of_driver, offer_cancel_locked

    now = now or timezone.now()
    withdrawing = to_state not in (A.AVAILABLE, A.BUSY)
    offer, delivery = lock_pending_offer_of_driver(driver_id) if withdrawing else (None, None)
    driver = Driver.objects.select_for_update(of=("self",)).filter(pk=driver_id).first()
    if driver is None:
        raise NotFound("Driver not found.")
    apply_availability_change(driver, to_state=to_state, reason=reason, actor=actor, until=until, by_ops=by_ops, now=now)
    if offer is not None:
        offer_cancel_locked(offer, delivery=delivery, reason=f"driver_{to_state}", actor=actor, now=now)
        dispatch_locked(delivery, actor=Actor.system(), now=now)
    return driver


# ----------------------------------------------------------------- driver-facing actions


@transaction.atomic
def availability_take_break(*, driver_id, duration_minutes: int, reason: str, actor: Actor, now: datetime | None = None) -> Driver:
    now = now or timezone.now()
    return availability_change(
        driver_id=driver_id, to_state=A.ON_BREAK, reason=reason or "break", actor=actor,
        until=now + timedelta(minutes=duration_minutes), by_ops=actor.type == "admin", now=now,
    )


@transaction.atomic
def availability_end_shift(*, driver_id, actor: Actor, reason: str = "shift_ended", now: datetime | None = None) -> Driver:
    return availability_change(
        driver_id=driver_id, to_state=A.SHIFT_ENDED, reason=reason, actor=actor, by_ops=actor.type == "admin", now=now
    )


@transaction.atomic
def availability_resume(*, driver_id, actor: Actor, now: datetime | None = None) -> Driver:
    """Back to work. A paused driver can only be resumed by ops."""
    return availability_change(
        driver_id=driver_id, to_state=A.AVAILABLE, reason="resumed", actor=actor, by_ops=actor.type == "admin", now=now
    )


@transaction.atomic
def availability_override(
    *, driver_id, to_state: str, reason: str, actor: Actor, duration_minutes: int | None = None, now: datetime | None = None
) -> Driver:
    """Ops set a driver's state (e.g. `paused`); `busy` is never set by hand."""
    now = now or timezone.now()
    if to_state == A.BUSY:
        raise Conflict("A driver becomes busy only by accepting an offer.")
    until = now + timedelta(minutes=duration_minutes) if duration_minutes else None
    return availability_change(
        driver_id=driver_id, to_state=to_state, reason=reason, actor=actor, until=until, by_ops=True, now=now
    )


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
            started = driver.last_availability_change or driver.availability_until
            minutes = max(0, round((driver.availability_until - started).total_seconds() / 60))
            apply_availability_change(driver, to_state=A.AVAILABLE, reason="break_expired", actor=Actor.system(), now=now)
            broadcast_on_commit(
                [driver_group(driver.pk), OPS_GROUP],
                events.break_expired(driver_id=driver.pk, duration_minutes=minutes, expired_at=driver.availability_until or now),
            )
            ended += 1
    return ended


def stale_drivers_mark_offline(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """Set `offline` the available drivers with no fix newer than DRIVER_STALE_AFTER_SECONDS
    (and who have not just come online). Safe when two run at once (SKIP LOCKED)."""
    from django.conf import settings
    from django.db.models import Q

    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    stale = Q(location_recorded_at__lt=cutoff) | Q(location_recorded_at__isnull=True)
    settled = Q(last_availability_change__lt=cutoff) | Q(last_availability_change__isnull=True)
    ids = list(
        Driver.objects.filter(stale, settled, availability=A.AVAILABLE).order_by("pk").values_list("pk", flat=True)[:batch_size]
    )
    changed = 0
    for driver_id in ids:
        # Each driver in its own transaction, through availability_change so that a pending
        # offer is withdrawn in lock order; re-checked first (a fix may have arrived, or another
        # run got there first, in which case the transition is refused as a no-op).
        with transaction.atomic():
            if not Driver.objects.filter(stale, settled, pk=driver_id, availability=A.AVAILABLE).exists():
                continue
            try:
                availability_change(driver_id=driver_id, to_state=A.OFFLINE, reason="stale_location", actor=Actor.system(), now=now)
            except Conflict:
                continue
            changed += 1
    return changed
