"""Ops console for drivers, deliveries and assignments. Actions call services."""
from django import forms
from django.contrib import admin, messages
from django.contrib.gis.admin import GISModelAdmin
from django.template.response import TemplateResponse

from analytics.models import DeliveryCost, DeliveryRevenue
from audit.models import DeliveryAuditLog
from availability.models import (
    SETTABLE_AVAILABILITY_CHOICES,
    Driver,
    DriverAvailability,
    DriverAvailabilityHistory,
)
from common.actors import Actor
from common.admin import run_for_each
from dispatch.models import Assignment, Delivery
from offers.admin import OfferInline
from workflows import deliveries
from workflows.dispatching import delivery_dispatch
from workflows.drivers import availability_override
from zones.admin import DriverZonePreferenceInline


class SetAvailabilityForm(forms.Form):
    state = forms.ChoiceField(choices=SETTABLE_AVAILABILITY_CHOICES)
    reason = forms.CharField(max_length=255)
    duration_minutes = forms.IntegerField(
        min_value=1, max_value=24 * 60, required=False, help_text="Required for on_break."
    )

    def clean(self):
        data = super().clean()
        if data.get("state") == DriverAvailability.ON_BREAK and not data.get("duration_minutes"):
            self.add_error("duration_minutes", "Required when the state is on_break.")
        return data


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


class DriverAssignmentInline(AssignmentInline):
    fk_name = "driver"
    fields = ("delivery", "status", "created_at", "ended_at", "end_reason")
    readonly_fields = fields


class AvailabilityHistoryInline(ReadOnlyInline):
    model = DriverAvailabilityHistory
    fields = ("timestamp", "from_state", "to_state", "reason", "actor_type", "actor_id")
    readonly_fields = fields
    ordering = ("-timestamp",)


class CostInline(ReadOnlyInline):
    model = DeliveryCost

    fields = ("driver_payment", "platform_fee", "postgres_cost", "redis_cost", "api_calls_cost", "total_cost", "created_at")
    readonly_fields = fields


class RevenueInline(ReadOnlyInline):
    model = DeliveryRevenue

    fields = ("delivery_fee", "commission", "total_revenue", "created_at")
    readonly_fields = fields


@admin.register(Driver)
class DriverAdmin(GISModelAdmin):
    list_display = (
        "name", "phone", "vehicle_type", "availability", "availability_until", "location_recorded_at", "rating",
        "deliveries_completed", "acceptance_rate", "on_time_rate", "avg_response_ms", "earnings",
    )
    list_filter = ("availability", "vehicle_type")
    search_fields = ("name", "phone", "user__username", "id")
    list_select_related = ("user", "performance")
    readonly_fields = (
        "id", "user", "availability", "availability_until", "availability_reason", "last_availability_change",
        "availability_change_actor", "availability_change_actor_type", "location_recorded_at", "created_at", "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("id", "user", "name", "phone", "vehicle", "vehicle_type", "rating")}),
        ("Availability", {"fields": (
            "availability", "availability_until", "availability_reason", "last_availability_change",
            "availability_change_actor", "availability_change_actor_type",
        )}),
        ("Location", {"fields": ("location", "location_accuracy_m", "location_speed", "location_heading", "location_recorded_at", "home_location")}),
        ("Timestamps", {"fields": ("created_at", "updated_at")}),
    )
    inlines = [DriverZonePreferenceInline, AvailabilityHistoryInline, DriverAssignmentInline]
    actions = ["set_availability"]

    def has_add_permission(self, request):
        return False  # drivers are created through the API (they need a login and token)

    def _perf(self, obj):
        return getattr(obj, "performance", None)

    @admin.display(description="delivered")
    def deliveries_completed(self, obj):
        p = self._perf(obj)
        return p.deliveries_completed if p else 0

    @admin.display(description="acceptance")
    def acceptance_rate(self, obj):
        p = self._perf(obj)
        return f"{p.acceptance_rate:.0%}" if p else "–"

    @admin.display(description="on time")
    def on_time_rate(self, obj):
        p = self._perf(obj)
        return f"{p.on_time_rate:.0%}" if p and p.timed_deliveries else "–"

    @admin.display(description="avg response (ms)")
    def avg_response_ms(self, obj):
        p = self._perf(obj)
        return p.avg_response_time_ms if p else "–"

    @admin.display(description="earnings")
    def earnings(self, obj):
        p = self._perf(obj)
        return p.total_earnings if p else 0

    @admin.action(description="Set availability (with a reason)…")
    def set_availability(self, request, queryset):
        form = SetAvailabilityForm(request.POST if "apply" in request.POST else None)
        if "apply" in request.POST and form.is_valid():
            v = form.cleaned_data
            run_for_each(
                self, request, queryset,
                lambda driver: availability_override(
                    driver_id=driver.pk, to_state=v["state"], reason=v["reason"],
                    duration_minutes=v["duration_minutes"], actor=Actor.for_user(request.user),
                ),
                label=lambda driver: driver.name,
                done=lambda results: f"Availability set for {len(results)} drivers.",
            )
            return None
        return TemplateResponse(
            request, "admin/dispatch/driver/set_availability.html",
            {**self.admin_site.each_context(request), "form": form, "drivers": queryset, "title": "Set availability"},
        )


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
