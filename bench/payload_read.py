"""The webhook payload's read of a delivery with its latest assignment
(`notifications.payloads.deliveries_for_payload`): the hand-written statement against the
queryset it replaced (four correlated subqueries, compiled on every call), CPU of this process
and wall time per call, for batches of 1 and of 20 deliveries (the stream consumer's ETA
batches at low and high rates), alternating rounds; the median of the rounds. Reads the dev
database's most recent assigned deliveries (run `bench/offer_flow.py` or `seed_demo` first).

    .venv/bin/python bench/payload_read.py --rounds 6 --calls 300
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from django.db.models import OuterRef, Subquery  # noqa: E402

from benchlib import machine_state  # noqa: E402
from dispatch.models import Assignment, Delivery  # noqa: E402
from notifications.payloads import deliveries_for_payload  # noqa: E402


def queryset_form(ids) -> dict:
    """The queryset `deliveries_for_payload` was until 2026-12-04 (the reference)."""
    latest = Assignment.objects.filter(delivery_id=OuterRef("pk")).order_by("-created_at", "-id")
    rows = Delivery.objects.filter(pk__in=list(ids)).annotate(
        latest_assignment_id=Subquery(latest.values("pk")[:1]),
        latest_driver_id=Subquery(latest.values("driver_id")[:1]),
        latest_assignment_status=Subquery(latest.values("status")[:1]),
        latest_end_reason=Subquery(latest.values("end_reason")[:1]),
    )
    return {str(d.pk): d for d in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--calls", type=int, default=300)
    args = p.parse_args()
    ids = []  # the 20 most recently assigned deliveries, each once (a reassigned one has several)
    for delivery_id in Assignment.objects.order_by("-created_at").values_list("delivery_id", flat=True)[:200]:
        if delivery_id not in ids:
            ids.append(delivery_id)
    ids = ids[:20]
    if len(ids) < 20:
        sys.exit("need 20 assigned deliveries in the dev database (run bench/offer_flow.py first)")
    machine_state("machine before")
    for size in (1, 20):
        batch = ids[:size]
        assert {k: (d.latest_assignment_id, d.latest_assignment_status) for k, d in queryset_form(batch).items()} == {
            k: (d.latest_assignment_id, d.latest_assignment_status) for k, d in deliveries_for_payload(batch).items()}
        ways = {"queryset (before)": queryset_form, "hand-written (now)": deliveries_for_payload}
        cpu, wall = {n: [] for n in ways}, {n: [] for n in ways}
        for _ in range(args.rounds):
            for name, f in ways.items():
                c, w = time.process_time(), time.perf_counter()
                for _ in range(args.calls):
                    f(batch)
                cpu[name].append((time.process_time() - c) / args.calls * 1e6)
                wall[name].append((time.perf_counter() - w) / args.calls * 1e6)
        print(f"\n{size} deliveries a call, {args.rounds} alternating rounds of {args.calls} calls (median):")
        for name in ways:
            print(f"  {name:20s} CPU {statistics.median(cpu[name]):6.0f} µs   wall {statistics.median(wall[name]):6.0f} µs")
    machine_state("machine after")


if __name__ == "__main__":
    main()
