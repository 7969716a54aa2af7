from rest_framework.permissions import BasePermission

from common.roles import is_driver, is_integration, is_ops, is_support


class IsOps(BasePermission):
    message = "Only ops staff may do this."

    def has_permission(self, request, view):
        return is_ops(request.user)


class IsOpsOrIntegration(BasePermission):
    message = "Only ops staff or integrations may do this."

    def has_permission(self, request, view):
        return is_ops(request.user) or is_integration(request.user)


class IsOpsOrDriver(BasePermission):
    message = "Only ops staff or drivers may do this."

    def has_permission(self, request, view):
        return is_ops(request.user) or is_driver(request.user)


class IsDriver(BasePermission):
    message = "Only drivers may do this."

    def has_permission(self, request, view):
        return is_driver(request.user)


class IsOpsIntegrationOrDriver(BasePermission):
    message = "Not allowed."

    def has_permission(self, request, view):
        u = request.user
        # the driver relation is loaded with the token; the group check is a query
        return is_ops(u) or is_driver(u) or is_integration(u)


class IsSupport(BasePermission):
    """Support agents (group `support`) and staff."""

    message = "Only support agents or ops staff may do this."

    def has_permission(self, request, view):
        return is_support(request.user) and request.user.is_active
