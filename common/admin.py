from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from rest_framework.authtoken.admin import TokenAdmin as DrfTokenAdmin
from rest_framework.authtoken.models import TokenProxy

from common import hooks
from common.exceptions import DomainError
from common.models import User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_filter = ("is_staff", "is_active", "groups")

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if change and "is_active" in form.changed_data and not obj.is_active:
            hooks.login_revoked(obj)


admin.site.unregister(TokenProxy)


@admin.register(TokenProxy)
class TokenAdmin(DrfTokenAdmin):
    """DRF's token admin; deleting a token also tells the apps that cache it (the location
    fast lane), so it stops working at once."""

    def delete_model(self, request, obj):
        user = obj.user
        super().delete_model(request, obj)
        hooks.login_revoked(user)

    def delete_queryset(self, request, queryset):
        users = [t.user for t in queryset.select_related("user")]
        super().delete_queryset(request, queryset)
        for user in users:
            hooks.login_revoked(user)


def run_for_each(modeladmin, request, queryset, action, *, label=str, done=None) -> list:
    """Admin actions call a service per selected row (in primary-key order, the lock order):
    a row the service refuses (409/404/400...) is reported and skipped, the rest go on.
    Returns the services' results; `done(results)` gives the summary message, if any."""
    results = []
    for obj in queryset.order_by("pk"):
        try:
            results.append(action(obj))
        except DomainError as exc:
            modeladmin.message_user(request, f"{label(obj)}: {exc.message}", messages.WARNING)
    if done is not None and results:
        modeladmin.message_user(request, done(results), messages.SUCCESS)
    return results


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
