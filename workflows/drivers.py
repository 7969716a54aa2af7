"""Driver workflows: availability changes that withdraw a pending offer, the stale-driver
job, and a location fix reaching the customer's tracking."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone as dt_timezone

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from availability import live
from availability.geo import index_driver
from availability.live import Fix
from availability.models import Driver
from availability.models import DriverAvailability as A
from availability.selectors import driver_login_deactivated
from availability.services import (
    LocationResult,
    PersistedFix,
    apply_availability_change,
    driver_location_update,
    positions_persist,
)
from common.actors import Actor
from common.broadcast import OPS_LOCATIONS_GROUP, send_now
from common.redis import RedisFailed
from common.exceptions import Conflict
from notifications.customers import arriving_message_rows
from offers.models import DriverOffer, OfferStatus
from offers.services import offer_cancel_locked
from tracking.services import (
    deliveries_eta_refresh,
    delivery_eta_refresh,
    delivery_location_send,
    delivery_track_fix,
    etas_recompute_due,
)
from tracking.events import delivery_location_updated
from workflows import locks
from workflows.dispatching import dispatch_next_locked
from workflows.unit import unit_of_work

logger = logging.getLogger(__name__)


class _OfferMadeMeanwhile(Exception):
    """The driver got an offer between the offer look-up and the driver's lock."""


def availability_change(
    *, driver_id, to_state: str, reason: str, actor: Actor, until: datetime | None = None,
    by_ops: bool = False, now: datetime | None = None,
) -> Driver:
    """Move a driver to `to_state` (the state machine in availability.services decides).

    Going unavailable withdraws the driver's pending offer (CANCELLED) and its delivery moves
    to the next candidate. Locks: the pending offer, its delivery, then the driver. A dispatch
    that offered the driver while we waited for the driver's lock (it holds candidates' locks
    while it offers: a matching round, a batch) would go unseen: the attempt then rolls back
    and starts again, locking that offer first."""
    now = now or timezone.now()
    for _ in range(3):
        try:
            return _availability_change_attempt(
                driver_id=driver_id, to_state=to_state, reason=reason, actor=actor, until=until, by_ops=by_ops, now=now
            )
        except _OfferMadeMeanwhile:
            continue
    raise Conflict("The driver keeps getting new offers; try again.")


@transaction.atomic
def _availability_change_attempt(
    *, driver_id, to_state: str, reason: str, actor: Actor, until: datetime | None, by_ops: bool, now: datetime,
) -> Driver:
    withdrawing = to_state not in (A.AVAILABLE, A.BUSY)
    offer = locks.lock_pending_offer_of_driver(driver_id) if withdrawing else None
    delivery = locks.lock_delivery(offer.delivery_id) if offer is not None else None
    driver = locks.lock_driver(driver_id)
    if withdrawing and offer is None and DriverOffer.objects.filter(driver_id=driver_id, status=OfferStatus.PENDING).exists():
        raise _OfferMadeMeanwhile()
    if to_state in DEACTIVATED_OFFLINE_FROM and driver_login_deactivated(driver_id):
        # (ops' override, resume or break; the driver's own token no longer works): the job
        # would take it offline again within the minute, and it can answer nothing
        raise Conflict("The driver's login is deactivated: reactivate it (admin → Users) first.")
    apply_availability_change(driver, to_state=to_state, reason=reason, actor=actor, until=until, by_ops=by_ops, now=now)
    if offer is not None:
        offer_cancel_locked(offer, delivery=delivery, reason=f"driver_{to_state}", actor=actor, now=now)
        dispatch_next_locked(delivery, actor=Actor.system(), now=now, radius_km=offer.search_radius_km)
    return driver


def availability_take_break(*, driver_id, duration_minutes: int, reason: str, actor: Actor, now: datetime | None = None) -> Driver:
    now = now or timezone.now()
    return availability_change(
        driver_id=driver_id, to_state=A.ON_BREAK, reason=reason or "break", actor=actor,
        until=now + timedelta(minutes=duration_minutes), by_ops=actor.type == "admin", now=now,
    )


def availability_end_shift(*, driver_id, actor: Actor, reason: str = "shift_ended", now: datetime | None = None) -> Driver:
    return availability_change(
        driver_id=driver_id, to_state=A.SHIFT_ENDED, reason=reason, actor=actor, by_ops=actor.type == "admin", now=now
    )


def availability_resume(*, driver_id, actor: Actor, now: datetime | None = None) -> Driver:
    """Back to work. A paused driver can only be resumed by ops."""
    return availability_change(
        driver_id=driver_id, to_state=A.AVAILABLE, reason="resumed", actor=actor, by_ops=actor.type == "admin", now=now
    )


def availability_override(
    *, driver_id, to_state: str, reason: str, actor: Actor, duration_minutes: int | None = None, now: datetime | None = None
) -> Driver:
    """Ops set a driver's state (e.g. `paused`); `busy` is never set by hand."""
    now = now or timezone.now()
    if to_state == A.BUSY:
        raise Conflict("A driver becomes busy only by accepting an offer.")
    # Only a break ends by itself (the break job); a duration given with another state would
    # show an end nothing acts on.
    until = now + timedelta(minutes=duration_minutes) if duration_minutes and to_state == A.ON_BREAK else None
    return availability_change(
        driver_id=driver_id, to_state=to_state, reason=reason, actor=actor, until=until, by_ops=True, now=now
    )


# Pages of `batch_size` candidates one run of the stale-driver job reads at most
STALE_SCAN_PAGES = 20


def stale_drivers_mark_offline(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """Set `offline` the available drivers whose last fix is older than DRIVER_STALE_AFTER_SECONDS
    (SPEC), except those whose state changed less than DRIVER_STALE_GRACE_SECONDS ago (resumed
    a moment ago, their new fix on its way); a driver with no fix at all once it has been
    available that long without one (its staleness counts from its last change: a driver
    resumed without a fix went offline 30–90 s later, its pending offer withdrawn, where the
    SPEC's rule is about a fix older than 600 s). Safe when two run at once."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    # (until 2026-12-06 the state had to be unchanged for DRIVER_STALE_AFTER_SECONDS too: a driver
    # resuming with a fix an hour old stayed available, for the SPEC's job, up to eleven minutes)
    settled_before = now - timedelta(seconds=settings.DRIVER_STALE_GRACE_SECONDS)
    settled = Q(last_availability_change__lt=settled_before) | Q(last_availability_change__isnull=True)
    never_fixed = Q(last_availability_change__lt=cutoff) | Q(last_availability_change__isnull=True)
    stale = (Q(location_recorded_at__lt=cutoff) & settled) | (Q(location_recorded_at__isnull=True) & never_fixed)
    candidates = Driver.objects.filter(stale, availability=A.AVAILABLE).order_by("pk").values_list("pk", flat=True)
    # PostgreSQL's fix time trails Redis by the stream consumer's lag (more while it is down):
    # a driver whose live position is fresh is not stale. Pages of candidates until a batch of
    # really stale ones, so that drivers fresh only in Redis cannot crowd the stale ones out.
    ids, after = [], None
    for _ in range(STALE_SCAN_PAGES):
        page = list((candidates.filter(pk__gt=after) if after is not None else candidates)[:batch_size])
        if not page:
            break
        try:
            fresh = live.positions_known(page)
        except RedisFailed:
            # Redis cannot say who is fresh: PostgreSQL alone would take a lagging consumer's
            # drivers for stale. The next run judges them.
            logger.warning("stale drivers: Redis unavailable, nobody marked offline this run")
            return 0
        ids += [i for i in page if str(i) not in fresh or fresh[str(i)].recorded_at < cutoff]
        if len(ids) >= batch_size or len(page) < batch_size:
            break
        after = page[-1]
    ids = ids[:batch_size]
    changed = 0
    for driver_id in ids:
        # Each driver in its own transaction, through availability_change so that a pending
        # offer is withdrawn in lock order; re-checked first (a fix may have arrived, or another
        # run got there first, in which case the transition is refused as a no-op), in
        # PostgreSQL and then in Redis (a fix the fast lane took since the page was read is
        # there first; the consumer writes it to PostgreSQL a moment later).
        with transaction.atomic():
            if not Driver.objects.filter(stale, pk=driver_id, availability=A.AVAILABLE).exists():
                continue
            if _live_fix_since(driver_id, cutoff):
                continue
            try:
                availability_change(driver_id=driver_id, to_state=A.OFFLINE, reason="stale_location", actor=Actor.system(), now=now)
            except Conflict:
                continue
            changed += 1
    return changed


# Who a deactivated login's driver could still be offered work as: available, or on a break
# that would end into available.
DEACTIVATED_OFFLINE_FROM = (A.AVAILABLE, A.ON_BREAK)


def deactivated_drivers_mark_offline(user=None, *, now: datetime | None = None, batch_size: int = 500) -> int:
    """Set `offline` the drivers whose login is deactivated (`is_active` cleared in the admin,
    a shell or SQL) while they were available or on a break: their app's token stopped working
    at once, but dispatch kept offering them deliveries until their last fix went stale (up to
    DRIVER_STALE_AFTER_SECONDS, 10 minutes), each offer expiring unanswered, and the live map
    showed them available. `user`: that login's driver only (the deactivation's hook, after its
    commit); without it, all of them (the stale-driver job, each minute: what a bulk update or
    SQL changed, and a busy driver freed since). A busy driver keeps its delivery until ops
    reassign or cancel it."""
    now = now or timezone.now()
    inactive = Driver.objects.filter(user__is_active=False, availability__in=DEACTIVATED_OFFLINE_FROM)
    if user is not None:
        inactive = inactive.filter(user_id=user.pk)
    changed = 0
    for driver_id in list(inactive.order_by("pk").values_list("pk", flat=True)[:batch_size]):
        with transaction.atomic():
            if not inactive.filter(pk=driver_id).exists():  # (reactivated, or moved on, since the read)
                continue
            try:
                availability_change(driver_id=driver_id, to_state=A.OFFLINE, reason="account_deactivated",
                                    actor=Actor.system(), by_ops=True, now=now)
            except Conflict:  # (busy meanwhile: taken offline once freed)
                continue
            changed += 1
    return changed


def _live_fix_since(driver_id, cutoff: datetime) -> bool:
    """Whether Redis holds a fix of the driver recorded at `cutoff` or later; True when Redis
    cannot say (the driver is left for the next run, as a whole run is when its read fails)."""
    try:
        position = live.positions_known([driver_id]).get(str(driver_id))
    except RedisFailed:
        return True
    return position is not None and position.recorded_at >= cutoff


def driver_location_record(
    *, driver_id, lat: float, lon: float, recorded_at: datetime, accuracy_m: float | None = None,
    speed: float | None = None, heading: float | None = None, now: datetime | None = None, handed_over: bool = False,
) -> LocationResult:
    """A driver's fix: stored (never back in time), the GEO index updated after commit, and,
    when the driver is on a delivery, handed to that customer's tracking after commit.
    `handed_over`: by the fast lane, after its wait for Redis ran out (`driver_location_update`)."""
    now = now or timezone.now()
    result = driver_location_update(
        driver_id=driver_id, lat=lat, lon=lon, recorded_at=recorded_at, accuracy_m=accuracy_m, speed=speed,
        heading=heading, now=now, handed_over=handed_over,
    )

    def track(delivery_id) -> None:
        if delivery_track_fix(delivery_id=delivery_id, lat=lat, lon=lon, accuracy_m=accuracy_m, speed=speed,
                              heading=heading, recorded_at=recorded_at, now=now):
            _arriving_messages([(delivery_id, lat, lon)], now=now)  # (at the ETA's cadence, as in fixes_process)

    for delivery_id in result.active_delivery_ids:  # several with order stacking
        transaction.on_commit(lambda delivery_id=delivery_id: track(delivery_id), robust=True)
    return result


def _arriving_messages(fixes: list[tuple[str, float, float]], *, now: datetime) -> None:
    """`notifications.customers.arriving_message_rows` of these fixes. Never raises."""
    try:
        arriving_message_rows(fixes, now=now)
    except Exception:
        logger.warning("arriving messages of %d deliveries failed", len(fixes), exc_info=True)


def fixes_process(fixes: list[Fix], *, now: datetime | None = None) -> list[PersistedFix]:
    """A batch of fixes from the stream (the fast lane already answered, indexed and told the
    customer): PostgreSQL in one statement (a second for the drivers a request held locked),
    then, after commit, what Redis could not know by itself — the GEO entry of an available
    driver whose status Redis lacked, the customer of a delivery Redis did not know the driver
    was on — each fix of a driver on a delivery to the ops sockets that want them (the
    batch's `delivery_location_updated` events in one `delivery_locations` message to
    OPS_LOCATIONS_GROUP, which each socket writes out one frame an event: one channel-layer
    message a batch, not one a fix; the fast lane told the customer), and the throttled ETA
    refresh."""
    now = now or timezone.now()
    # What Redis knows, read before PostgreSQL: an assignment made or ended between the two
    # reads then makes PostgreSQL's the newer, and one after them has written Redis itself,
    # which the repair (a compare-and-set on this read) leaves alone.
    known = live.known_state(list({fix.driver_id for fix in fixes}))
    # First the drivers nobody holds locked, committed at once; then, in a transaction of their
    # own, those a request was working on (waiting for its commit). A batch that waited inside
    # one statement would hold the rows it had already written meanwhile, and the requests that
    # wanted one of those would wait for the whole batch in turn.
    with transaction.atomic():
        persisted = positions_persist(fixes, now=now, skip_locked=True)
    taken = {p.fix.driver_id for p in persisted}
    if left := [fix for fix in fixes if fix.driver_id not in taken]:  # (and those older than PostgreSQL's)
        with transaction.atomic():
            persisted += positions_persist(left, now=now)
    on_fix: list[tuple[str, float, float]] = []
    to_ops = []
    for p in persisted:
        fix = p.fix
        recorded_at = datetime.fromtimestamp(fix.recorded_at, tz=dt_timezone.utc)
        on_fix += [(delivery_id, fix.lat, fix.lon) for delivery_id in p.active_delivery_ids]
        to_ops += [delivery_location_updated(
            delivery_id=delivery_id, lat=fix.lat, lon=fix.lon, accuracy_m=fix.accuracy_m, speed_mps=fix.speed,
            heading=fix.heading, recorded_at=recorded_at,
        ) for delivery_id in p.active_delivery_ids]
        if known is None:  # Redis did not answer: nothing to compare with, nothing to repair
            continue
        status, active = known.get(fix.driver_id, (None, ()))
        if p.availability == A.AVAILABLE and status is None:
            index_driver(driver_id=fix.driver_id, availability=p.availability, lat=fix.lat, lon=fix.lon,
                         recorded_at=recorded_at, from_fix=True)
        if p.active_delivery_ids != active and live.active_delivery_repair(
            fix.driver_id, p.active_delivery_ids, read=active
        ):
            for delivery_id in set(p.active_delivery_ids) - set(active):  # customers Redis did not know of
                delivery_location_send(delivery_id=delivery_id, lat=fix.lat, lon=fix.lon,
                                       accuracy_m=fix.accuracy_m, speed=fix.speed, heading=fix.heading,
                                       recorded_at=recorded_at, ops=False)
    if to_ops:
        send_now([OPS_LOCATIONS_GROUP], {"type": "delivery_locations", "events": to_ops})
    etas_on_fixes(on_fix, now=now)
    return persisted


def etas_on_fixes(fixes: list[tuple[str, float, float]], *, now: datetime) -> None:
    """`tracking.services.delivery_eta_on_fix` of each (delivery id, lat, lon) of a batch, the
    deliveries due together: one throttle round trip to Redis, then one transaction that
    reads them, stores their ETAs with one UPDATE, writes their webhook rows with one INSERT
    and sends their events together after commit. The same ETAs, events and outbox rows as one
    by one. Should the batch fail, each delivery is tried on its own. Never raises."""
    due: dict[str, datetime | None] = {}
    fallback = now - timedelta(seconds=settings.ETA_MIN_INTERVAL_SECONDS)
    for (delivery_id, _, _), claimed in zip(fixes, etas_recompute_due(fixes, now=now)):
        if claimed is not False:
            due[delivery_id] = None if claimed else fallback  # Redis cannot say: by the stored time
    if not due:
        return
    # the customer's "arriving" message at the same cadence, from the fix (whether or not the
    # ETA moved, or its webhook went out)
    _arriving_messages([fix for fix in fixes if fix[0] in due], now=now)
    try:
        with unit_of_work():
            deliveries_eta_refresh(due=due, now=now)
        return
    except Exception:
        logger.warning("ETA refresh of %d deliveries failed; one by one", len(due), exc_info=True)
    for delivery_id, not_since in due.items():
        try:
            delivery_eta_refresh(delivery_id=delivery_id, now=now, not_since=not_since)
        except Exception:
            logger.warning("ETA refresh of delivery %s failed", delivery_id, exc_info=True)
