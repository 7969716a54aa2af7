from django.contrib import admin

from audit.models import DeliveryAuditLog
from common.admin import json_block


@admin.register(DeliveryAuditLog)
class DeliveryAuditLogAdmin(admin.ModelAdmin):
    """Read-only: the audit trail is append-only (a database trigger enforces it too)."""

    list_display = ("timestamp", "event_type", "delivery", "actor_type", "actor_id")
    list_filter = ("event_type", "actor_type")
    search_fields = ("delivery__seller_order_id", "delivery__id")
    list_select_related = ("delivery",)
    date_hierarchy = "timestamp"
    fields = ("id", "delivery", "timestamp", "event_type", "actor_id", "actor_type", "details_shown", "version", "seq")
    readonly_fields = fields

    @admin.display(description="details")
    def details_shown(self, entry):
        return json_block(entry.details)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
