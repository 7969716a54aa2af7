"""The only way a driver's availability changes, whoever asks (SPEC "Driver availability")."""
from __future__ import annotations

from datetime import datetime

from django.db import transaction
from django.utils import timezone

from availability import events
from availability.models import DriverAvailabilityHistory
from common.actors import Actor
from common.broadcast import OPS_GROUP, broadcast_on_commit, driver_group
from common.exceptions import Conflict, NotFound
from dispatch.models import Driver, DriverAvailability as A

# What drivers, jobs and the offer flow may do.
TRANSITIONS: dict[str, frozenset[str]] = {
    A.AVAILABLE: frozenset({A.ON_BREAK, A.SHIFT_ENDED, A.OFFLINE, A.BUSY}),
    A.ON_BREAK: frozenset({A.AVAILABLE, A.SHIFT_ENDED}),
    A.BUSY: frozenset({A.AVAILABLE}),
    A.SHIFT_ENDED: frozenset({A.AVAILABLE}),
    A.OFFLINE: frozenset({A.AVAILABLE}),
    A.PAUSED: frozenset(),
}
# What ops may do on top: pause an available driver, and override any state of a driver who
# is not busy (a busy driver's delivery must be reassigned or cancelled first).
OPS_TARGETS = frozenset({A.AVAILABLE, A.ON_BREAK, A.SHIFT_ENDED, A.OFFLINE, A.PAUSED})


def transition_allowed(from_state: str, to_state: str, *, by_ops: bool) -> bool:
    if from_state == to_state:
        return False
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
    now: datetime | None = None,
) -> DriverAvailabilityHistory:
    """Move a driver the caller has already locked (select_for_update) to `to_state`.

    Writes the history row and the driver row, and emits `availability_changed` after commit.
    Raises Conflict when the state machine does not allow the move.
    """
    now = now or timezone.now()
    from_state = driver.availability
    if not transition_allowed(from_state, to_state, by_ops=by_ops):
        if from_state == A.PAUSED and to_state == A.AVAILABLE:
            raise Conflict("Driver is paused; only ops can resume a paused driver.")
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
    """Lock the driver and move it to `to_state` (see apply_availability_change)."""
    driver = Driver.objects.select_for_update(of=("self",)).filter(pk=driver_id).first()
    if driver is None:
        raise NotFound("Driver not found.")
    apply_availability_change(driver, to_state=to_state, reason=reason, actor=actor, until=until, by_ops=by_ops, now=now)
    return driver
