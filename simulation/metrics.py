"""The run's figures, read from what the platform recorded (the delivery's timestamps, the
offers, the unassigned records), on the simulated clock. Keys are stable: tools compare runs
by them (docs/dispatch.md, "The simulator")."""
from __future__ import annotations

import math

from django.db.models import Count

from dispatch.models import Delivery
from escalation.models import UnassignedOrder
from offers.models import DriverOffer
from simulation.engine import START, Params, Trace

METRIC_KEYS = (
    "assignmentRate", "meanTimeToAssignSeconds", "p95TimeToAssignSeconds", "meanPickupEtaSeconds",
    "meanDeliverySeconds", "offersPerAssignment", "driverUtilization", "escalations", "ordersPerDriverHour",
)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


# The means a comparison weighs, with the per-order series each is the mean of.
COMPARED = (
    ("meanPickupEtaSeconds", "pickupEta"), ("meanTimeToAssignSeconds", "timeToAssign"), ("meanDeliverySeconds", "delivery"),
)
Z95 = 1.959964  # the normal quantile of a two-sided 95 % interval (runs hold hundreds of orders or more)


def difference(base: list[float], other: list[float]) -> dict | None:
    """`other`'s mean minus `base`'s, with its 95 % confidence interval (Welch's: the two runs'
    orders taken as independent samples, normal approximation), and what it says: "lower",
    "higher" or "within noise" (the interval holds 0). None with fewer than 2 values a side.
    (Both runs face the same orders, but a driver's draws follow its own events, which differ
    between policies: the pairs are not matched, so the unpaired interval is the honest one.)"""
    if len(base) < 2 or len(other) < 2:
        return None
    mean_b, mean_o = sum(base) / len(base), sum(other) / len(other)
    var_b = sum((x - mean_b) ** 2 for x in base) / (len(base) - 1)
    var_o = sum((x - mean_o) ** 2 for x in other) / (len(other) - 1)
    d = mean_o - mean_b
    half = Z95 * math.sqrt(var_b / len(base) + var_o / len(other))
    verdict = "lower" if d + half < 0 else "higher" if d - half > 0 else "within noise"
    return {"difference": round(d, 1), "ci95": [round(d - half, 1), round(d + half, 1)],
            "relative": round(d / mean_b, 4) if mean_b else None, "verdict": verdict}


def comparison(series: dict[str, dict]) -> dict:
    """Each policy against the first (the baseline): the difference of each compared mean with
    its 95 % interval (`difference`)."""
    names = list(series)
    base = series[names[0]]
    return {
        "baseline": names[0],
        "against": {name: {key: difference(base[s], series[name][s]) for key, s in COMPARED} for name in names[1:]},
    }


# The settings a policy's figures depend on, beside the policy itself (which each run sets):
# two runs compared side by side must have had the same (`services.outcome_merge`).
_SETTINGS_PREFIXES = ("DISPATCH_", "OFFER_", "DRIVER_STALE_", "ESCALATION_LEVEL", "STACKING_", "CANDIDATE_")
_SETTINGS_PER_RUN = ("DISPATCH_POLICY", "STACKING_ENABLED")


def platform_settings() -> dict:
    from django.conf import settings

    return {name: getattr(settings, name) for name in sorted(dir(settings))
            if name.startswith(_SETTINGS_PREFIXES) and name not in _SETTINGS_PER_RUN
            and isinstance(getattr(settings, name), int | float | str | bool)}


def collect(params: Params, trace: Trace) -> tuple[dict, dict]:
    """(the JSON result, the series the report plots)."""
    horizon = params.minutes * 60
    rows = list(
        Delivery.objects.order_by("seller_order_id").values_list(
            "pk", "ready_at", "assigned_at", "pickup_started_at", "delivered_at", "pickup_location"
        )
    )
    tta, pickup, delivery, delivered_in_window = [], [], [], 0
    for _pk, ready, assigned, arrived, delivered, _loc in rows:
        if assigned is not None:
            tta.append((assigned - ready).total_seconds())
            if arrived is not None:
                pickup.append((arrived - assigned).total_seconds())
        if delivered is not None:
            delivery.append((delivered - ready).total_seconds())
            delivered_in_window += (delivered - START).total_seconds() <= horizon
    created, assigned_n = len(rows), len(tta)
    offers = DriverOffer.objects.count()
    by_status = dict(DriverOffer.objects.order_by().values_list("status").annotate(n=Count("pk")))
    ever_unassigned = set(UnassignedOrder.objects.values_list("delivery_id", flat=True))
    escalated = UnassignedOrder.objects.filter(escalation_level__gte=1).count()

    # One sample a minute, each for the minute that starts at it: the driver-hours count every
    # minute of the window, the first included (without it a 10-minute run counted 9, and a
    # 1-minute run had no figure). Utilization leaves the first out: at 0 every driver is free.
    utilization = []
    active_hours = 0.0
    for s in trace.samples:
        if not 0 <= s["t"] < horizon:
            continue
        busy, available = s["counts"].get("busy", 0), s["counts"].get("available", 0)
        active_hours += (busy + available) / 60.0
        if s["t"] > 0:
            utilization.append(busy / (busy + available) if busy + available else 0.0)
    result = {
        "assignmentRate": _r(assigned_n / created if created else None, 4),
        "meanTimeToAssignSeconds": _r(_mean(tta)),
        "p95TimeToAssignSeconds": _r(percentile(tta, 95)),
        "meanPickupEtaSeconds": _r(_mean(pickup)),
        "meanDeliverySeconds": _r(_mean(delivery)),
        "p95DeliverySeconds": _r(percentile(delivery, 95)),
        "offersPerAssignment": _r(offers / assigned_n if assigned_n else None, 3),
        "driverUtilization": _r(_mean(utilization), 4),
        "escalations": escalated,
        "ordersPerDriverHour": _r(delivered_in_window / active_hours if active_hours else None, 3),
        "ordersCreated": created,
        "ordersAssigned": assigned_n,
        "ordersDelivered": len(delivery),
        # assigned, not at the pickup when the run stopped (its 30 minutes of drain spent): the
        # slowest, left out of the pickup mean, in numbers that differ between policies
        "ordersAssignedNotPickedUp": assigned_n - len(pickup),
        "ordersEverUnassigned": len(ever_unassigned),
        "ordersByStatus": dict(sorted(Delivery.objects.order_by().values_list("status").annotate(n=Count("pk")))),
        "stepsRefused": trace.steps_refused,
        "offers": offers,
        "offersByStatus": {k: by_status[k] for k in sorted(by_status)},
        "driverAnswers": dict(trace.answers),
        "breaks": trace.breaks,
        "simulatedSeconds": trace.end_s,
        "parameters": params.as_json(),
        "platformSettings": platform_settings(),
        "seed": params.seed,
        "policy": params.policy,
        "stacking": params.stacking,
    }
    heat = [(loc.y, loc.x) for pk, *_rest, loc in rows if pk in ever_unassigned]
    series = {
        "parameters": params.as_json(),  # (which run these are: `simulate_report` checks them against its JSON)
        "timeToAssign": tta,
        "pickupEta": pickup,
        "delivery": delivery,
        "utilization": [(s["t"] / 60, (s["counts"].get("busy", 0) / max(1, s["counts"].get("busy", 0) + s["counts"].get("available", 0))))
                        for s in trace.samples],
        "unassignedOpen": [(s["t"] / 60, s["unassigned"]) for s in trace.samples],
        "unassignedHeat": heat,
    }
    return result, series
