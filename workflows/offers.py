"""Offer workflows: ops offering a delivery, and a driver's answer (accept, reject) or its
absence (expire). Each reads top to bottom: lock (once, in the order of `workflows.locks`) →
state changes → audit → events on commit."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from analytics.services import performance_offer_answered
from availability.models import DriverAvailability
from availability.services import driver_freed_on_commit, drivers_freed_on_commit
from common.actors import Actor
from common.db import locked_now
from common.exceptions import Conflict
from dispatch.models import DeliveryStatus
from dispatch.services import active_deliveries_of, assignment_start_locked
from escalation.services import unassigned_resolve
from notifications.outbox import outbox_hold
from offers import services as offers
from offers.models import DriverOffer, OfferStatus
from workflows import locks
from workflows.deliveries import assignment_latency_observe
from workflows.dispatching import dispatch_next_locked
from workflows.stacking import driver_may_stack
from workflows.unit import eta_refresh_enqueue, unit_of_work

logger = logging.getLogger(__name__)

TAKEN_BY_ANOTHER_DRIVER = "taken_by_another_driver"  # why the rest of a round is withdrawn


@unit_of_work()
def offer_create(
    *, delivery_id, driver_id, actor: Actor, expires_in_seconds: int | None = None, now: datetime | None = None
) -> DriverOffer:
    """Ops offer a ready delivery to a chosen available driver."""
    delivery = locks.lock_delivery(delivery_id, select_related=("zone",))
    driver = locks.lock_driver(driver_id, select_related=("user",))  # its login read in the lock's statement
    now = now or timezone.now()  # after the locks (a change the offer waited for is before it), not pushed past updated_at
    if delivery.status != DeliveryStatus.READY:
        raise Conflict(f"Delivery is {delivery.status}; only a ready delivery can be offered.")
    if driver.availability != DriverAvailability.AVAILABLE:
        raise Conflict(f"Driver {driver.pk} is not available for assignment (currently {driver.availability}).")
    if not driver.user.is_active:
        # Freed from a delivery it kept after ops deactivated its login: offline at the stale
        # job's next run (within a minute); it could not answer an offer meanwhile.
        raise Conflict("The driver's login is deactivated: reactivate it (admin → Users) first.")
    try:
        return offers.offer_insert_locked(
            delivery=delivery, driver=driver, actor=actor, now=now, expires_in_seconds=expires_in_seconds
        )
    except Conflict:
        # The partial unique indexes refused it (nothing was written): say whose offer it was.
        if DriverOffer.objects.filter(delivery=delivery, status=OfferStatus.PENDING).exists():
            raise Conflict("The delivery already has a pending offer.") from None
        raise Conflict("The driver already has a pending offer.") from None


@dataclass(frozen=True)
class AcceptResult:
    offer: DriverOffer
    assignment_id: str


def offer_accept(*, offer_id, driver_id, actor: Actor, now: datetime | None = None) -> AcceptResult:
    """The driver takes the delivery: offer ACCEPTED, an assignment, the driver busy, the
    delivery assigned, its unassigned record resolved.

    In a batch or broadcast round the first accept wins: the round's other pending offers are
    withdrawn in the same transaction (CANCELLED, reason `taken_by_another_driver`,
    `offer_cancelled` to their drivers and ops); a later accept of one of them is a 409.

    An offer past `expiresAt` cannot be accepted even if the expiry job has not run yet: it is
    expired on the spot (and the next candidate offered) and the driver gets a 409.
    """
    with unit_of_work():
        # The offer and the rest of its round (batch/broadcast: the delivery's other pending
        # offers; none in sequential dispatch) in primary-key order, then the delivery and the
        # driver: two accepts of one round queue on the round's first row, and the winner
        # withdraws the siblings it holds (offers → delivery → driver).
        round_offers = locks.lock_offer_and_its_round(offer_id, driver_id=driver_id)
        offer = locks.lock_offer_delivery_driver(offer_id, driver_id=driver_id)
        now = locked_now(now, offer.delivery.updated_at)  # (an accept that waited is past its expiry if it now is)
        overdue = offers.offer_is_overdue(offer, now)
        if not overdue:
            offers.offer_ensure_pending(offer, now)
            delivery, driver = offer.delivery, offer.driver

            # A busy driver was offered it for order stacking: it must still qualify (its first
            # delivery may have left the store since).
            stacking = driver.availability == DriverAvailability.BUSY and driver_may_stack(delivery, driver, now=now)
            response_ms = offers.offer_mark_accepted(offer, delivery=delivery, actor=actor, now=now)
            assignment = assignment_start_locked(
                delivery, driver, actor=actor, now=now, details={"offerId": str(offer.pk)},
                also_save=offers.ACCEPTED_OFFER_FIELDS, offer=offer, stacking=stacking,
                on_assigned=lambda started: offers.offer_announce_accepted(offer, assignment_id=started.pk),
            )
            siblings = [o for o in round_offers if o.pk != offer.pk and o.status == OfferStatus.PENDING]
            offers.offers_withdraw_locked(
                siblings, delivery=delivery, reason=TAKEN_BY_ANOTHER_DRIVER, actor=Actor.system(), now=now
            )
            drivers_freed_on_commit([o.driver_id for o in siblings], at=now)  # free of them: a look, as after a reject
            unassigned_resolve(delivery=delivery, now=now)
            performance_offer_answered(driver_id=driver_id, outcome=OfferStatus.ACCEPTED, response_time_ms=response_ms, now=now)
            delivery.latest_assignments = [assignment]
            outbox_hold(delivery)  # the webhook payload renders this row: not read again

            for delivery_id in active_deliveries_of(driver.pk) if stacking else (delivery.pk,):
                eta_refresh_enqueue(delivery_id, now=now)  # stacked: the others' route has a new stop
            if delivery.offer_acceptance_count == 1:  # (its first accepted offer: see assignment_latency_observe)
                assignment_latency_observe(delivery, now=now)
            return AcceptResult(offer=offer, assignment_id=str(assignment.pk))
    # Waiting for the offer's lock: another late accept of the same round may hold it (with the
    # whole round) for a moment; skipping it left the offer pending until the sweep, up to 5 s.
    offer_expire(offer_id=offer_id, now=now, wait=True)
    raise Conflict(f"Offer {offer_id} has expired.")


@dataclass(frozen=True)
class RejectResult:
    offer: DriverOffer
    next_offer: DriverOffer | None


@unit_of_work()
def offer_reject(*, offer_id, driver_id, reason: str, actor: Actor, now: datetime | None = None) -> RejectResult:
    """The driver declines; the delivery goes to its next candidate in the same transaction."""
    offer = locks.lock_offer_delivery_driver(offer_id, driver_id=driver_id)  # offer → delivery → driver
    now = locked_now(now, offer.delivery.updated_at)
    offers.offer_ensure_pending(offer, now)
    delivery = offer.delivery

    offers.offer_mark_rejected(offer, delivery=delivery, reason=reason, actor=actor, now=now)
    performance_offer_answered(
        driver_id=driver_id, outcome=OfferStatus.REJECTED, response_time_ms=offer.driver_response_time_ms, now=now
    )
    # The offer just closed was the delivery's pending one, or one of its round's (under its
    # lock): the next round starts once none of the round is pending (`dispatch_locked`).
    # The next search is as wide as this offer's (a level-2 escalation's 10 km, ops' own radius).
    result = dispatch_next_locked(delivery, actor=Actor.system(), now=now, no_pending_offer=True,
                                  radius_km=offer.search_radius_km)
    # Free of its offer, the driver takes a look at the deliveries waiting near it, as one free
    # again does (it waited for the retry job, up to 30 s). Not after an expiry: a driver who did
    # not answer is likely not looking at its phone.
    driver_freed_on_commit(offer.driver)
    return RejectResult(offer=offer, next_offer=result.offer if result.outcome == "offered" else None)


def offer_expire(*, offer_id, now: datetime | None = None, force: bool = False, wait: bool = False,
                 actor: Actor | None = None) -> bool:
    """Expire a pending offer whose time is up and move its delivery to the next candidate.

    Idempotent and safe to race with accept/reject and with itself: a locked offer is skipped
    (whoever holds it decides; `wait`: waited for, by a late accept, whose 409 says it expired),
    a processed or not-yet-due one is left alone. Returns True
    when this call expired it. `force` expires it now, due or not (ops' "expire now", who are
    the audit's `actor`; the clock's expiry is the system's).
    """
    now = now or timezone.now()
    with unit_of_work():
        offer = locks.lock_offer_if_due(offer_id, now=now, force=force, wait=wait)
        if offer is None:
            return False
        delivery = locks.lock_delivery(offer.delivery_id, select_related=("zone",))
        locks.lock_driver(offer.driver_id)

        offers.offer_mark_expired(offer, delivery=delivery, now=now, actor=actor)
        performance_offer_answered(driver_id=offer.driver_id, outcome=OfferStatus.EXPIRED, response_time_ms=None, now=now)
        dispatch_next_locked(delivery, actor=Actor.system(), now=now, no_pending_offer=True,
                             radius_km=offer.search_radius_km)
    return True


def offers_expire_overdue(*, now: datetime | None = None, batch_size: int = 200) -> int:
    """The sweep: expire every pending offer past its time (bounded batch, oldest first)."""
    now = now or timezone.now()
    ids = list(
        DriverOffer.objects.filter(status=OfferStatus.PENDING, expires_at__lte=now)
        .order_by("expires_at").values_list("pk", flat=True)[:batch_size]
    )
    expired = 0
    for offer_id in ids:
        try:
            expired += offer_expire(offer_id=offer_id, now=now)
        except Exception:  # one bad offer must not stop the sweep
            logger.exception("expiring offer %s failed", offer_id)
    return expired
