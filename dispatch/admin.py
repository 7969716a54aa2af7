"""Ops console for drivers, deliveries and assignments. Actions call services."""
from django.contrib import admin, messages
from django.contrib.gis.admin import GISModelAdmin

from analytics.models import DeliveryCost, DeliveryRevenue
from audit.models import DeliveryAuditLog
from common.actors import Actor
from common.admin import ReadOnlyInline, run_for_each
from dispatch.models import Assignment, Delivery
from offers.admin import OfferInline
from workflows import deliveries
from workflows.dispatching import delivery_dispatch


class AuditInline(ReadOnlyInline):
    model = DeliveryAuditLog
    fields = ("timestamp", "event_type", "actor_type", "actor_id", "details")
    readonly_fields = fields
    ordering = ("timestamp", "seq")


class AssignmentInline(ReadOnlyInline):
    model = Assignment
    fk_name = "delivery"
    fields = ("driver", "status", "created_at", "ended_at", "end_reason")
    readonly_fields = fields


class CostInline(ReadOnlyInline):
    model = DeliveryCost

    fields = ("driver_payment", "platform_fee", "postgres_cost", "redis_cost", "api_calls_cost", "total_cost", "created_at")
    readonly_fields = fields


class RevenueInline(ReadOnlyInline):
    model = DeliveryRevenue

    fields = ("delivery_fee", "commission", "total_revenue", "created_at")
    readonly_fields = fields


@admin.register(Delivery)
class DeliveryAdmin(GISModelAdmin):
    list_display = ("seller_order_id", "store_name", "status", "created_by", "ready_at", "assigned_at", "delivered_at")
    list_filter = ("status",)
    search_fields = ("seller_order_id", "store_name", "customer_name", "id")
    list_select_related = ("created_by",)
    date_hierarchy = "created_at"
    readonly_fields = (
        "id", "status", "created_by", "tracking_token", "offer_acceptance_count", "failure_reason",
        "cancellation_reason", "created_at", "ready_at", "assigned_at", "pickup_started_at", "picked_up_at",
        "in_transit_at", "delivered_at", "failed_at", "cancelled_at", "updated_at",
    )
    inlines = [OfferInline, AssignmentInline, CostInline, RevenueInline, AuditInline]
    actions = ["dispatch_now", "reassign_deliveries", "cancel_deliveries"]

    def has_add_permission(self, request):
        return False  # deliveries come from sellers through the API

    @admin.action(description="Dispatch selected ready deliveries now")
    def dispatch_now(self, request, queryset):

        def dispatch(delivery):
            result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.for_user(request.user), strict=True)
            text = f"offered to driver {result.offer.driver_id}" if result.offer else f"unassigned ({result.failure_reason})"
            self.message_user(request, f"{delivery.seller_order_id}: {text}", messages.INFO)

        run_for_each(self, request, queryset, dispatch, label=lambda d: d.seller_order_id)

    @admin.action(description="Reassign selected deliveries to another driver (reason: reassigned by ops)")
    def reassign_deliveries(self, request, queryset):
        def reassign(delivery):
            previous, result = deliveries.delivery_reassign(
                delivery_id=delivery.pk, reason="reassigned by ops", actor=Actor.for_user(request.user)
            )
            self.message_user(request, f"{delivery.seller_order_id}: taken from {previous}, {result.outcome}", messages.INFO)

        run_for_each(self, request, queryset, reassign, label=lambda d: d.seller_order_id)

    @admin.action(description="Cancel selected deliveries (reason: cancelled by ops)")
    def cancel_deliveries(self, request, queryset):
        run_for_each(
            self, request, queryset,
            lambda d: deliveries.delivery_cancel(delivery_id=d.pk, reason="cancelled by ops", actor=Actor.for_user(request.user)),
            label=lambda d: d.seller_order_id,
            done=lambda results: f"Cancelled {len(results)} deliveries.",
        )


@admin.register(Assignment)
class AssignmentAdmin(admin.ModelAdmin):
    list_display = ("delivery", "driver", "status", "created_at", "ended_at")
    list_filter = ("status",)
    search_fields = ("delivery__seller_order_id", "driver__name", "id")
    list_select_related = ("delivery", "driver")
    readonly_fields = ("id", "delivery", "driver", "status", "created_at", "ended_at", "end_reason")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
