"""What a finished delivery cost and earned (seed: delivery_costs, delivery_revenue).

Rules (docs/analytics.md):
- Delivered: revenue = delivery fee (the delivery's, else the pricing rule's for its leg:
  `zones.pricing.delivery_fee`) + the seller commission; the driver is paid the accepted
  offer's estimated earning, never above the pay cap of the delivery's zone (or the global one);
  one assigned by ops (no offer) is paid by the same rule for the pickup → drop-off leg.
- Failed: the customer's delivery fee is refunded (0) but the seller commission is kept; the
  driver is paid in full if the order was picked up (they did the driving), else the base pay.
- Costs add the payment processing fee (PAYMENT_FEE_RATE × what was charged: the delivery fee
  charged plus the seller commission) and per-
  delivery infrastructure estimates (PostgreSQL, Redis, API calls).
Money is Decimal, rounded half-up to the cent; never float.
"""
from __future__ import annotations

from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings

from analytics.models import DeliveryCost, DeliveryRevenue
from common.db import insert_all_unless_conflict
from dispatch.models import Delivery, DeliveryStatus
from tracking import eta
from zones import pricing

CENT = Decimal("0.01")


def money(value) -> Decimal:
    return Decimal(str(value)).quantize(CENT, rounding=ROUND_HALF_UP)


def _zone_of(delivery: Delivery):
    return delivery.zone if delivery.zone_id else None


def driver_payment_for(delivery: Delivery) -> Decimal:
    offer = delivery.accepted_offer if delivery.accepted_offer_id else None
    if offer is not None:
        full = money(offer.offer_payload.get("estimatedEarning", settings.DRIVER_BASE_PAY))
    else:  # (assigned by ops, no offer: paid as an offer pays, for the leg it knows of; it was the base pay, 30.00 for any distance)
        full = pricing.driver_pay(total_km=eta.delivery_leg_km(delivery), zone=_zone_of(delivery))
    full = min(full, pricing.driver_pay_cap(_zone_of(delivery)))  # whatever an offer said: never above the cap
    if delivery.status == DeliveryStatus.FAILED and delivery.picked_up_at is None:
        return min(full, money(settings.DRIVER_BASE_PAY))
    return full


def economics_record(*, delivery: Delivery, now: datetime) -> tuple[DeliveryCost, DeliveryRevenue]:
    """Write the cost and revenue rows of a delivered or failed delivery (once; a second call
    returns the existing rows). Caller holds the delivery's lock."""
    fee = money(delivery.delivery_fee) if delivery.delivery_fee is not None else pricing.delivery_fee(leg_km=eta.delivery_leg_km(delivery))
    charged_fee = fee if delivery.status == DeliveryStatus.DELIVERED else Decimal("0.00")
    commission = money(settings.SELLER_COMMISSION)
    driver_payment = driver_payment_for(delivery)
    platform_fee = money(Decimal(settings.PAYMENT_FEE_RATE) * (charged_fee + commission))
    pg, rd, api = money(settings.INFRA_POSTGRES_COST), money(settings.INFRA_REDIS_COST), money(settings.INFRA_API_CALLS_COST)
    cost = DeliveryCost(
        delivery=delivery, postgres_cost=pg, redis_cost=rd, api_calls_cost=api, driver_payment=driver_payment,
        platform_fee=platform_fee, total_cost=driver_payment + platform_fee + pg + rd + api, created_at=now,
    )
    revenue = DeliveryRevenue(
        delivery=delivery, commission=commission, delivery_fee=charged_fee, total_revenue=charged_fee + commission, created_at=now,
    )
    # Both rows in one statement; a delivery recorded before keeps what was recorded.
    cost_in, revenue_in = insert_all_unless_conflict(cost, revenue)
    if not cost_in:
        cost = DeliveryCost.objects.get(delivery=delivery)
    if not revenue_in:
        revenue = DeliveryRevenue.objects.get(delivery=delivery)
    return cost, revenue
