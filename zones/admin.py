"""Ops console for zones: boundaries drawn on a map, staffing and live health at a glance.
Saving goes through the zone services; driver preferences are an inline on the driver page.

The map is django-leaflet's admin widget: Leaflet and Leaflet.draw from our static files (no
CDN), so a zone can be drawn on a machine without internet; tiles come from OPS_MAP_TILE_URL
and the editor works without them."""
from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.db.models import F
from django.utils.html import format_html

from common.admin import MapAdminMixin, OpenedValuesInlineMixin, OpenedValuesMixin
from common.forms import SafeAutocompleteMixin
from zones import services
from zones.geometry import validate_zone_polygon
from zones.models import DeliveryZone, DriverZonePreference

class DeliveryZoneForm(forms.ModelForm):
    class Meta:
        model = DeliveryZone
        fields = "__all__"

    def clean_name(self):
        """One error for a name taken (in any case): the field's unique check and the
        case-blind constraint each gave theirs, two messages for one mistake.

        Two saves of one new name at once (two dispatchers, a resubmit) both passed this check,
        and the second's save was a 500 (the service's Conflict). The admin validates and saves
        in one transaction: a lock on the name, held to its commit, makes the second wait here
        and then see the first's zone."""
        name = self.cleaned_data.get("name")
        if name:
            services.zone_name_lock(name)
        if name and DeliveryZone.objects.filter(name__iexact=name).exclude(pk=self.instance.pk).exists():
            raise forms.ValidationError("A zone with this name already exists.")
        return name

    def clean_geometry(self):
        geometry = self.cleaned_data.get("geometry")
        if geometry is None:
            return geometry
        try:
            return validate_zone_polygon(geometry)
        except ValidationError as exc:
            raise forms.ValidationError(exc.messages)


class BelowMinimumFilter(admin.SimpleListFilter):
    title = "staffing"
    parameter_name = "staffing"

    def lookups(self, request, model_admin):
        return [("below", "Below minimum drivers"), ("ok", "At or above minimum")]

    def queryset(self, request, queryset):
        if self.value() == "below":
            return queryset.filter(current_drivers_online__lt=F("min_drivers_online"))
        if self.value() == "ok":
            return queryset.filter(current_drivers_online__gte=F("min_drivers_online"))
        return queryset


@admin.register(DeliveryZone)
class DeliveryZoneAdmin(OpenedValuesMixin, MapAdminMixin, admin.ModelAdmin):
    form = DeliveryZoneForm
    list_display = (
        "name", "priority_level", "drivers_online", "below_minimum", "health", "demand_level",
        "avg_wait_time_seconds", "target_wait_time_seconds", "last_updated",
    )
    list_filter = (BelowMinimumFilter, "priority_level")
    search_fields = ("name",)
    ordering = ("priority_level", "name")
    readonly_fields = (
        "id", "current_drivers_online", "avg_wait_time_seconds", "demand_level", "health_score", "last_updated",
        "created_at", "updated_at",
    )
    fieldsets = (
        (None, {"fields": ("id", "name", "geometry", "priority_level")}),
        ("Staffing and targets", {"fields": ("min_drivers_online", "target_wait_time_seconds")}),
        ("Dispatch overrides", {"fields": ("offer_expires_seconds", "search_radius_km")}),
        ("Dispatch policy and order stacking (empty: the global settings; docs/dispatch.md)", {"fields": (
            "dispatch_policy", "offer_batch_size", "broadcast_max_drivers", "matching_window_seconds",
            "stacking_enabled", "stacking_max_detour_minutes",
        )}),
        ("Serviceability and pay (empty: the global settings)", {"fields": (
            "max_delivery_distance_km", "driver_pay_per_km", "driver_pay_cap",
        )}),
        ("Proof of delivery (empty: DEFAULT_PROOF_POLICY)", {"fields": ("proof_required",)}),
        ("Live health (updated every minute)", {"fields": (
            "current_drivers_online", "avg_wait_time_seconds", "demand_level", "health_score", "last_updated",
        )}),
        ("Timestamps", {"fields": ("created_at", "updated_at")}),
    )
    actions = ["refresh_health"]

    @admin.display(description="Drivers online / min", ordering="current_drivers_online")
    def drivers_online(self, zone):
        text = f"{zone.current_drivers_online} / {zone.min_drivers_online}"
        if zone.below_minimum:
            return format_html('<span class="zone-below-min" style="color:#ba2121;font-weight:bold">&#9888; {}</span>', text)
        return format_html('<span style="color:#2e7d32">{}</span>', text)

    @admin.display(description="Below min", ordering="current_drivers_online")
    def below_minimum(self, zone):
        """Coloured by meaning: below the minimum is the bad case (red), not a green tick."""
        if zone.below_minimum:
            return format_html('<span class="flag-bad" style="color:#ba2121;font-weight:bold">{}</span>', "yes")
        return format_html('<span class="flag-ok" style="color:#2e7d32">{}</span>', "no")

    @admin.display(description="Health", ordering="health_score")
    def health(self, zone):
        if zone.health_score is None:
            return "—"
        colour = "#2e7d32" if zone.health_score >= 70 else "#ef6c00" if zone.health_score >= 40 else "#ba2121"
        return format_html('<span style="color:{};font-weight:bold">{}</span>', colour, zone.health_score)

    def save_model(self, request, obj, form, change):
        fields = {f: form.cleaned_data[f] for f in services.EDITABLE_FIELDS if f in form.cleaned_data}
        if change:
            changed = {f: v for f, v in fields.items() if f in form.changed_data}
            services.zone_update(zone_id=obj.pk, **changed)
        else:
            zone = services.zone_create(**fields)
            obj.pk = zone.pk
            obj._state.adding = False
            obj._state.db = zone._state.db

    @admin.action(description="Recompute health now", permissions=["change"])
    def refresh_health(self, request, queryset):
        done = services.zone_health_refresh(zone_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Health recomputed for {done} zone{'s' if done != 1 else ''}.", messages.SUCCESS)


class DriverZonePreferenceFormSet(forms.BaseInlineFormSet):
    def clean(self):
        """A zone the driver already has a preference for (a stale page, a second tab): a form
        error. Django checks the driver-zone rule only among the page's rows (the driver, the
        inline's key, is not a field of its forms), so the database's constraint raised."""
        super().clean()
        if self.instance.pk is None:
            return
        # Two tabs saving at the same instant: the admin's save is one transaction, so the
        # driver's lock (the one zone_preferences_set takes) makes the second wait and then
        # see the first's row, instead of meeting the database's constraint (a 500).
        type(self.instance).objects.select_for_update(of=("self",), no_key=True).filter(pk=self.instance.pk).first()
        on_page = [form.instance.pk for form in self.initial_forms]  # (edited or deleted here)
        taken = set(
            DriverZonePreference.objects.filter(driver=self.instance).exclude(pk__in=on_page).values_list("zone_id", flat=True)
        )
        for form in self.forms:  # (a row of the page moved to a zone another tab added, too)
            zone = getattr(form, "cleaned_data", {}).get("zone")
            if zone is not None and not form.cleaned_data.get("DELETE") and zone.pk in taken:
                form.add_error("zone", "The driver already has a preference for this zone: reload the page to edit it.")

    def save(self, commit=True):
        saved = super().save(commit=commit)
        if commit and self.instance.pk:
            # Also runs when only the driver's home location changed on the same page.
            services.zone_preferences_refresh_distances(driver_id=self.instance.pk)
        return saved


class DriverZonePreferenceInline(OpenedValuesInlineMixin, SafeAutocompleteMixin, admin.TabularInline):
    """Zone preferences on the driver page (dispatch.admin.DriverAdmin)."""

    model = DriverZonePreference
    fk_name = "driver"
    formset = DriverZonePreferenceFormSet
    fields = ("zone", "preference", "distance_to_zone_center")
    readonly_fields = ("distance_to_zone_center",)
    autocomplete_fields = ("zone",)
    extra = 0
    verbose_name = "zone preference"
