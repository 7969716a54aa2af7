"""The ops console's roles as Django groups, with the least permissions each needs.

- **Dispatcher**: runs the console. Views everything operational; may change deliveries,
  drivers, offers, unassigned orders and tickets (through the admin actions, which call the
  workflows) and zones, and start simulations; may not see or edit users, groups, API tokens
  or the periodic schedule.
- **Viewer**: the same pages, read-only (view permissions only, no actions).

Both are staff logins (the admin requires it); `is_ops` in `common.roles` is unchanged, so a
Dispatcher passes the API's ops permission. `groups_sync()` is idempotent: it runs in
`manage.py setup_roles` (part of `make migrate`) and in `seed_demo`.
"""
from __future__ import annotations

from django.contrib.auth.models import Group, Permission
from django.db import transaction
from django.db.models import Q

from common.roles import DISPATCHER_GROUP, VIEWER_GROUP

# app_label → model → actions beyond "view" that a Dispatcher has.
CONSOLE_MODELS: dict[str, dict[str, tuple[str, ...]]] = {
    "availability": {"driver": ("change",), "driveravailabilityhistory": ()},
    "dispatch": {"delivery": ("change",), "assignment": (), "deliveryproof": ()},
    "offers": {"driveroffer": ("change",)},
    "escalation": {"unassignedorder": ("change",), "supportticket": ("change",), "ticketcomment": ()},
    "audit": {"deliveryauditlog": ()},
    "zones": {"deliveryzone": ("add", "change"), "driverzonepreference": ("add", "change", "delete")},
    "tracking": {"deliveryrating": ()},
    "analytics": {"driverperformance": (), "deliverycost": (), "deliveryrevenue": ()},
    # webhooks (switch on/off, replay; docs/notifications.md "Ops console") and customer messages
    "notifications": {"webhookendpoint": ("change",), "webhookmessage": ("change",), "webhookattempt": (),
                      "outboxevent": (), "customermessage": (), "customerreply": (),
                      # a customer who asked by phone for no more messages (removing one, when it asks
                      # to be messaged again, is a superuser's: a Dispatcher deletes nothing)
                      "customeroptout": ("add",)},
    # the dispatch simulator: a Dispatcher runs it to compare policies before changing a zone's
    # (docs/dispatch.md "The simulator"); one run at a time, in a worker of its own
    "simulation": {"simulationrun": ("add",)},
}


def _codenames(*, with_changes: bool) -> list[tuple[str, str]]:
    wanted = []
    for app_label, models in CONSOLE_MODELS.items():
        for model, actions in models.items():
            wanted.append((app_label, f"view_{model}"))
            if with_changes:
                wanted.extend((app_label, f"{action}_{model}") for action in actions)
    return wanted


def _permissions(wanted: list[tuple[str, str]]) -> list[Permission]:
    query = Q(pk__in=[])
    for app_label, codename in wanted:
        query |= Q(content_type__app_label=app_label, codename=codename)
    found = list(Permission.objects.filter(query).select_related("content_type"))
    missing = set(wanted) - {(p.content_type.app_label, p.codename) for p in found}
    if missing:
        raise RuntimeError(f"permissions not found (run migrate first): {sorted(missing)}")
    return found


@transaction.atomic
def groups_sync() -> dict[str, Group]:
    """Create or update the Dispatcher and Viewer groups to exactly their permissions."""
    groups = {}
    for name, with_changes in ((DISPATCHER_GROUP, True), (VIEWER_GROUP, False)):
        group, _ = Group.objects.get_or_create(name=name)
        group.permissions.set(_permissions(_codenames(with_changes=with_changes)))
        groups[name] = group
    return groups
