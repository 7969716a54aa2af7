"""Pricing and serviceability rules, per zone where the zone overrides the global setting.

- Driver pay: `DRIVER_BASE_PAY` + per-km rate × km (driver → pickup → drop-off), never above
  the cap (the zone's `driver_pay_cap`, else `DRIVER_PAY_CAP`). The offer shows it, the
  economics pay it (capped again there: no payout is ever above the cap).
- Delivery fee, when the seller sets none (and in quotes): `DEFAULT_DELIVERY_FEE` +
  `DELIVERY_FEE_PER_KM` × the leg's km, never above `DELIVERY_FEE_CAP`.
- Serviceable: the leg at most the zone's `max_delivery_distance_km`, else
  `MAX_DELIVERY_DISTANCE_KM`.
Money is Decimal, rounded half-up to the cent.
"""
from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings

CENT = Decimal("0.01")


def money(value) -> Decimal:
    return Decimal(str(value)).quantize(CENT, rounding=ROUND_HALF_UP)


def _override(zone, field: str):
    return getattr(zone, field, None) if zone is not None else None


def driver_pay_cap(zone) -> Decimal:
    cap = _override(zone, "driver_pay_cap")
    return money(cap if cap is not None else settings.DRIVER_PAY_CAP)


def driver_pay(*, total_km: float, zone) -> Decimal:
    """What the driver earns for a trip of `total_km` in `zone` (None: no zone), capped."""
    per_km = _override(zone, "driver_pay_per_km")
    per_km = Decimal(str(per_km if per_km is not None else settings.DRIVER_PAY_PER_KM))
    amount = Decimal(settings.DRIVER_BASE_PAY) + per_km * Decimal(str(max(0.0, total_km)))
    return min(money(amount), driver_pay_cap(zone))


def delivery_fee(*, leg_km: float) -> Decimal:
    amount = Decimal(settings.DEFAULT_DELIVERY_FEE) + Decimal(settings.DELIVERY_FEE_PER_KM) * Decimal(str(max(0.0, leg_km)))
    return min(money(amount), money(settings.DELIVERY_FEE_CAP))


def max_leg_km(zone) -> float | None:
    """The longest leg accepted for a pickup in `zone`: its own limit, else
    MAX_DELIVERY_DISTANCE_KM; None when there is none (the global setting 0)."""
    limit = _override(zone, "max_delivery_distance_km")
    if limit is not None:
        return float(limit)
    return float(settings.MAX_DELIVERY_DISTANCE_KM) or None
