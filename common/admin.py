from django.contrib import admin, messages
from django.contrib.auth.admin import UserAdmin as BaseUserAdmin

from common.exceptions import DomainError
from common.models import User


@admin.register(User)
class UserAdmin(BaseUserAdmin):
    list_filter = ("is_staff", "is_active", "groups")


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
