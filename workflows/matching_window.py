"""The batched_matching window (docs/dispatch.md, "batched_matching"): whether an automatic
dispatch of a ready delivery waits for its zone's next matching round instead of offering at
once, and the mark that makes it wait. The rounds themselves: `workflows.matching`.

Kept apart from the rounds so that the dispatch engine can call it (the rounds call the
engine's ranking and failure rules: one module each way would be a cycle).
"""
from __future__ import annotations

from datetime import datetime, timedelta

from common.broadcast import enqueue_task_on_commit
from dispatch.models import Delivery, DispatchPolicy
from zones.policies import ZonePolicy, zone_policy

ROUND_TASK = "dispatch.run_matching_round"  # one zone's round, scheduled for when it is due


def policy_of(delivery: Delivery) -> ZonePolicy:
    return zone_policy(delivery.zone if getattr(delivery, "zone_id", None) else None)


def window_seconds(policy: ZonePolicy) -> int:
    """The zone's collection window; 0 (offer at once) unless the zone matches in batches."""
    if policy.policy != DispatchPolicy.BATCHED_MATCHING:
        return 0
    return max(0, policy.matching_window_seconds)


def past_target(delivery: Delivery, policy: ZonePolicy, *, now: datetime) -> bool:
    """The target-wait rule: waiting one more window (until `now` + window) would carry the
    delivery past its zone's target wait, counted from `ready_at`. Such a delivery is not held
    back: it is offered at once, greedily (the sequential way)."""
    deadline = delivery.ready_at + timedelta(seconds=policy.target_wait_seconds)
    return now + timedelta(seconds=window_seconds(policy)) > deadline


def delivery_wait_for_round_locked(delivery: Delivery, *, now: datetime) -> bool:
    """An automatic dispatch in a batched_matching zone (window > 0): the delivery waits for
    the zone's next round (`matching_since` = now; after commit, a task is scheduled for the end
    of its window) and True is returned; the caller makes no offer. False: dispatch as usual (other policies, window 0, or past the target wait). The
    caller holds the delivery's lock and has checked that it is ready with no pending offer."""
    policy = policy_of(delivery)
    if window_seconds(policy) == 0 or past_target(delivery, policy, now=now):
        return False
    Delivery.objects.filter(pk=delivery.pk).update(matching_since=now)
    delivery.matching_since = now
    zone_id = getattr(delivery, "zone_id", None)
    enqueue_task_on_commit(
        ROUND_TASK, None if zone_id is None else str(zone_id), eta=now + timedelta(seconds=window_seconds(policy))
    )
    return True
