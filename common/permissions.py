from rest_framework.permissions import SAFE_METHODS, BasePermission

from common.roles import VIEWER_GROUP, in_group, is_driver, is_integration, is_ops, is_support


def _ops(request) -> bool:
    """Ops staff, for this request: a Viewer (the console's read-only role) is ops for reads
    only. Token logins carry their group names, so this costs no query on the API's hot paths."""
    if not is_ops(request.user):
        return False
    return request.method in SAFE_METHODS or not in_group(request.user, VIEWER_GROUP)


class IsOps(BasePermission):
    message = "Only ops staff may do this."

    def has_permission(self, request, view):
        return _ops(request)


class IsOpsOrIntegration(BasePermission):
    message = "Only ops staff or integrations may do this."

    def has_permission(self, request, view):
        return _ops(request) or is_integration(request.user)


class IsOpsOrDriver(BasePermission):
    message = "Only ops staff or drivers may do this."

    def has_permission(self, request, view):
        return _ops(request) or is_driver(request.user)


class IsDriver(BasePermission):
    message = "Only drivers may do this."

    def has_permission(self, request, view):
        return is_driver(request.user)


class IsOpsIntegrationOrDriver(BasePermission):
    message = "Not allowed."

    def has_permission(self, request, view):
        u = request.user
        # the driver relation is loaded with the token; the group check is a query
        return _ops(request) or is_driver(u) or is_integration(u)


class IsSupport(BasePermission):
    """Support agents (group `support`) and staff."""

    message = "Only support agents or ops staff may do this."

    def has_permission(self, request, view):
        user = request.user
        if not (is_support(user) and user.is_active):
            return False
        return request.method in SAFE_METHODS or not (user.is_staff and in_group(user, VIEWER_GROUP))
