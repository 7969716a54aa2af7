"""Role checks shared by permissions, consumers and views."""
from django.core.exceptions import ObjectDoesNotExist

INTEGRATIONS_GROUP = "integrations"
SUPPORT_GROUP = "support"
# The ops console's roles (common/groups.py): staff logins with least-privilege admin permissions.
DISPATCHER_GROUP = "Dispatcher"
VIEWER_GROUP = "Viewer"


def in_group(user, name: str) -> bool:
    cache = getattr(user, "_group_names", None)
    if cache is None:
        cache = set(user.groups.values_list("name", flat=True))
        user._group_names = cache
    return name in cache


def is_ops(user) -> bool:
    return bool(user and user.is_authenticated and user.is_active and user.is_staff)


def is_integration(user) -> bool:
    return bool(user and user.is_authenticated and in_group(user, INTEGRATIONS_GROUP))


def is_support(user) -> bool:
    return bool(user and user.is_authenticated and (user.is_staff or in_group(user, SUPPORT_GROUP)))


def driver_of(user):
    """The Driver behind a login, or None."""
    if not (user and user.is_authenticated):
        return None
    try:
        return user.driver
    except (ObjectDoesNotExist, AttributeError):
        return None


def is_driver(user) -> bool:
    return driver_of(user) is not None
