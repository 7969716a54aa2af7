"""The dispatch engine (a workflow: it reads drivers, zones and offers, writes offers and
unassigned records): find candidates for a ready delivery and offer it to the best one.

Candidates are available drivers with a fresh fix within the search radius (the zone's
override, else DISPATCH_RADIUS_KM), not UNAVAILABLE for the delivery's zone, never offered
this delivery before and with no pending offer. They are ranked by estimated pickup time;
among near-equals (within two minutes of the fastest driver not yet ranked) PREFERRED-zone
drivers come first, then the higher acceptance rate (`rank`).

How many are offered at once is the zone's dispatch policy (`zones.policies.zone_policy`,
docs/dispatch.md "Dispatch policies"): `sequential` offers the best one (one pending offer per
delivery at a time); `batch` the best N of them in one round, `broadcast` all of them up to the
zone's cap. In a round the first accept wins and withdraws the others
(`workflows.offers.offer_accept`); the next round starts only when no offer of the delivery
is pending any more.

In a zone with order stacking on, busy drivers with room who qualify (`workflows.stacking`)
are candidates too, ranked with the rest by the same key (one at the same store has a pickup
estimate near zero, so it usually wins). A driver never has two pending offers either way.
"""
from __future__ import annotations

import heapq
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.gis.db.models.functions import Distance as GeographyDistance
from django.contrib.gis.geos import Point
from django.db import connection
from django.db.models import BooleanField, CharField, Case, Exists, ExpressionWrapper, F, FloatField, OuterRef, Q, Subquery, Value, When
from django.db.models.functions import Coalesce
from django.utils import timezone

from audit.models import AuditEventType as E
from audit.models import DeliveryAuditLog
from audit.services import audit_record
from availability import live
from availability.geo import NearbyDriver, drivers_available_near
from availability.models import Driver, DriverAvailability
from availability.services import DRIVER_FREED_EXPIRES_SECONDS, DRIVER_FREED_TASK
from common.actors import Actor
from common.bidi import bidi_isolated
from common.broadcast import enqueue_task_on_commit
from common.exceptions import Conflict
from common.hotsql import cached_rows
from dispatch.models import Assignment, Delivery, DeliveryStatus, DispatchPolicy
from escalation.models import FailureReason, UnassignedOrder
from escalation.services import unassigned_record_failure
from offers.models import DriverOffer, OfferStatus
from offers.services import offer_insert_locked, offers_insert_round_locked
from tracking import eta
from workflows import locks
from workflows.matching_window import delivery_wait_for_round_locked
from workflows.stacking import stacking_candidates
from workflows.unit import unit_of_work
from zones.models import DeliveryZone, DriverZonePreference
from zones.policies import zone_policy

logger = logging.getLogger(__name__)

CANDIDATE_POOL = 100  # nearest drivers considered per attempt
NEAR_EQUAL_SECONDS = 120  # pickup estimates within this of the fastest remaining count as near-equal
TOP_CANDIDATES_AUDITED = 5
# A dispatch that found every candidate held by another transaction or gone waits, a moment
# each, for the first few held ones (`locks.lock_driver_waiting`): a batch of location fixes
# being written, or another dispatch's claim, holds its drivers' rows for milliseconds, and
# passing them over left the delivery unassigned ("all drivers busy") with a free driver next
# to it, until the retry job 30 s later (an audit: 6 of 30 rounds of 5 orders at one spot).
# Only a caller that holds no driver row waits (`wait_for_held`: a new delivery, ops' dispatch,
# the retry job): a reject, an expiry, an availability change or a reassign holds the answering
# driver, and waiting on another driver then could meet the stream consumer's batch, which
# takes driver rows in id order, in a cycle. The wait is one budget for all the looks.
HELD_RECHECKS = 3
HELD_WAIT_MS = 200
# A dispatch that did not wait (its caller holds a driver row, or a batch/broadcast round, which
# claims its drivers in one SKIP LOCKED statement) and found nobody because candidates were held
# takes a second look after commit, off the request, a moment later: the task
# `dispatch.second_look` (`delivery_second_look`), which holds no driver row, so a sequential
# dispatch waits as above (a round claims again, SKIP LOCKED, the moment later). So does an
# answer's follow-up (a reject, an expiry, a withdrawal: no waiting caller) that found its
# candidates' offers for other deliveries pending: answered at the same moment, they are free
# a moment later.
# Before it, such a delivery waited for the retry job (up to 30 s) with a free driver next to it.
SECOND_LOOK_TASK = "dispatch.second_look"
SECOND_LOOK_DELAY_SECONDS = 0.2


@dataclass
class Candidate:
    driver_id: str
    distance_km: float
    pickup_seconds: float
    preference: str
    acceptance_rate: float
    stacked: bool = False  # busy, taking it on top of what it carries (order stacking)

    def tie_key(self):
        """The order among near-equals (see `rank`)."""
        return (0 if self.preference == "PREFERRED" else 1, -self.acceptance_rate, self.pickup_seconds, self.driver_id)


def rank(candidates: list[Candidate]) -> list[Candidate]:
    """Candidates best first: by estimated pickup time, except that among near-equals, those
    within NEAR_EQUAL_SECONDS of the fastest driver not yet ranked, PREFERRED-zone drivers come
    first, then the higher acceptance rate. The window is anchored on that fastest driver, not
    on fixed two-minute bands: with bands, two drivers 3 s apart across a band's edge were
    ranked by band, and a PREFERRED driver 30 s behind lost where one 110 s behind won."""
    by_time = sorted(candidates, key=lambda c: (c.pickup_seconds, c.driver_id))
    ranked: list[Candidate] = []
    window: list[tuple] = []  # heap of (tie_key, position in by_time) of the drivers in the window
    taken = [False] * len(by_time)
    fastest = added = 0  # by_time[fastest]: the fastest not yet ranked; by_time[:added] entered the window
    while len(ranked) < len(by_time):
        while fastest < len(by_time) and taken[fastest]:
            fastest += 1
        horizon = by_time[fastest].pickup_seconds + NEAR_EQUAL_SECONDS
        while added < len(by_time) and by_time[added].pickup_seconds <= horizon:
            heapq.heappush(window, (by_time[added].tie_key(), added))
            added += 1
        _, position = heapq.heappop(window)
        taken[position] = True
        ranked.append(by_time[position])
    return ranked


@dataclass
class DispatchResult:
    outcome: str  # offered | unassigned | not_ready | already_offered | ops_only | waiting (batched_matching)
    offer: DriverOffer | None = None  # offered: the best-ranked offer made (the delivery's current offer)
    offers: list[DriverOffer] = field(default_factory=list)  # offered: every offer of the round (one when sequential)
    failure_reason: str | None = None
    candidates: list[Candidate] = field(default_factory=list)
    search_radius_km: float | None = None

    def text(self) -> str:
        """The outcome in words, for a person (a ticket's note, an ops console message)."""
        return {
            "offered": f"offered to {bidi_isolated(self.offer.driver.name)}" if self.offer else "offered",
            "already_offered": "an offer to a driver is already pending",
            "unassigned": f"nobody found ({self.failure_reason})",
            "not_ready": "not offered: the delivery is not ready",
            "ops_only": "not offered: the delivery was created with autoDispatch false, ops offer it",
            "waiting": "waiting for the zone's next matching round (batched_matching)",
        }.get(self.outcome, self.outcome)


def _zone(delivery: Delivery):
    return delivery.zone if getattr(delivery, "zone_id", None) else None


def round_size_for(delivery: Delivery) -> int:
    """How many drivers one dispatch round offers the delivery at once, by its zone's policy:
    1 (sequential; batched_matching offers its matches one by one), the batch size (batch), the
    broadcast cap (broadcast; a cap of 1 is sequential dispatch: one single offer)."""
    policy = zone_policy(_zone(delivery))
    if policy.policy == DispatchPolicy.BATCH:
        return policy.batch_size
    if policy.policy == DispatchPolicy.BROADCAST:
        return policy.broadcast_max
    return 1


def search_radius_for(delivery: Delivery) -> float:
    zone = _zone(delivery)
    override = getattr(zone, "search_radius_km", None) if zone else None
    return float(override or settings.DISPATCH_RADIUS_KM)


@dataclass
class _Screening:
    ranked: list[Candidate]
    pending_elsewhere: int = 0
    offered_before: int = 0
    unavailable_for_zone: int = 0
    no_longer_available: int = 0
    passed_over: int = 0  # ranked, but not claimed under the lock: held by another transaction (or just gone)


def answer_counts():
    """A driver's answered (accepted, rejected or expired) and accepted offer counts, as two
    expressions on `Driver`: its running performance counters (`analytics.DriverPerformance`,
    bumped in the transaction of every answer and expiry), never a count over its offer
    history, which grows with every offer it ever had (a hundred candidates a dispatch)."""
    accepted = F("performance__offers_accepted")
    answered = accepted + F("performance__offers_rejected") + F("performance__offers_expired")
    return Coalesce(answered, 0), Coalesce(accepted, 0)


def _screening_rows(delivery: Delivery, ids: list[str]) -> dict[str, tuple]:
    """What screening needs of each nearby driver, in one statement: availability and vehicle
    (PostgreSQL has the last word: Redis is derived and may lag a moment), whether it was
    offered this delivery before (or assigned it), whether it has a pending offer, its preference for the
    delivery's zone, its answered / accepted offer counts (the acceptance rate) and whether its
    login is active."""
    zone_id = getattr(delivery, "zone_id", None)
    ids = list(dict.fromkeys(ids))
    # The statement's shape is its number of ids: padded to a power of two with the last one
    # repeated (harmless in IN), a handful of shapes to compile per connection, not one per count.
    ids += ids[-1:] * ((1 << (len(ids) - 1).bit_length()) - len(ids))

    def build(delivery_id, *rest):
        offers = DriverOffer.objects.filter(driver=OuterRef("pk"))
        zone, driver_ids = (rest[0], rest[1:]) if zone_id else (None, rest)
        preference = (
            Subquery(DriverZonePreference.objects.filter(zone_id=zone, driver=OuterRef("pk")).values("preference")[:1])
            if zone_id else Value(None, output_field=CharField())
        )
        return Driver.objects.filter(pk__in=driver_ids).order_by().values_list(
            # (the login: a deactivated one, freed since, is no candidate; the stale-driver job
            # takes it offline. Named fields before the expressions: Django lists them first.)
            "pk", "availability", "vehicle_type", "user__is_active",
            # offered it before, or had it (ops' direct assignment, no offer, then a reassign
            # that took it away: the retry job offered it back to that driver)
            ExpressionWrapper(
                Q(Exists(offers.filter(delivery_id=delivery_id)))
                | Q(Exists(Assignment.objects.filter(driver=OuterRef("pk"), delivery_id=delivery_id))),
                output_field=BooleanField(),
            ),
            Exists(offers.filter(status=OfferStatus.PENDING)),
            preference,
            *answer_counts(),
        )
    # compiled once per connection and shape (with or without a zone, how many candidates)
    rows = cached_rows(("screening", bool(zone_id), len(ids)), Driver, build,
                       delivery.pk, *((zone_id,) if zone_id else ()), *ids)
    return {str(row[0]): row[1:] for row in rows}


def rank_candidates(delivery: Delivery, nearby: list[NearbyDriver], *, stackable=frozenset()) -> _Screening:
    """`stackable`: ids of busy drivers who qualified for order stacking (busy is fine for them)."""
    ids = [n.driver_id for n in nearby]
    if not ids:
        return _Screening(ranked=[])
    rows = _screening_rows(delivery, ids)
    screening = _Screening(ranked=[])
    for n in nearby:
        availability, vehicle_type, active, offered_before, pending, preference, answered, accepted = rows.get(
            n.driver_id, (None, None, False, False, False, None, 0, 0)
        )
        if offered_before:
            screening.offered_before += 1
        elif pending:
            screening.pending_elsewhere += 1
        elif preference == "UNAVAILABLE":
            screening.unavailable_for_zone += 1
        elif not active or availability != DriverAvailability.AVAILABLE and not (
            n.driver_id in stackable and availability == DriverAvailability.BUSY
        ):
            screening.no_longer_available += 1
        else:
            screening.ranked.append(
                Candidate(
                    driver_id=n.driver_id,
                    distance_km=n.distance_km,
                    pickup_seconds=eta.travel_seconds(n.distance_km, vehicle_type),
                    preference=preference or "AVAILABLE",
                    # (accepted + 1) / (answered or expired + 1): new drivers start near the top, not at 0
                    acceptance_rate=(accepted + 1) / (answered + 1),
                    stacked=availability == DriverAvailability.BUSY,
                )
            )
    screening.ranked = rank(screening.ranked)
    return screening


_BUSY_NEAR_SQL = """
SELECT EXISTS (
  SELECT 1 FROM dispatch_driver d
  WHERE d.location IS NOT NULL AND d.location_recorded_at >= %(cutoff)s
    AND (d.availability = 'busy'
         OR EXISTS (SELECT 1 FROM driver_offers o WHERE o.driver_id = d.id AND o.status = 'PENDING'))
    AND ST_DWithin(d.location, ST_SetSRID(ST_MakePoint(%(lon)s, %(lat)s), 4326)::geography, %(radius_m)s, false)
)
"""


def _failure_reason(delivery: Delivery, screening: _Screening, nearby: list, radius_km: float, now: datetime) -> str:
    lat, lon = delivery.pickup_location.y, delivery.pickup_location.x
    if nearby:
        # Drivers are near but none could take it: busy with other offers or work, or they
        # all declined this one (or do not work this zone).
        if screening.pending_elsewhere or screening.no_longer_available:
            return FailureReason.ALL_DRIVERS_BUSY
        return FailureReason.NO_AVAILABLE_DRIVERS
    cutoff = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    with connection.cursor() as cur:
        cur.execute(_BUSY_NEAR_SQL, {"cutoff": cutoff, "lat": lat, "lon": lon, "radius_m": radius_km * 1000})
        if cur.fetchone()[0]:
            return FailureReason.ALL_DRIVERS_BUSY
    # Beyond the radius, only drivers who could take it count (the screening's rules): one who
    # marked the zone UNAVAILABLE, or had the delivery before, made it "distance_exceeded",
    # where a wider search cannot help. A zone larger than the wide ring with such a driver in
    # it, out of the ring's reach, is not "zone_empty" either (it was said with drivers in the
    # zone): drivers there are too far, "distance_exceeded".
    wide = max(settings.DISPATCH_WIDE_RADIUS_KM, radius_km * 2)
    further = drivers_available_near(lat=lat, lon=lon, radius_km=wide, limit=FAILURE_LOOK_AHEAD, now=now, positions=False)
    if further and rank_candidates(delivery, further).ranked:
        return FailureReason.DISTANCE_EXCEEDED
    if getattr(delivery, "zone_id", None):
        if _available_in_zone(delivery, now):
            return FailureReason.DISTANCE_EXCEEDED
        return FailureReason.ZONE_EMPTY
    return FailureReason.NO_AVAILABLE_DRIVERS


# How many drivers beyond the radius the failure reason screens, nearest first (a failed
# attempt, the retry job's every 30 s included, pays one search and one screening for them)
FAILURE_LOOK_AHEAD = 10

# An available driver with a fresh fix in the delivery's zone who could take it: the
# screening's rules (not UNAVAILABLE for the zone, never offered or assigned the delivery, no
# pending offer, an active login). `&&` on the geography finds the drivers in the zone's
# bounding box by the location index; ST_Covers then keeps those in the polygon.
_AVAILABLE_IN_ZONE_SQL = f"""
SELECT EXISTS (
  SELECT 1 FROM {Driver._meta.db_table} d
  JOIN {DeliveryZone._meta.db_table} z ON z.id = %(zone)s
  JOIN {get_user_model()._meta.db_table} u ON u.id = d.user_id AND u.is_active
  WHERE d.availability = 'available' AND d.location_recorded_at >= %(cutoff)s
    AND d.location && z.geometry::geography AND ST_Covers(z.geometry, d.location::geometry)
    AND NOT EXISTS (SELECT 1 FROM {DriverZonePreference._meta.db_table} p
                    WHERE p.driver_id = d.id AND p.zone_id = z.id AND p.preference = 'UNAVAILABLE')
    AND NOT EXISTS (SELECT 1 FROM {DriverOffer._meta.db_table} o
                    WHERE o.driver_id = d.id AND (o.delivery_id = %(delivery)s OR o.status = 'PENDING'))
    AND NOT EXISTS (SELECT 1 FROM {Assignment._meta.db_table} a WHERE a.driver_id = d.id AND a.delivery_id = %(delivery)s)
)
"""


def _available_in_zone(delivery: Delivery, now: datetime) -> bool:
    """Whether the delivery's zone has a driver who could take it (_AVAILABLE_IN_ZONE_SQL)."""
    cutoff = now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    with connection.cursor() as cur:
        cur.execute(_AVAILABLE_IN_ZONE_SQL, {"zone": delivery.zone_id, "cutoff": cutoff, "delivery": delivery.pk})
        return cur.fetchone()[0]


def _pending_offer(delivery: Delivery, *, no_pending_offer: bool) -> DispatchResult | None:
    """`already_offered` while an offer of the delivery is pending, else None. With
    `no_pending_offer` the caller has just closed one (or the delivery is new): the locked
    row's `current_offer` says whether another offer of its round still waits for an answer
    (it is set exactly while one is pending), without a query."""
    if no_pending_offer:
        return DispatchResult("already_offered") if delivery.current_offer_id is not None else None
    pending = DriverOffer.objects.filter(delivery=delivery, status=OfferStatus.PENDING).order_by("slot").first()
    return DispatchResult("already_offered", offer=pending) if pending is not None else None


def _claim(candidate: Candidate | None = None, *, stacked: bool = False) -> dict:
    """What a candidate must still be when claimed under its lock: available, or — a stacked
    one — busy with room under its capacity."""
    if stacked or (candidate is not None and candidate.stacked):
        return {"availability": DriverAvailability.BUSY, "active_assignments__lt": F("capacity")}
    return {"availability": DriverAvailability.AVAILABLE}


def _offer_round(
    delivery: Delivery, screening: _Screening, *, size: int, actor: Actor, now: datetime, radius: float
) -> list[DriverOffer]:
    """A batch or broadcast round: the best `size` candidates, claimed with SKIP LOCKED in one
    statement and offered by one INSERT. A candidate held elsewhere, no longer available or
    refused by the database (a pending offer elsewhere) is replaced by the next ones in rank
    order until the round is full or the candidates run out."""
    made: list[DriverOffer] = []
    queue = iter(screening.ranked)
    slot = 1
    while len(made) < size:
        chunk = list(islice(queue, size - len(made)))
        if not chunk:
            break
        claimed = locks.lock_drivers_skip_locked(
            [c.driver_id for c in chunk if not c.stacked], availability=DriverAvailability.AVAILABLE, location__isnull=False
        )
        if any(c.stacked for c in chunk):  # order stacking: busy with room (a second statement only then)
            claimed.update(locks.lock_drivers_skip_locked(
                [c.driver_id for c in chunk if c.stacked], location__isnull=False, **_claim(stacked=True)
            ))
        drivers = [claimed[c.driver_id] for c in chunk if c.driver_id in claimed]
        # held by another transaction (another dispatch, an answer) or no longer available: busy
        screening.no_longer_available += len(chunk) - len(drivers)
        screening.passed_over += len(chunk) - len(drivers)
        if not drivers:
            continue
        offers = offers_insert_round_locked(
            delivery=delivery, drivers=drivers, first_slot=slot, actor=actor, now=now, search_radius_km=radius
        )
        screening.pending_elsewhere += len(drivers) - len(offers)
        slot += len(drivers)
        made.extend(offers)
    return made


def dispatch_locked(
    delivery: Delivery, *, actor: Actor, now: datetime, radius_km: float | None = None, exclude_driver_ids=(),
    no_pending_offer: bool = False, wait_for_held: bool = False, look_again: bool = True,
) -> DispatchResult:
    """Offer a ready delivery to its best candidate, or to its best N in one round (the zone's
    policy: `round_size_for`). The caller holds the delivery's lock.
    `no_pending_offer`: the caller knows the delivery has none (a new delivery) or has just
    closed one (answered, expired, withdrawn), so it is not looked up: the locked row's
    `current_offer` says whether another offer of the same round still waits (then no new
    round: `already_offered`); the database still refuses a second single offer.

    Candidate drivers are locked with SKIP LOCKED: a driver another transaction is working on
    is passed over rather than waited for, so dispatch never deadlocks with accept/availability.
    With `wait_for_held` (a caller holding no driver row) and every candidate passed over, the
    first few held ones are waited for within one HELD_WAIT_MS budget (`locks.lock_driver_waiting`).
    Without it (or in a round), and nobody found because candidates were held, a second look is
    taken after commit (SECOND_LOOK_TASK), unless `look_again` is False (the second look itself).
    """
    if delivery.status != DeliveryStatus.READY:
        return DispatchResult("not_ready")
    waiting = _pending_offer(delivery, no_pending_offer=no_pending_offer)
    if waiting is not None:
        return waiting

    radius = float(radius_km or search_radius_for(delivery))
    size = round_size_for(delivery)
    lat, lon = delivery.pickup_location.y, delivery.pickup_location.x
    audit_record(delivery=delivery, event_type=E.ASSIGNMENT_STARTED, actor=actor, now=now, details={"searchRadiusKm": radius})
    nearby = drivers_available_near(
        lat=lat, lon=lon, radius_km=radius, limit=max(CANDIDATE_POOL, size), now=now, positions=False)
    stackable = stacking_candidates(delivery, now=now)  # none unless the zone stacks orders
    if stackable:  # (the GEO index may still list one as available for a moment)
        listed = {n.driver_id for n in nearby}
        nearby = [*nearby, *(s for s in stackable if s.driver_id not in listed)]
    if exclude_driver_ids:
        excluded = {str(x) for x in exclude_driver_ids}
        nearby = [n for n in nearby if n.driver_id not in excluded]
    screening = rank_candidates(delivery, nearby, stackable=frozenset(n.driver_id for n in stackable))
    audit_record(
        delivery=delivery, event_type=E.DRIVER_CANDIDATES_FOUND, actor=actor, now=now,
        details={
            "count": len(screening.ranked),
            "searchRadiusKm": radius,
            "nearbyDrivers": len(nearby),
            "topCandidates": [
                {"driverId": c.driver_id, "distanceKm": round(c.distance_km, 3),
                 "estimatedPickupMin": round(c.pickup_seconds / 60, 1), "preference": c.preference,
                 "acceptanceRate": round(c.acceptance_rate, 3), **({"stacked": True} if c.stacked else {})}
                for c in screening.ranked[:TOP_CANDIDATES_AUDITED]
            ],
        },
    )
    if size > 1:
        made = _offer_round(delivery, screening, size=size, actor=actor, now=now, radius=radius)
        if made:
            return DispatchResult("offered", offer=made[0], offers=made, candidates=screening.ranked, search_radius_km=radius)
    else:
        passed_over = []
        for candidate in screening.ranked:
            driver = locks.lock_driver(candidate.driver_id, skip_locked=True, location__isnull=False, **_claim(candidate))
            if driver is None:  # held by another transaction (another dispatch, an answer) or no longer available: busy
                screening.no_longer_available += 1
                screening.passed_over += 1
                passed_over.append(candidate)
                continue
            try:
                offer = offer_insert_locked(delivery=delivery, driver=driver, actor=actor, now=now, search_radius_km=radius)
            except Conflict:
                screening.pending_elsewhere += 1
                continue
            return DispatchResult("offered", offer=offer, offers=[offer], candidates=screening.ranked, search_radius_km=radius)
        deadline = time.monotonic() + HELD_WAIT_MS / 1000
        for candidate in passed_over[:HELD_RECHECKS] if wait_for_held else ():  # (nobody else: the held ones)
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                break
            driver = locks.lock_driver_waiting(candidate.driver_id, wait_ms=left_ms, location__isnull=False,
                                               **_claim(candidate))
            if driver is None:
                continue
            # (stamped after the wait: the holder's change, committed meanwhile, comes first)
            later = max(now, timezone.now())
            try:
                offer = offer_insert_locked(delivery=delivery, driver=driver, actor=actor, now=later, search_radius_km=radius)
            except Conflict:
                continue
            return DispatchResult("offered", offer=offer, offers=[offer], candidates=screening.ranked, search_radius_km=radius)

    reason = _failure_reason(delivery, screening, nearby, radius, now)
    unassigned_record_failure(delivery=delivery, reason=reason, now=now)
    held = screening.passed_over and (size > 1 or not wait_for_held)
    # (an answer's follow-up that found the others' offers pending: drivers rejecting at once, or
    # their offers expiring together, free each other a moment later; each follow-up saw the
    # others' offers still pending, and the deliveries waited for the retry job, ~30 s: an audit)
    answering = screening.pending_elsewhere and not wait_for_held
    if look_again and (held or answering):
        # (this look's radius and exclusions: ops' own radius or the wide tier of an expired
        # offer, a reassign's previous driver)
        enqueue_task_on_commit(SECOND_LOOK_TASK, str(delivery.pk), now.isoformat(), radius_km,
                               [str(x) for x in exclude_driver_ids], countdown=SECOND_LOOK_DELAY_SECONDS)
    return DispatchResult("unassigned", failure_reason=reason, candidates=screening.ranked, search_radius_km=radius)


def ops_started(delivery_ref: str = "pk") -> Q:
    """Whether ops started a delivery's dispatch (for one created with autoDispatch false): it
    was offered (an ops offer to a chosen driver, or a round ops asked for), or dispatched
    and nobody found (every dispatch writes `assignment_started` first). `delivery_ref`: the
    delivery's id as seen from the filtered model."""
    offered = DriverOffer.objects.filter(delivery_id=OuterRef(delivery_ref))
    searched = DeliveryAuditLog.objects.filter(delivery_id=OuterRef(delivery_ref), event_type=E.ASSIGNMENT_STARTED)
    return Q(Exists(offered)) | Q(Exists(searched))


def dispatch_next_locked(delivery: Delivery, *, actor: Actor, now: datetime, **kwargs) -> DispatchResult:
    """The automatic next offer: after a rejected, expired or withdrawn offer, a reassignment,
    by the retry job and the escalation check. The caller holds the delivery's lock.

    A delivery created with autoDispatch false is not dispatched until ops offer it (an offer to
    a chosen driver, a dispatch, a redispatch: `ops_started`, even one that found nobody). Once
    ops have, the SPEC's rule holds for it as for any other: a reject, an expiry or a withdrawal moves it to the next candidate, and the
    retry job and the escalation check dispatch it. Until then it goes back to ops: still ready,
    with an open unassigned record (reason `unassigned`) that lists it in
    `/v2/admin/unassigned-orders`, for ops to offer or dispatch it.

    In a batched_matching zone the delivery waits for the zone's next matching round instead
    (outcome `waiting`; `workflows.matching`), unless that would carry it past the zone's target
    wait. Ops asking (`delivery_dispatch`, a manual escalation) are served at once, and so is an
    autoDispatch false delivery (the matching rounds take only automatic ones)."""
    if delivery.auto_dispatch:
        if (
            delivery.status == DeliveryStatus.READY
            and delivery.current_offer_id is None  # set exactly while an offer is pending
            and delivery_wait_for_round_locked(delivery, now=now)
        ):
            return DispatchResult("waiting")
        return dispatch_locked(delivery, actor=actor, now=now, **kwargs)
    if delivery.status != DeliveryStatus.READY:
        return DispatchResult("not_ready")
    if Delivery.objects.filter(ops_started(), pk=delivery.pk).exists():
        return dispatch_locked(delivery, actor=actor, now=now, **kwargs)
    unassigned_record_failure(delivery=delivery, reason=FailureReason.UNASSIGNED, now=now)
    return DispatchResult("ops_only", failure_reason=FailureReason.UNASSIGNED)


@unit_of_work()
def delivery_dispatch(*, delivery_id, actor: Actor, radius_km: float | None = None, now: datetime | None = None, strict: bool = False) -> DispatchResult:
    """Lock the delivery and dispatch it. With `strict` (ops asking), a delivery that is not
    ready or already has a pending offer is a Conflict instead of a quiet no-op."""
    delivery = locks.lock_delivery(delivery_id, select_related=("zone",))
    now = now or timezone.now()  # after the lock, as offer_create
    result = dispatch_locked(delivery, actor=actor, now=now, radius_km=radius_km, wait_for_held=True)
    if strict and result.outcome == "not_ready":
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be dispatched.")
    if strict and result.outcome == "already_offered":
        raise Conflict("The delivery already has a pending offer.")
    return result


def unassigned_retry(*, now: datetime | None = None, batch_size: int = 100) -> int:
    """The retry job: dispatch again every open unassigned delivery that is still ready and has
    no pending offer (oldest attempt first), except those created with autoDispatch false that
    ops never offered (`dispatch_next_locked`), those already waiting for a matching round and
    those attempted less than DISPATCH_RETRY_MIN_GAP_SECONDS ago (two runs close together, a
    worker catching up on a backlog say, attempt each delivery once; the next run takes them).
    In a batched_matching zone the retry enters the next round. Returns how many got an offer."""
    now = now or timezone.now()
    tried_before = now - timedelta(seconds=settings.DISPATCH_RETRY_MIN_GAP_SECONDS)
    rows = list(
        UnassignedOrder.objects.filter(
            resolved_at__isnull=True, delivery__status=DeliveryStatus.READY, delivery__current_offer__isnull=True,
            last_attempt_at__lte=tried_before,
            delivery__matching_since__isnull=True,  # waiting: the zone's matching round has it
        )
        # autoDispatch false and never offered or dispatched by ops: ops start it (dispatching it
        # here would go against the seller's choice)
        .filter(Q(delivery__auto_dispatch=True) | ops_started("delivery_id"))
        # (ties, common when one run attempted them all at once: the oldest order first, then
        # by id, so the order never depends on a query plan; the simulator's runs repeat)
        .order_by("last_attempt_at", "delivery__created_at", "delivery_id")
        .values_list("delivery_id", "escalation_level")[:batch_size]
    )
    offered = 0
    for delivery_id, level in rows:
        try:
            # (attempted since the list was read, by a run at once with this one: its turn is next run)
            result = _retry_one(delivery_id, level, now=now, attempted=Q(last_attempt_at__lte=tried_before))
            offered += result is not None and result.outcome == "offered"
        except Exception:
            logger.exception("retrying dispatch of delivery %s failed", delivery_id)
    return offered


def _retry_one(delivery_id, level: int, *, now: datetime, attempted: Q, radius_km: float | None = None,
               **kwargs) -> DispatchResult | None:
    """Dispatch an unassigned delivery again, as the retry job does, if its open record still
    matches `attempted` (None: it does not, or another transaction holds the delivery)."""
    # Once escalated to the wide-radius tier, keep searching that wide.
    radius = max(radius_km or 0, settings.DISPATCH_WIDE_RADIUS_KM if level >= 2 else 0) or None
    with unit_of_work():
        delivery = locks.lock_delivery(delivery_id, skip_locked=True, select_related=("zone",))
        if delivery is None:
            return None  # someone else is on it
        if not UnassignedOrder.objects.filter(attempted, delivery_id=delivery_id, resolved_at__isnull=True).exists():
            return None
        return dispatch_next_locked(delivery, actor=Actor.system(), now=now, radius_km=radius, wait_for_held=True, **kwargs)


def delivery_second_look(*, delivery_id, attempted_at: datetime, radius_km: float | None = None, exclude_driver_ids=(),
                         now: datetime | None = None) -> bool:
    """SECOND_LOOK_TASK: a dispatch at `attempted_at` found nobody because candidates were held
    by other transactions for a moment, and could not wait for them. Dispatch the delivery again
    as the retry job would (with the first look's radius and exclusions, if it had its own), now,
    holding no driver row (so a sequential dispatch waits for a held one; a round is another
    SKIP LOCKED claim, a moment later), unless it was attempted since (its record's last attempt
    is no longer `attempted_at`), answered, resolved, or is waiting for a matching round. No
    third look: the retry job takes it from there. True if it got an offer."""
    attempted = Q(last_attempt_at=attempted_at, delivery__matching_since__isnull=True)
    level = (
        UnassignedOrder.objects.filter(attempted, delivery_id=delivery_id, resolved_at__isnull=True)
        .values_list("escalation_level", flat=True).first()
    )
    if level is None:
        return False
    result = _retry_one(delivery_id, level, now=now or timezone.now(), attempted=attempted, radius_km=radius_km,
                        exclude_driver_ids=tuple(exclude_driver_ids), look_again=False)
    return result is not None and result.outcome == "offered"


# One freed driver's look: the oldest DRIVER_FREED_LOOK_AHEAD waiting deliveries in its reach,
# each dispatched to its own best candidate. One that goes to another driver (freed at the same
# moment, better placed) is not a try lost: the look goes on to the next. It stops after
# DRIVER_FREED_TRIES that offered nobody. (Counting every dispatch, a driver freed beside a
# waiting delivery with three others freed nearer to three older ones got nothing, and waited
# for the retry job: 4 of 4 runs of a black-box audit, 4-26 s.)
DRIVER_FREED_LOOK_AHEAD = 10
DRIVER_FREED_TRIES = 3
# A driver freed with no fresh fix (back on shift: the resume comes first, the app's fix just
# after it, and the look 0.2 s later found none) is looked at once more, this much later.
DRIVER_FREED_FIX_WAIT_SECONDS = 5


def driver_freed_pull(*, driver_id, freed_at: datetime, now: datetime | None = None, waited: bool = False) -> bool:
    """`availability.services.DRIVER_FREED_TASK`: the driver became available at `freed_at` (its
    last state change), or was freed of its pending offer then (a reject, a withdrawal).
    Dispatch again, as the retry job would and oldest first, the deliveries waiting for a driver
    whose search would reach it: open unassigned records of ready deliveries with no pending
    offer, not waiting for a matching round, dispatched automatically (or once by ops), whose
    pickup is within their search radius of the driver's live position (the wide one from
    escalation level 2), never offered or assigned to the driver, in a zone the driver has not marked
    UNAVAILABLE. Each goes to its best candidate, as any dispatch, oldest first, until one is
    offered to the driver, DRIVER_FREED_TRIES offered nobody, or DRIVER_FREED_LOOK_AHEAD were
    dispatched.

    Nothing is done if the driver changed state since `freed_at` (a later change has its own
    look) or has a pending offer. A driver with no fresh fix yet (back on shift after hours: its
    app posts one just after the resume) is looked at once more DRIVER_FREED_FIX_WAIT_SECONDS
    later (`waited`); still none, the retry job takes it. True if the driver got an offer."""
    now = now or timezone.now()
    driver = (
        # (a deactivated login's driver, freed from a delivery it kept: offered nothing, the
        # stale-driver job takes it offline within a minute: workflows.drivers.deactivated_drivers_mark_offline)
        # (no change since `freed_at`, or none ever: a row made available by SQL or an import)
        Driver.objects.filter(Q(last_availability_change__lte=freed_at) | Q(last_availability_change__isnull=True),
                              pk=driver_id, availability=DriverAvailability.AVAILABLE, user__is_active=True)
        .exclude(Exists(DriverOffer.objects.filter(driver=OuterRef("pk"), status=OfferStatus.PENDING)))
        .only("pk", "location", "location_recorded_at", "location_accuracy_m", "location_speed", "location_heading")
        .first()
    )
    if driver is None:
        return False
    position = live.position_latest(driver)
    fresh = position is not None and position.recorded_at >= now - timedelta(seconds=settings.DRIVER_STALE_AFTER_SECONDS)
    if not fresh or driver.location is None:  # (dispatch claims only a driver with a stored fix)
        if not waited:
            enqueue_task_on_commit(DRIVER_FREED_TASK, str(driver_id), freed_at.isoformat(), True,
                                   countdown=DRIVER_FREED_FIX_WAIT_SECONDS,
                                   expires=DRIVER_FREED_FIX_WAIT_SECONDS + DRIVER_FREED_EXPIRES_SECONDS)
        return False
    here = Point(position.lon, position.lat, srid=4326)
    own_radius_km = Coalesce(F("delivery__zone__search_radius_km"), Value(float(settings.DISPATCH_RADIUS_KM)))
    radius_m = ExpressionWrapper(
        Case(When(escalation_level__gte=2, then=Value(float(settings.DISPATCH_WIDE_RADIUS_KM))), default=own_radius_km)
        * 1000, output_field=FloatField(),
    )
    # (the open records are few, found by their partial index; a distance bound in SQL would
    # pick the location index instead, which holds every resolved record ever made)
    waiting = list(
        UnassignedOrder.objects.filter(
            resolved_at__isnull=True, delivery__status=DeliveryStatus.READY, delivery__current_offer__isnull=True,
            delivery__matching_since__isnull=True,
        )
        .filter(Q(delivery__auto_dispatch=True) | ops_started("delivery_id"))
        .exclude(Exists(DriverOffer.objects.filter(delivery_id=OuterRef("delivery_id"), driver_id=driver_id)))
        # (nor one taken away from it: ops' reassign of a delivery they had assigned, no offer)
        .exclude(Exists(Assignment.objects.filter(delivery_id=OuterRef("delivery_id"), driver_id=driver_id)))
        .exclude(Exists(DriverZonePreference.objects.filter(
            driver_id=driver_id, zone_id=OuterRef("delivery__zone_id"), preference="UNAVAILABLE")))
        .annotate(reach_m=radius_m, distance_m=GeographyDistance("location", here))
        .filter(distance_m__lte=F("reach_m"))
        .order_by("first_attempt_at", "delivery__created_at", "delivery_id")
        .values_list("delivery_id", "escalation_level")[:DRIVER_FREED_LOOK_AHEAD]
    )
    fruitless = 0
    for delivery_id, level in waiting:
        try:
            result = _retry_one(delivery_id, level, now=now, attempted=Q(delivery__matching_since__isnull=True))
        except Exception:
            logger.exception("dispatching delivery %s to freed driver %s failed", delivery_id, driver_id)
            result = None
        if result is not None and any(str(o.driver_id) == str(driver_id) for o in result.offers):
            return True
        if result is not None and result.outcome == "waiting":
            return False  # a batched_matching zone's round has it now, and weighs this driver too
        # (offered to another driver, or another worker has it, or it is no longer waiting: not a
        # try lost; several drivers freed at once look at the same oldest deliveries together)
        if result is not None and result.outcome != "offered":
            fruitless += 1
            if fruitless >= DRIVER_FREED_TRIES:
                break
    return False
