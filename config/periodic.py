"""The periodic schedule, declared once; `manage.py setup_periodic_tasks` installs it into
django-celery-beat (which ops can then inspect and tune in the admin)."""

# name: (task, every N seconds, options)
PERIODIC_TASKS: dict[str, tuple[str, int, dict]] = {
    "purge idempotency records": ("common.purge_idempotency_records", 3600, {"expires": 3000}),
    "expire breaks": ("availability.expire_breaks", 10, {"expires": 10}),
    "expire offers sweep": ("offers.expire_overdue_offers", 5, {"expires": 5}),
    "retry unassigned deliveries": ("dispatch.retry_unassigned", 30, {"expires": 30}),
    # batched_matching: each zone's round runs from a task scheduled for the end of its window;
    # this sweep runs any due round such a task missed (a worker that died holding it).
    "batched matching sweep": ("dispatch.run_matching_rounds", 15, {"expires": 15}),
    "escalation check": ("escalation.check", 30, {"expires": 30}),
    "stale drivers offline": ("availability.mark_stale_drivers_offline", 60, {"expires": 55}),
    "reconcile GEO index": ("availability.reconcile_geo_index", 60, {"expires": 55}),
    "zone health": ("zones.refresh_zone_health", 60, {"expires": 55}),
    "webhooks sweep": ("notifications.deliver_webhooks", 15, {"expires": 15}),
    "purge webhook events": ("notifications.purge_webhook_events", 3600, {"expires": 3000}),
    "purge expired quotes": ("dispatch.purge_expired_quotes", 3600, {"expires": 3000}),
    # status changes mark their deliveries' ETA refresh due in Redis and kick one run; this
    # sweep takes what a lost kick left (tracking.refresh_due_etas)
    "ETA refresh sweep": ("tracking.refresh_due_etas", 15, {"expires": 15}),
    "customer messages sweep": ("notifications.send_customer_messages", 15, {"expires": 15}),
    # publishes that failed after commit and were kept (offer pushes, ops alerts, driver notices:
    # common.deferred)
    "republish deferred tasks": ("common.republish_deferred_tasks", 10, {"expires": 10}),
}

# Work due at a moment — the safety nets above that keep the fleet moving, an offer's expiry at
# its deadline, a zone's matching round at the end of its window, a dispatch's second look
# (workflows.dispatching.SECOND_LOOK_TASK) — has a queue of its own, taken
# by every worker (`-Q timers,celery,eta`): kombu's Redis transport rotates the queues it pops, so
# a backlog on `celery` (a burst of pushes, a slow webhook endpoint) delays it by one message at
# most, where it used to wait behind the whole backlog and the jobs' `expires` discarded it.
# The customer messages' sweep (also kicked after commits; it calls the SMS and e-mail services)
# and the hourly purges stay on `celery`; the ETA sweep is on `eta`, the webhook sweep on
# `webhooks` (WEBHOOKS_QUEUE).
# (Offer pushes call FCM: on `celery`, so a worker on `-Q timers` alone keeps outbound calls off
# the timers, docs/operations.md.)
TIMERS_QUEUE = "timers"
# The webhook sweep, the one task that waits on outside endpoints for up to its budget: a worker
# of its own, which no other worker shares (config/settings/base.py CELERY_TASK_ROUTES).
WEBHOOKS_QUEUE = "webhooks"
TIMER_TASKS = frozenset({
    "offers.expire_offer", "offers.expire_overdue_offers", "availability.expire_breaks",
    "dispatch.retry_unassigned", "dispatch.run_matching_round", "dispatch.run_matching_rounds",
    "dispatch.second_look",
    "escalation.check", "availability.mark_stale_drivers_offline", "availability.reconcile_geo_index",
    "zones.refresh_zone_health", "common.republish_deferred_tasks",
})

# Names of tasks we manage start with this, so stale ones can be removed safely.
MANAGED_PREFIX = "[dispatch] "
