"""batched_matching: the zone's matching rounds (docs/dispatch.md, "batched_matching").

A ready delivery in a batched_matching zone is not offered when it is created, rejected or
expired: it waits (`Delivery.matching_since`, `workflows.matching_window`). A zone's round is
due once its oldest waiting delivery has waited the zone's window: a Celery task scheduled for
that moment (`dispatch.run_matching_round`, ETA) runs it, and a beat sweep every 15 s
(`dispatch.run_matching_rounds`) runs any due round a lost task missed — the pattern of offer
expiry. The round takes every waiting delivery of the zone, and

1. finds each one's candidates as sequential dispatch does (the nearest available drivers with
   a fresh fix within its radius — the wide radius once escalated to level 2 — with no pending
   offer, not UNAVAILABLE for the zone, never offered it before);
2. serves first, greedily and oldest first, the deliveries the window would otherwise carry
   past the zone's target wait (each to its best-ranked free candidate, the sequential rank);
3. matches the others to the remaining drivers by minimum total cost
   (`scipy.optimize.linear_sum_assignment`): cost = estimated pickup seconds
   + ACCEPTANCE_PENALTY × (1 − acceptance rate) + NOT_PREFERRED_PENALTY unless the driver
   PREFERS the zone; pairs that are not candidates cannot be matched;
4. offers each matched pair through the sequential offer path (one offer per delivery, the same
   payload, audit and events); a delivery that lost the matching waits for the next round; one
   with no candidate at all is recorded unassigned as today (the retry job brings it back).

Race safety: a round holds a transaction-scoped advisory lock on its zone (a second round of
the same zone, in another worker, waits for it, then finds nothing due), locks the waiting
deliveries and the candidate drivers with `FOR UPDATE SKIP LOCKED` (a row that an ops action,
an accept or another dispatch is changing is left for the next round, never waited for: no
deadlock), and the database refuses a second pending offer per delivery and per driver
whatever happens.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from django.conf import settings
from django.db import connection
from django.db.models import CharField, Exists, Min, OuterRef, Q, Subquery, Value
from django.utils import timezone
from scipy.optimize import linear_sum_assignment

from audit.models import AuditEventType as E
from audit.services import audit_record
from availability.geo import NearbyDriver, drivers_available_near
from availability.models import Driver, DriverAvailability
from common.actors import Actor
from common.broadcast import enqueue_task_on_commit
from common.exceptions import Conflict
from dispatch.models import Assignment, Delivery, DeliveryStatus
from escalation.models import UnassignedOrder
from escalation.services import unassigned_record_failure
from offers.models import DriverOffer, OfferStatus
from offers.services import offer_insert_locked
from tracking import eta
from workflows.dispatching import (
    CANDIDATE_POOL,
    TOP_CANDIDATES_AUDITED,
    Candidate,
    answer_counts,
    _failure_reason,
    _Screening,
    rank,
    search_radius_for,
)
from workflows.matching_window import ROUND_TASK, past_target, policy_of, window_seconds
from workflows.unit import unit_of_work
from zones.models import DeliveryZone, DriverZonePreference
from zones.policies import zone_policy

logger = logging.getLogger(__name__)

INFEASIBLE = 1e9  # the cost of a pair that is not a candidate: more than any sum of real costs
POLICY = "batched_matching"


def pair_cost(candidate: Candidate) -> float:
    """What offering the delivery to this driver costs, in seconds: the estimated pickup time,
    plus ACCEPTANCE_PENALTY × (1 − acceptance rate) (a driver likely to decline costs a window
    and an expiry), plus NOT_PREFERRED_PENALTY unless the driver prefers the zone."""
    cost = candidate.pickup_seconds
    cost += settings.DISPATCH_MATCHING_ACCEPTANCE_PENALTY_SECONDS * (1.0 - min(candidate.acceptance_rate, 1.0))
    if candidate.preference != "PREFERRED":
        cost += settings.DISPATCH_MATCHING_NOT_PREFERRED_PENALTY_SECONDS
    return cost


def assign_min_cost(costs: list[list[float]]) -> list[tuple[int, int]]:
    """Row → column pairs of minimum total cost, at most one per row and per column, never an
    INFEASIBLE one. The INFEASIBLE entries outweigh any sum of real costs, so the solution
    first matches as many rows as possible, then at the least total cost."""
    if not costs or not costs[0]:
        return []
    matrix = np.asarray(costs, dtype=float)
    rows, cols = linear_sum_assignment(matrix)
    return [(int(r), int(c)) for r, c in zip(rows, cols, strict=True) if matrix[r, c] < INFEASIBLE]


# --------------------------------------------------------------------------- which zones are due


def _zone_filter(zone_id) -> dict:
    return {"zone__isnull": True} if zone_id is None else {"zone_id": zone_id}


def _waiting():
    return Delivery.objects.filter(
        status=DeliveryStatus.READY, matching_since__isnull=False, current_offer__isnull=True, auto_dispatch=True
    )


def round_times(*, zone_ids=None) -> dict:
    """When each zone's round is due (zone id → datetime; None: deliveries outside every zone):
    once its oldest waiting delivery has waited the zone's window. A zone no longer on
    batched_matching (or with window 0) is due at once, so what waits there is matched one
    last time. `zone_ids`: only these. Two queries."""
    waiting = _waiting()
    if zone_ids is not None:
        known = [z for z in zone_ids if z is not None]
        in_zones = Q(zone_id__in=known)
        waiting = waiting.filter(in_zones | Q(zone__isnull=True) if None in zone_ids else in_zones)
    oldest = dict(waiting.order_by().values("zone_id").annotate(oldest=Min("matching_since")).values_list("zone_id", "oldest"))
    zones = DeliveryZone.objects.in_bulk([z for z in oldest if z is not None])
    return {
        zone_id: since + timedelta(seconds=window_seconds(zone_policy(zones.get(zone_id))))
        for zone_id, since in oldest.items()
    }


def zones_due(now: datetime) -> list:
    """Zone ids whose round is due now (see `round_times`)."""
    return [zone_id for zone_id, due in round_times().items() if due <= now]


def round_schedule(zone_id, *, at: datetime) -> None:
    """After commit, a task runs the zone's round at `at` (the sweep catches a lost one)."""
    enqueue_task_on_commit(ROUND_TASK, None if zone_id is None else str(zone_id), eta=at)


# --------------------------------------------------------------------------- one round


@dataclass
class RoundResult:
    zone_id: object
    not_due: bool = False  # it waited behind another round of the zone, which did the work
    deliveries: int = 0
    drivers: int = 0
    offered: list[DriverOffer] = field(default_factory=list)
    greedy: int = 0  # offers made to deliveries at their target wait
    unassigned: int = 0
    waiting: int = 0  # lost the matching: the next round has them
    total_cost_seconds: float = 0.0


@dataclass
class _Item:
    delivery: Delivery
    radius_km: float
    nearby: list[NearbyDriver]
    urgent: bool
    candidates: list[Candidate] = field(default_factory=list)
    held_elsewhere: int = 0
    screening: _Screening = field(default_factory=lambda: _Screening(ranked=[]))


def _zone_lock(zone_id) -> None:
    """The zone's round lock, held until the transaction ends: rounds of one zone run one after
    the other (a round waits only for another round; it never waits for a row, see SKIP LOCKED
    below, so this wait cannot be part of a deadlock)."""
    with connection.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"dispatch.matching:{zone_id or 'none'}"])


def _lock_waiting(zone_id, now: datetime) -> list[Delivery]:
    """The zone's waiting deliveries, oldest first, locked; rows another transaction holds are
    skipped (the next round has them). Each carries its open unassigned record's escalation
    level (`open_level`, None without one)."""
    open_level = UnassignedOrder.objects.filter(delivery=OuterRef("pk"), resolved_at__isnull=True).values("escalation_level")[:1]
    return list(
        _waiting().filter(matching_since__lte=now, **_zone_filter(zone_id))
        .select_related("zone").select_for_update(of=("self",), skip_locked=True)
        .annotate(open_level=Subquery(open_level))
        .order_by("ready_at", "pk")[: settings.DISPATCH_MATCHING_MAX_DELIVERIES]
    )


def _lock_drivers(ids: list[str]) -> dict[str, Driver]:
    """The candidate drivers that are available with a fix and hold no pending offer, locked;
    a driver another transaction holds is skipped (SKIP LOCKED), never waited for."""
    if not ids:
        return {}
    pending = DriverOffer.objects.filter(driver=OuterRef("pk"), status=OfferStatus.PENDING)
    rows = (
        Driver.objects.select_for_update(of=("self",), skip_locked=True)
        .filter(~Exists(pending), pk__in=ids, availability=DriverAvailability.AVAILABLE, location__isnull=False)
        .order_by("pk")
    )
    return {str(d.pk): d for d in rows}


@dataclass(frozen=True)
class _Facts:
    available: bool
    pending: bool
    preference: str | None
    answered: int
    accepted: int
    active: bool = True  # the login (a deactivated one is offered nothing)


def _driver_facts(ids: list[str], zone_id) -> dict[str, _Facts]:
    """What screening needs of every nearby driver, in one statement (no lock): availability,
    a pending offer, the preference for the zone and the answered/accepted offer counts."""
    if not ids:
        return {}
    preference = (
        Subquery(DriverZonePreference.objects.filter(zone_id=zone_id, driver=OuterRef("pk")).values("preference")[:1])
        if zone_id else Value(None, output_field=CharField())
    )
    rows = Driver.objects.filter(pk__in=ids).order_by().values_list(
        "pk", "availability", "user__is_active",  # (named fields before the expressions: Django lists them first)
        Exists(DriverOffer.objects.filter(driver=OuterRef("pk"), status=OfferStatus.PENDING)), preference, *answer_counts(),
    )
    return {
        str(pk): _Facts(available=availability == DriverAvailability.AVAILABLE, pending=pending, preference=pref,
                        answered=answered, accepted=accepted, active=active)
        for pk, availability, active, pending, pref, answered, accepted in rows
    }


def _offered_before(delivery_ids: list, driver_ids: list[str]) -> set[tuple[str, str]]:
    if not delivery_ids or not driver_ids:
        return set()
    pairs = DriverOffer.objects.filter(delivery_id__in=delivery_ids, driver_id__in=driver_ids).values_list("delivery_id", "driver_id")
    # (and those a driver had: ops' direct assignment, no offer, then a reassign took it away)
    had = Assignment.objects.filter(delivery_id__in=delivery_ids, driver_id__in=driver_ids).values_list("delivery_id", "driver_id")
    return {(str(d), str(u)) for d, u in pairs.union(had)}


def _screen(item: _Item, drivers: dict[str, Driver], facts: dict[str, _Facts], offered_before: set) -> None:
    """The item's candidates among the locked drivers, and the counts its failure reason needs
    (as sequential screening counts them). A driver that is free but was held by another
    transaction at this moment counts in `held_elsewhere`: the delivery then waits for the next
    round rather than being recorded unassigned."""
    delivery_id = str(item.delivery.pk)
    for near in item.nearby:
        fact = facts.get(near.driver_id)
        driver = drivers.get(near.driver_id)
        if (delivery_id, near.driver_id) in offered_before:
            item.screening.offered_before += 1
        elif fact is not None and fact.pending:
            item.screening.pending_elsewhere += 1
        elif fact is not None and fact.preference == "UNAVAILABLE":
            item.screening.unavailable_for_zone += 1
        elif driver is None or (fact is not None and not fact.active):  # (a deactivated login, freed since)
            if driver is None and fact is not None and fact.available:
                item.held_elsewhere += 1
            else:
                item.screening.no_longer_available += 1
        else:
            item.candidates.append(Candidate(
                driver_id=near.driver_id,
                distance_km=near.distance_km,
                pickup_seconds=eta.travel_seconds(near.distance_km, driver.vehicle_type),
                preference=fact.preference or "AVAILABLE",
                # as the sequential ranking: (accepted + 1) / (answered or expired + 1)
                acceptance_rate=(fact.accepted + 1) / (fact.answered + 1),
            ))
    item.candidates = rank(item.candidates)


def _audit_search(item: _Item, *, actor: Actor, now: datetime, round_size: tuple[int, int], cost: float | None) -> None:
    """The two audit rows a sequential dispatch writes before its offer, with the round's figures."""
    delivery = item.delivery
    audit_record(delivery=delivery, event_type=E.ASSIGNMENT_STARTED, actor=actor, now=now,
                 details={"searchRadiusKm": item.radius_km, "policy": POLICY})
    by_cost = sorted(item.candidates, key=lambda c: (pair_cost(c), c.driver_id))
    details = {
        "count": len(item.candidates),
        "searchRadiusKm": item.radius_km,
        "nearbyDrivers": len(item.nearby),
        "topCandidates": [
            {"driverId": c.driver_id, "distanceKm": round(c.distance_km, 3),
             "estimatedPickupMin": round(c.pickup_seconds / 60, 1), "preference": c.preference,
             "acceptanceRate": round(c.acceptance_rate, 3), "costSeconds": round(pair_cost(c), 1)}
            for c in by_cost[:TOP_CANDIDATES_AUDITED]
        ],
        "policy": POLICY,
        "matching": {"deliveries": round_size[0], "drivers": round_size[1], "greedy": item.urgent,
                     "costSeconds": None if cost is None else round(cost, 1)},
    }
    audit_record(delivery=delivery, event_type=E.DRIVER_CANDIDATES_FOUND, actor=actor, now=now, details=details)


@unit_of_work()
def matching_round(*, zone_id, now: datetime | None = None) -> RoundResult:
    """One matching round of a zone (None: deliveries outside every zone), in one transaction.
    See the module docstring for the steps and the locks."""
    now = now or timezone.now()
    actor = Actor.system()
    result = RoundResult(zone_id=zone_id)
    _zone_lock(zone_id)
    deliveries = _lock_waiting(zone_id, now)
    if not deliveries:
        return result
    policy = policy_of(deliveries[0])
    oldest = min(d.matching_since for d in deliveries)
    if (now - oldest).total_seconds() < window_seconds(policy):
        # Not due: a round that waited for the zone's lock behind another, which matched what
        # was due and put the rest back in the window.
        result.not_due = True
        return result
    items: list[_Item] = []
    for delivery in deliveries:
        wide = delivery.open_level is not None and delivery.open_level >= 2
        radius = float(settings.DISPATCH_WIDE_RADIUS_KM) if wide else search_radius_for(delivery)
        lat, lon = delivery.pickup_location.y, delivery.pickup_location.x
        items.append(_Item(
            delivery=delivery, radius_km=radius,
            nearby=drivers_available_near(lat=lat, lon=lon, radius_km=radius, limit=CANDIDATE_POOL, now=now,
                                          positions=False),
            urgent=past_target(delivery, policy, now=now),
        ))
    driver_ids = sorted({n.driver_id for item in items for n in item.nearby})
    drivers = _lock_drivers(driver_ids)
    facts = _driver_facts(driver_ids, zone_id)
    offered_before = _offered_before([d.pk for d in deliveries], driver_ids)
    for item in items:
        _screen(item, drivers, facts, offered_before)
    result.deliveries, result.drivers = len(items), len(drivers)
    size = (len(items), len(drivers))

    taken: set[str] = set()
    done: set = set()  # delivery ids offered or recorded unassigned: out of the queue

    def offer(item: _Item, candidate: Candidate) -> bool:
        _audit_search(item, actor=actor, now=now, round_size=size, cost=pair_cost(candidate))
        try:
            made = offer_insert_locked(delivery=item.delivery, driver=drivers[candidate.driver_id], actor=actor,
                                       now=now, search_radius_km=item.radius_km)
        except Conflict:  # the database refused it: the delivery waits for the next round
            logger.warning("matching: offer of %s to %s refused", item.delivery.pk, candidate.driver_id)
            return False
        taken.add(candidate.driver_id)
        done.add(item.delivery.pk)
        result.offered.append(made)
        result.total_cost_seconds += pair_cost(candidate)
        return True

    def unassigned(item: _Item) -> None:
        _audit_search(item, actor=actor, now=now, round_size=size, cost=None)
        reason = _failure_reason(item.delivery, item.screening, item.nearby, item.radius_km, now)
        unassigned_record_failure(delivery=item.delivery, reason=reason, now=now)
        done.add(item.delivery.pk)
        result.unassigned += 1

    # 0. No candidate at all: the unassigned way, as sequential dispatch (the retry job and the
    # escalation check take it from there). One whose free drivers another transaction holds
    # right now waits for the next round instead.
    for item in items:
        if not item.candidates and not item.held_elsewhere:
            unassigned(item)

    # 1. At the target wait: offered at once, oldest first, to the best-ranked free candidate,
    # as sequential dispatch would; with every candidate taken by an older one, unassigned
    # (all drivers busy) as sequential dispatch would record it, and out of the queue.
    for item in (i for i in items if i.urgent and i.candidates):
        best = next((c for c in item.candidates if c.driver_id not in taken), None)
        if best is None:
            item.screening.pending_elsewhere += len(item.candidates)
            unassigned(item)
        elif offer(item, best):
            result.greedy += 1

    # 2. The others: minimum total cost over the drivers left.
    rest = [i for i in items if not i.urgent and i.candidates]
    columns = sorted({c.driver_id for i in rest for c in i.candidates if c.driver_id not in taken})
    column_of = {driver_id: n for n, driver_id in enumerate(columns)}
    costs = []
    for item in rest:
        row = [INFEASIBLE] * len(columns)
        for c in item.candidates:
            if c.driver_id in column_of:
                row[column_of[c.driver_id]] = pair_cost(c)
        costs.append(row)
    for r, c in assign_min_cost(costs):
        item = rest[r]
        offer(item, next(x for x in item.candidates if x.driver_id == columns[c]))

    # 3. Out of the queue: offered or unassigned. The rest (their candidates went to others in
    # this round) re-enter the next window; in a zone no longer matching in batches (window 0)
    # they are recorded unassigned, as sequential dispatch would, rather than wait.
    window = window_seconds(policy)
    if window == 0:
        for item in items:
            if item.delivery.pk not in done:
                item.screening.pending_elsewhere += item.held_elsewhere + len(item.candidates)
                unassigned(item)
    waiting = [d.pk for d in deliveries if d.pk not in done]
    result.waiting = len(waiting)
    if done:
        Delivery.objects.filter(pk__in=list(done)).update(matching_since=None)
    if waiting:
        Delivery.objects.filter(pk__in=waiting).update(matching_since=now)
        round_schedule(zone_id, at=now + timedelta(seconds=window))
    if len(deliveries) >= settings.DISPATCH_MATCHING_MAX_DELIVERIES:
        # The round took as many as it may: more may be due behind them. The next round now,
        # not at the sweep (up to 15 s on, perhaps past their target wait).
        round_schedule(zone_id, at=now)
    logger.info(
        "matching round zone=%s deliveries=%d drivers=%d offered=%d greedy=%d unassigned=%d waiting=%d cost=%.0fs",
        zone_id, result.deliveries, result.drivers, len(result.offered), result.greedy, result.unassigned,
        result.waiting, result.total_cost_seconds,
    )
    return result


def matching_round_when_due(*, zone_id, now: datetime | None = None) -> int:
    """The task scheduled for the end of a waiting delivery's window: the zone's round, if it
    is due. Not due: the delivery was matched already by an earlier round (a newer one waits
    with a task of its own), or the task fired early (the sweep runs the round then). Returns
    the offers made."""
    now = now or timezone.now()
    zone_id = None if zone_id in (None, "") else uuid.UUID(str(zone_id))
    due = round_times(zone_ids=[zone_id]).get(zone_id)
    if due is None or due > now:
        return 0
    return len(matching_round(zone_id=zone_id, now=now).offered)


def matching_rounds_run(*, now: datetime | None = None) -> int:
    """The sweep (every 15 s, the safety net of the scheduled rounds: a worker that was down, a
    lost task): run the round of every zone that is due, each in its own transaction; one
    failing zone does not stop the others. Returns the offers made."""
    now = now or timezone.now()
    offered = 0
    for zone_id in zones_due(now):
        try:
            offered += len(matching_round(zone_id=zone_id, now=now).offered)
        except Exception:
            logger.exception("matching round of zone %s failed", zone_id)
    return offered
