"""Ops console for drivers: availability, location, performance, zone preferences."""
from django import forms
from django.contrib import admin
from django.core.validators import RegexValidator
from django.template.response import TemplateResponse
from import_export import fields as export_fields

from availability.models import (
    SETTABLE_AVAILABILITY_CHOICES,
    Driver,
    DriverAvailability,
    DriverAvailabilityHistory,
)
from common.actors import Actor
from common.admin import ChangedFieldsOnlyAdmin, ConsoleExportMixin, ExportResource, MapAdminMixin, ReadOnlyInline, run_for_each
from common.admin_confirm import selection, selection_holds, too_many
from common.bidi import bidi_isolated
from dispatch.api.serializers import PHONE_HELP, PHONE_PATTERN
from dispatch.models import Assignment
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
        if data.get("state") == DriverAvailability.ON_BREAK and not data.get("duration_minutes") \
                and "duration_minutes" not in self.errors:  # (an out-of-range value has its own error)
            self.add_error("duration_minutes", "Required when the state is on_break.")
        return data


class DriverAssignmentInline(ReadOnlyInline):
    model = Assignment
    fk_name = "driver"
    fields = ("delivery", "status", "created_at", "ended_at", "end_reason")
    readonly_fields = fields


class AvailabilityHistoryInline(ReadOnlyInline):
    model = DriverAvailabilityHistory
    fields = ("timestamp", "from_state", "to_state", "reason", "actor_type", "actor_id")
    readonly_fields = fields
    ordering = ("-timestamp",)


class DriverPerformanceExport(ExportResource):
    """Driver performance as CSV/XLSX: one row per driver of the (filtered) list."""

    deliveries_completed = export_fields.Field(attribute="performance__deliveries_completed", column_name="deliveries_completed")
    deliveries_failed = export_fields.Field(attribute="performance__deliveries_failed", column_name="deliveries_failed")
    offers_accepted = export_fields.Field(attribute="performance__offers_accepted", column_name="offers_accepted")
    offers_rejected = export_fields.Field(attribute="performance__offers_rejected", column_name="offers_rejected")
    offers_expired = export_fields.Field(attribute="performance__offers_expired", column_name="offers_expired")
    acceptance_rate = export_fields.Field(attribute="performance__acceptance_rate", column_name="acceptance_rate")
    on_time_rate = export_fields.Field(attribute="performance__on_time_rate", column_name="on_time_rate")
    avg_response_ms = export_fields.Field(attribute="performance__avg_response_time_ms", column_name="avg_response_ms")
    total_earnings = export_fields.Field(attribute="performance__total_earnings", column_name="total_earnings")

    class Meta:
        model = Driver
        fields = (
            "id", "name", "vehicle_type", "availability", "rating", "deliveries_completed", "deliveries_failed",
            "offers_accepted", "offers_rejected", "offers_expired", "acceptance_rate", "on_time_rate",
            "avg_response_ms", "total_earnings",
        )
        export_order = fields


@admin.register(Driver)
class DriverAdmin(ConsoleExportMixin, MapAdminMixin, ChangedFieldsOnlyAdmin):
    """Profile fields and the home location (Leaflet, from our static files) are editable; the
    live location, availability and rating change only through the services (fixes, the
    availability action below, customer ratings)."""

    list_display = (
        "name", "phone", "vehicle_type", "availability", "availability_until", "location_recorded_at", "rating",
        "deliveries_completed", "acceptance_rate", "on_time_rate", "avg_response_ms", "earnings",
    )
    list_filter = ("availability", "vehicle_type")
    resource_classes = [DriverPerformanceExport]
    search_fields = ("name", "phone", "user__username", "id")
    list_select_related = ("user", "performance")
    readonly_fields = (
        "id", "user", "availability", "availability_until", "availability_reason", "last_availability_change",
        "availability_change_actor", "availability_change_actor_type", "rating", "location", "location_accuracy_m",
        "location_speed", "location_heading", "location_recorded_at", "created_at", "updated_at",
        "active_assignments", "capacity",
    )
    fieldsets = (
        (None, {"fields": ("id", "user", "name", "phone", "vehicle", "vehicle_type", "rating")}),
        ("Availability", {"fields": (
            "availability", "availability_until", "availability_reason", "last_availability_change",
            "availability_change_actor", "availability_change_actor_type", "active_assignments", "capacity",
        )}),
        ("Location", {"fields": ("location", "location_accuracy_m", "location_speed", "location_heading", "location_recorded_at", "home_location")}),
        ("Timestamps", {"fields": ("created_at", "updated_at")}),
    )
    inlines = [DriverZonePreferenceInline, AvailabilityHistoryInline, DriverAssignmentInline]
    actions = ["set_availability"]

    def has_add_permission(self, request):
        return False  # drivers are created through the API (they need a login and token)

    def formfield_for_dbfield(self, db_field, request, **kwargs):
        field = super().formfield_for_dbfield(db_field, request, **kwargs)
        if db_field.name == "phone":  # the API's rule (`<script>` was saved here)
            field.validators.append(RegexValidator(PHONE_PATTERN, f"Enter a phone number: {PHONE_HELP}."))
        return field

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

    @admin.action(description="Set availability (with a reason)…", permissions=["change"])
    def set_availability(self, request, queryset):
        form = SetAvailabilityForm(request.POST if "apply" in request.POST else None)
        if "apply" not in request.POST and too_many(request, queryset):
            return None
        if "apply" in request.POST and form.is_valid() and selection_holds(request, queryset):
            v = form.cleaned_data
            run_for_each(
                self, request, queryset,
                lambda driver: availability_override(
                    driver_id=driver.pk, to_state=v["state"], reason=v["reason"],
                    duration_minutes=v["duration_minutes"], actor=Actor.for_user(request.user),
                ),
                label=lambda driver: driver.name,
                done=lambda results: f"Availability set for {len(results)} driver{'s' if len(results) != 1 else ''}.",
            )
            return None
        return TemplateResponse(
            request, "admin/availability/driver/set_availability.html",
            {**self.admin_site.each_context(request), "form": form, "title": "Set availability",
             "selection": selection(request, queryset, lambda d: f"{bidi_isolated(d.name)} ({d.availability})")},
        )
