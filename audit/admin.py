from django.contrib import admin

from audit.models import DeliveryAuditLog


@admin.register(DeliveryAuditLog)
class DeliveryAuditLogAdmin(admin.ModelAdmin):
    """Read-only: the audit trail is append-only (a database trigger enforces it too)."""

    list_display = ("timestamp", "event_type", "delivery", "actor_type", "actor_id")
    list_filter = ("event_type", "actor_type")
    search_fields = ("delivery__seller_order_id", "delivery__id")
    list_select_related = ("delivery",)
    date_hierarchy = "timestamp"

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
