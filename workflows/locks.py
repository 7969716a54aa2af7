"""Every row lock a workflow takes, in the one order they are taken.

    offer → delivery → driver → unassigned-order record / ticket

Several offers of one delivery (a batch or broadcast round) are locked by one statement in
primary-key order (`lock_offer_and_its_round`, `lock_pending_offers_of_delivery`), before
the delivery; several drivers (a round's candidates) only with SKIP LOCKED, which never waits.

Offers are locked `FOR NO KEY UPDATE` (`no_key=True`): no workflow changes an offer's key,
and the foreign-key check of a delivery whose `current_offer` passes to another offer of its
round (`offers.services._close_current_offer`) takes `FOR KEY SHARE` on that offer, which a
plain `FOR UPDATE` held by the offer's own expiry or answer (waiting for the delivery) would
block: a deadlock. `FOR NO KEY UPDATE` still excludes every other writer of the offer.

Each row is locked at most once per transaction, by primary key, with
`select_for_update(of=("self",))`, inside the workflow's atomic block. Where a workflow needs
rows that follow from one another (an offer's delivery and driver, a delivery's assignment
and driver), one statement may lock them together: `FOR UPDATE OF` lists them in this order,
and PostgreSQL takes the row locks in that order, so the order below holds all the same. A workflow that needs
several of them takes them top to bottom in this order, so two workflows can only ever wait
on each other in one direction (no deadlock). Functions that receive a locked row say so in
their docstring ("the caller holds the delivery's lock").

Why the offer comes first: accept, reject, expire and withdraw all start from an offer; an
ops action that starts from a delivery or a driver (cancel, reassign, going on break) first
looks up and locks that delivery's or driver's pending offer, then the rest. Dispatch locks
candidate drivers with SKIP LOCKED and inserts their offers: a driver being changed by
another transaction is passed over instead of waited for.
"""
from __future__ import annotations

import psycopg
from django.db import OperationalError, connection, transaction
from django.db.models import Q, Subquery
from django.db.transaction import TransactionManagementError

from availability.models import Driver
from common.exceptions import NotFound
from common.hotsql import cached_first, cached_instances
from dispatch.models import Assignment, AssignmentStatus, Delivery
from offers.models import DriverOffer, OfferStatus


def lock_offer(offer_id, *, driver_id=None) -> DriverOffer:
    """The offer (of this driver, when given); NotFound otherwise."""
    if driver_id is None:
        offer = cached_first(("lock_offer",), DriverOffer, lambda o: (
            DriverOffer.objects.select_for_update(of=("self",), no_key=True).filter(pk=o)), offer_id)
    else:
        offer = cached_first(("lock_offer", "driver"), DriverOffer, lambda o, d: (
            DriverOffer.objects.select_for_update(of=("self",), no_key=True).filter(pk=o, driver_id=d)), offer_id, driver_id)
    if offer is None:
        raise NotFound("Offer not found.")
    return offer


def lock_offer_delivery_driver(offer_id, *, driver_id) -> DriverOffer:
    """The offer of this driver with its delivery and its driver, the three rows locked by one
    statement in the order of this module (`FOR NO KEY UPDATE OF` offer, delivery, driver:
    PostgreSQL takes them in that order; no key strength for the delivery and driver either,
    as no workflow changes their keys: they still exclude every other writer). `offer.delivery` (with its zone, not locked) and `offer.driver`
    are the locked rows. NotFound when there is no such offer."""
    offer = cached_first(("lock_offer_delivery_driver",), DriverOffer, lambda o, d: (
        DriverOffer.objects.select_related("delivery", "delivery__zone", "driver")
        .select_for_update(of=("self", "delivery", "driver"), no_key=True)
        .filter(pk=o, driver_id=d)), offer_id, driver_id)
    if offer is None:
        raise NotFound("Offer not found.")
    return offer


def lock_offer_and_its_round(offer_id, *, driver_id) -> list[DriverOffer]:
    """The offer of this driver and every other pending offer of its delivery (the rest of
    its batch or broadcast round; none in sequential dispatch), locked by one statement in
    primary-key order, so two accepts of one round queue on the same first row instead of
    deadlocking. Taken before the delivery (`lock_offer_delivery_driver` next): the accept
    withdraws the siblings it holds. Empty when there is no such offer."""
    def build(o, d):
        delivery_id = DriverOffer.objects.filter(pk=o, driver_id=d).order_by().values("delivery_id")[:1]
        return (
            DriverOffer.objects.select_for_update(of=("self",), no_key=True)
            .filter(Q(pk=o) | Q(status=OfferStatus.PENDING), delivery_id=Subquery(delivery_id))
            .order_by("pk")
        )
    return cached_instances(("lock_offer_and_its_round",), DriverOffer, build, offer_id, driver_id)


def lock_offer_if_due(offer_id, *, now, force: bool = False, wait: bool = False) -> DriverOffer | None:
    """A pending offer whose time is up (any pending one with `force`), skipping it when
    another transaction holds it: whoever holds it decides its fate. `wait`: wait for that
    transaction instead (its holder may be another late accept of the same round, which
    decides nothing and leaves)."""
    def build(o, *t):
        due = {"expires_at__lte": t[0]} if t else {}
        return (DriverOffer.objects.select_for_update(of=("self",), no_key=True, skip_locked=not wait)
                .filter(pk=o, status=OfferStatus.PENDING, **due))
    key = ("lock_offer_if_due", "force" if force else "due", "wait" if wait else "skip")
    if force:
        return cached_first(key, DriverOffer, build, offer_id)
    return cached_first(key, DriverOffer, build, offer_id, now)


def lock_pending_offer_of_delivery(delivery_id) -> DriverOffer | None:
    return cached_first(("lock_pending_offer_of_delivery",), DriverOffer, lambda x: (
        DriverOffer.objects.select_for_update(of=("self",), no_key=True)
        .filter(delivery_id=x, status=OfferStatus.PENDING)), delivery_id)


def lock_pending_offers_of_delivery(delivery_id) -> list[DriverOffer]:
    """All the delivery's pending offers (one in sequential dispatch, a round's in batch or
    broadcast), locked in primary-key order by one statement."""
    return cached_instances(("lock_pending_offers_of_delivery",), DriverOffer, lambda x: (
        DriverOffer.objects.select_for_update(of=("self",), no_key=True)
        .filter(delivery_id=x, status=OfferStatus.PENDING).order_by("pk")), delivery_id)


def lock_accepted_offer_of_delivery(delivery_id) -> DriverOffer | None:
    """The delivery's accepted offer (at most one), locked before the delivery."""
    return cached_first(("lock_accepted_offer_of_delivery",), DriverOffer, lambda x: (
        DriverOffer.objects.select_for_update(of=("self",), no_key=True)
        .filter(delivery_id=x, status=OfferStatus.ACCEPTED)), delivery_id)


def lock_pending_offer_of_driver(driver_id) -> DriverOffer | None:
    return cached_first(("lock_pending_offer_of_driver",), DriverOffer, lambda x: (
        DriverOffer.objects.select_for_update(of=("self",), no_key=True)
        .filter(driver_id=x, status=OfferStatus.PENDING)), driver_id)


def lock_delivery(delivery_id, *, skip_locked: bool = False, select_related: tuple[str, ...] = ()) -> Delivery | None:
    """The delivery; NotFound when it does not exist. With `skip_locked` (jobs), None when it
    is missing or another transaction holds it."""
    def build(x):
        qs = Delivery.objects.select_for_update(of=("self",), skip_locked=skip_locked)
        return (qs.select_related(*select_related) if select_related else qs).filter(pk=x)
    delivery = cached_first(("lock_delivery", skip_locked, tuple(select_related)), Delivery, build, delivery_id)
    if delivery is None and not skip_locked:
        raise NotFound("Delivery not found.")
    return delivery


def lock_driver(driver_id, *, skip_locked: bool = False, select_related: tuple[str, ...] = (), **filters) -> Driver | None:
    """The driver; NotFound when it does not exist. With `skip_locked` or extra filters
    (dispatch claiming a candidate), None when it is held elsewhere or no longer matches.
    `select_related` rows are read in the same statement, not locked."""
    key = ("lock_driver", skip_locked, tuple(select_related), *sorted((k, repr(v)) for k, v in filters.items()))  # constant filters only

    def build(x):
        qs = Driver.objects.select_for_update(of=("self",), skip_locked=skip_locked)
        return (qs.select_related(*select_related) if select_related else qs).filter(pk=x, **filters)
    driver = cached_first(key, Driver, build, driver_id)
    if driver is None and not (skip_locked or filters):
        raise NotFound("Driver not found.")
    return driver


def lock_driver_waiting(driver_id, *, wait_ms: int, **filters) -> Driver | None:
    """Dispatch's second look at a candidate another transaction held (`lock_driver` with
    `skip_locked` passed it over): wait for it at most `wait_ms` (the transaction's
    `lock_timeout`, for this statement only), then None, as when it no longer matches
    `filters`. The caller holds the delivery's lock and no driver's, the lock order's way.
    A deadlock reported on this statement is a None too (the savepoint keeps the rest)."""
    return _first_waiting(Driver.objects.select_for_update(of=("self",)).filter(pk=driver_id, **filters), wait_ms=wait_ms)


def lock_delivery_waiting(delivery_id, *, wait_ms: int, select_related: tuple[str, ...] = ()) -> Delivery | None:
    """A job's second try at a delivery another transaction held (`lock_delivery` with
    `skip_locked` passed it over): wait for it at most `wait_ms`, then None (as missing). The
    caller holds no other lock (the delivery comes first in the lock order)."""
    qs = Delivery.objects.select_for_update(of=("self",)).filter(pk=delivery_id)
    return _first_waiting(qs.select_related(*select_related) if select_related else qs, wait_ms=wait_ms)


def _first_waiting(queryset, *, wait_ms: int):
    """The first row of `queryset` (a SELECT … FOR UPDATE), waiting for its lock at most
    `wait_ms` (the transaction's `lock_timeout`, for this statement only), else None. A
    deadlock reported on this statement is a None too (the savepoint keeps the rest)."""
    if not connection.in_atomic_block:  # (set_config(…, true) would not hold: the wait would be the session's)
        raise TransactionManagementError("a waiting lock runs inside the caller's transaction.")
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_setting('lock_timeout'), set_config('lock_timeout', %s, true)", [f"{int(wait_ms)}ms"])
        previous = cursor.fetchone()[0]
    try:
        with transaction.atomic():  # (a savepoint: a wait that times out rolls back only this statement)
            return queryset.first()
    except OperationalError as exc:
        if isinstance(exc.__cause__, (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)):
            return None
        raise
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('lock_timeout', %s, true)", [previous])


def lock_drivers_skip_locked(driver_ids, **filters) -> dict[str, Driver]:
    """Dispatch claiming a round's candidates: the drivers among `driver_ids` that match
    `filters` and no other transaction holds, locked by one statement (SKIP LOCKED: it never
    waits, so the order does not matter), by id as text."""
    drivers = (
        Driver.objects.select_for_update(of=("self",), skip_locked=True)
        .filter(pk__in=list(driver_ids), **filters)
    )
    return {str(d.pk): d for d in drivers}


def lock_active_assignment(delivery_id) -> Assignment | None:
    """The delivery's active assignment. The caller holds the delivery's lock."""
    return cached_first(("lock_active_assignment",), Assignment, lambda x: (
        Assignment.objects.select_for_update(of=("self",))
        .filter(delivery_id=x, status=AssignmentStatus.ACTIVE)), delivery_id)


def lock_assignment_of_driver(delivery_id, driver_id, *, with_driver: bool = False) -> Assignment | None:
    """The driver's latest assignment of the delivery with the delivery, locked by one
    statement in the order of this module: delivery, then the assignment, then (with
    `with_driver`) the driver. `assignment.delivery` (with its accepted offer and zone, not locked) and
    `assignment.driver` are the locked rows. None when the driver never had the delivery (or
    it does not exist)."""
    of = ("delivery", "self", "driver") if with_driver else ("delivery", "self")
    related = ("delivery", "delivery__accepted_offer", "delivery__zone")  # the zone: the pay cap, no extra query
    related = (*related, "driver") if with_driver else related
    return cached_first(("lock_assignment_of_driver", with_driver), Assignment, lambda x, d: (
        Assignment.objects.select_related(*related)
        .select_for_update(of=of)
        .filter(delivery_id=x, driver_id=d).order_by("-created_at")), delivery_id, driver_id)
