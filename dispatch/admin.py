"""Ops console for deliveries and assignments. Every field of a delivery is read-only here:
state changes only through the workflows (the actions below), which write the audit rows.
Cancel and reassign ask for confirmation and a typed reason; "assign to a driver" offers the
delivery to a chosen nearby driver through the same workflow as `POST /v2/deliveries/{id}/offers`."""
from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from import_export import fields as export_fields

from analytics.models import DeliveryCost, DeliveryRevenue
from audit.models import DeliveryAuditLog
from availability.geo import drivers_available_near
from availability.live import positions_of
from availability.models import Driver
from common.actors import Actor
from common.admin import (
    ChangedFieldsOnlyAdmin, ConsoleExportMixin, ExportResource, LiveListMixin, ReadOnlyInline, recent_filter, run_for_each,
)
from common.admin_confirm import confirm_then
from common.bidi import bidi_isolated
from dispatch.models import Assignment, Delivery, DeliveryProof, DeliveryStatus
from dispatch.proofs import proof_signed_path
from notifications.admin import CustomerMessageInline, CustomerReplyInline
from offers.admin import OfferInline
from offers.models import DriverOffer, OfferStatus
from workflows import deliveries
from workflows.dispatching import delivery_dispatch
from workflows.offers import offer_create

User = get_user_model()


class AssignmentInline(ReadOnlyInline):
    model = Assignment
    fk_name = "delivery"
    fields = ("driver", "status", "created_at", "ended_at", "end_reason")
    readonly_fields = fields


class ProofInline(ReadOnlyInline):
    """The driver's photos and signatures, as thumbnails linking to the full image; both through
    signed URLs that expire after PROOF_URL_TTL_SECONDS (reload the page for fresh ones)."""

    model = DeliveryProof
    fk_name = "delivery"
    fields = ("image", "kind", "note", "driver", "delivery_status", "created_at", "size_bytes")
    readonly_fields = fields
    verbose_name = "proof of delivery"
    verbose_name_plural = "proof of delivery (photos and signatures)"

    @admin.display(description="image")
    def image(self, proof):
        url = proof_signed_path(proof.pk)
        return format_html(
            '<a href="{0}" target="_blank" rel="noopener noreferrer" class="proof-link">'
            '<img src="{0}" alt="{1}" class="proof-thumbnail" loading="lazy" '
            'style="max-width:160px;max-height:160px;object-fit:contain;border:1px solid #ccc"></a>',
            url, f"{proof.kind} {proof.width}×{proof.height}",
        )


class CostInline(ReadOnlyInline):
    model = DeliveryCost

    fields = ("driver_payment", "platform_fee", "postgres_cost", "redis_cost", "api_calls_cost", "total_cost", "created_at")
    readonly_fields = fields


class RevenueInline(ReadOnlyInline):
    model = DeliveryRevenue

    fields = ("delivery_fee", "commission", "total_revenue", "created_at")
    readonly_fields = fields


class LateFilter(admin.SimpleListFilter):
    """In progress (assigned, picked up, in transit) with the delivery ETA already passed."""

    title = "late"
    parameter_name = "late"

    def lookups(self, request, model_admin):
        return [("yes", "Late (ETA passed)")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(
                status__in=(DeliveryStatus.ASSIGNED, DeliveryStatus.PICKED_UP, DeliveryStatus.IN_TRANSIT),
                eta_delivery_at__lt=timezone.now(),
            )
        return queryset


class GeofenceOverrideFilter(admin.SimpleListFilter):
    """Completed away from the drop-off on the driver's word (docs/dispatch.md, "Geofence")."""

    title = "away from drop-off"
    parameter_name = "geofence_override"

    def lookups(self, request, model_admin):
        return [("yes", "Completed away from the drop-off")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.exclude(geofence_override_reason="")
        return queryset


def timeline_names(rows) -> dict[str, str]:
    """Names of the people and drivers an audit trail mentions, by id (one query each)."""
    user_ids, driver_ids = set(), set()
    for row in rows:
        if row.actor_id:
            (driver_ids if row.actor_type == "driver" else user_ids).add(row.actor_id)
        for key in ("driverId", "previousDriverId"):
            if row.details.get(key):
                driver_ids.add(row.details[key])
        for key in ("assigneeId", "previousAssigneeId"):  # (support tickets' agents)
            if row.details.get(key):
                user_ids.add(row.details[key])
    names = {str(pk): bidi_isolated(name) for pk, name in Driver.objects.filter(pk__in=driver_ids).values_list("pk", "name")}
    for user in User.objects.filter(pk__in=user_ids).only("pk", "username", "first_name", "last_name"):
        names[str(user.pk)] = bidi_isolated(user.get_full_name() or user.username)
    return names


def actor_name(row, names) -> str:
    if row.actor_type == "system" or not row.actor_type:
        return "system"
    who = names.get(str(row.actor_id), "unknown")
    return {"admin": f"{who} (ops)", "driver": f"{who} (driver)", "support": f"{who} (support)",
            "integration": f"{who} (integration)"}.get(row.actor_type, who)


def _driver_name(driver_id) -> str:
    """A driver as the console's messages name them (their id only if they are gone)."""
    if driver_id is None:
        return "no driver"
    return bidi_isolated(Driver.objects.filter(pk=driver_id).values_list("name", flat=True).first() or str(driver_id))


def describe_ticket_action(d: dict, names) -> str:
    """A support ticket's audit row (`escalation.tickets`: the action in `details.action`)."""
    action = d.get("action") or "updated"
    if action == "taken":
        who = names.get(str(d.get("assigneeId")), "an agent")
        previous = names.get(str(d.get("previousAssigneeId")), "another agent") if d.get("previousAssigneeId") else None
        return f"Support ticket taken by {who}" + (f" (over from {previous})" if previous and d.get("previousAssigneeId") != d.get("assigneeId") else "")
    if action == "redispatched":
        found = f"offered to {names.get(str(d.get('driverId')), 'a driver')}" if d.get("driverId") else "nobody found"
        return f"Support redispatched within {d.get('searchRadiusKm', '?')} km: {found}"
    if action == "delivery_cancelled":
        return "Support cancelled the delivery" + (f": {d['reason']}" if d.get("reason") else "")
    text = "Comment on the support ticket" if action == "commented" else f"Support ticket {action.replace('_', ' ')}"
    resolution = d.get("resolution") or (d.get("changes") or {}).get("resolution")
    return text + (f": {resolution}" if resolution and action in ("resolved", "closed") else "")


def describe_event(row, names) -> str:
    """One audit row in words."""
    d = {k: bidi_isolated(v) if isinstance(v, str) else v for k, v in (row.details or {}).items()}  # (reasons, notes, names)
    driver = names.get(str(d.get("driverId")), "a driver") if d.get("driverId") else "a driver"
    reason = f": {d['reason']}" if d.get("reason") else ""
    text = {
        "created": f"Order received from {d.get('storeName', 'the store')}",
        "driver_offer_sent": f"Offered to {driver}",
        "driver_accepted": f"{driver} accepted" + (f" after {d['responseTimeMs'] / 1000:.1f} s" if d.get("responseTimeMs") else ""),
        "driver_rejected": f"{driver} declined{reason}",
        "offer_expired": f"The offer to {driver} expired unanswered",
        "offer_cancelled": f"The offer to {driver} was withdrawn{reason}",
        "driver_assigned": f"Assigned to {driver}",
        "assignment_started": f"Assignment to {driver} started",
        "assignment_reassigned": f"Taken from {names.get(str(d.get('previousDriverId')), 'the driver')}{reason}",
        "pickup_started": f"{driver} is heading to the store",
        "pickup_completed": f"{driver} picked up the order",
        "delivery_started": f"{driver} is on the way to the customer",
        "delivery_completed": "Delivered",
        "delivery_failed": f"Delivery failed{reason}",
        "delivery_cancelled": f"Cancelled (was {d.get('fromStatus', '?')}){reason}",
        "escalation_triggered": f"Escalated to level {d.get('level', '?')}{reason}",
        "escalation_critical": f"Critical escalation{reason}",
        "driver_candidates_found": "Candidate drivers found" + (f": {d['count']}" if d.get("count") is not None else ""),
        "geofence_override": f"{driver} completed it " + (
            f"{d['distanceMeters']:,} m from the drop-off" if d.get("distanceMeters") is not None else "with no recent location"
        ) + f" (limit {d.get('limitMeters', '?')} m){reason}",
        "support_ticket_updated": describe_ticket_action(d, names),
        "proof_added": f"{driver} added a {d.get('kind', 'proof')}" + (f": {d['note']}" if d.get("note") else ""),
    }.get(row.event_type)
    if text is None:
        text = row.get_event_type_display()
        extra = ", ".join(f"{k}: {v}" for k, v in d.items() if k not in ("driverId", "offerId", "assignmentId"))
        text += f" ({extra})" if extra else ""
    return text


def delivery_map_data(delivery: Delivery) -> dict:
    """Pickup, drop-off and, while known, the driver's latest position (its live one first)."""
    data = {
        "pickup": [delivery.pickup_location.y, delivery.pickup_location.x],
        "dropoff": [delivery.dropoff_location.y, delivery.dropoff_location.x],
        "driver": None,
    }
    assignment = Assignment.objects.filter(delivery=delivery).select_related("driver").order_by("-created_at").first()
    if assignment is not None and assignment.driver.location is not None:
        driver = assignment.driver
        fresh = positions_of([driver.pk]).get(str(driver.pk))
        lat, lon = (fresh.lat, fresh.lon) if fresh else (driver.location.y, driver.location.x)
        data["driver"] = {"name": driver.name, "position": [lat, lon], "active": assignment.status == "active"}
    return data


ASSIGN_RADIUS_KM = 15.0  # how far "assign to a driver" looks for available drivers


class AssignToDriverForm(forms.Form):
    driver = forms.ChoiceField(label="Driver (available, nearest first)")

    def __init__(self, *args, candidates=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["driver"].choices = [(pk, label) for pk, label in candidates]


def assign_candidates(delivery: Delivery) -> list[tuple[str, str]]:
    """Available drivers with a fresh fix near the pickup, nearest first, as (id, "name · 1.2 km").
    A driver holding a pending offer is left out: an offer to them is always refused (one pending
    offer a driver), and the list put them first, at 0.0 km, waiting at this very store. So is
    one whose login is deactivated (freed from a delivery it kept, available until the
    stale-driver job's next run): the offer is refused too."""
    pickup = delivery.pickup_location
    nearby = drivers_available_near(lat=pickup.y, lon=pickup.x, radius_km=ASSIGN_RADIUS_KM, limit=25, positions=False)
    ids = [n.driver_id for n in nearby]
    names = {str(pk): name for pk, name in Driver.objects.filter(pk__in=ids, user__is_active=True).values_list("pk", "name")}
    offered = {str(pk) for pk in DriverOffer.objects.filter(driver_id__in=ids, status=OfferStatus.PENDING).values_list("driver_id", flat=True)}
    return [(n.driver_id, f"{bidi_isolated(names[n.driver_id])} · {n.distance_km:.1f} km") for n in nearby
            if n.driver_id in names and n.driver_id not in offered]


class DeliveryExport(ExportResource):
    """The delivery list as CSV/XLSX (times in UTC, ISO 8601; money in the platform currency)."""

    zone = export_fields.Field(attribute="zone__name", column_name="zone")
    created_by = export_fields.Field(attribute="created_by__username", column_name="created_by")

    class Meta:
        model = Delivery
        fields = (
            "id", "seller_order_id", "store_name", "status", "zone", "created_by", "delivery_fee",
            "created_at", "ready_at", "assigned_at", "picked_up_at", "delivered_at", "failed_at", "cancelled_at",
            "eta_delivery_at", "failure_reason", "cancellation_reason",
        )
        export_order = fields


@admin.register(Delivery)
class DeliveryAdmin(LiveListMixin, ConsoleExportMixin, ChangedFieldsOnlyAdmin):
    live_events = ("delivery_created", "delivery_status_changed", "delivery_cancelled")
    resource_classes = [DeliveryExport]
    list_display = ("seller_order_id", "store_name", "status", "zone", "created_by", "ready_at", "assigned_at", "delivered_at")
    list_filter = ("status", LateFilter, recent_filter("assigned_at", "assigned"), GeofenceOverrideFilter, "zone")
    search_fields = ("seller_order_id", "store_name", "customer_name", "id")
    list_select_related = ("created_by", "zone")
    date_hierarchy = "created_at"
    inlines = [OfferInline, AssignmentInline, ProofInline, CostInline, RevenueInline, CustomerMessageInline,
               CustomerReplyInline]
    actions = ["dispatch_now", "assign_to_driver", "reassign_deliveries", "cancel_deliveries"]

    change_form_template = "admin/dispatch/delivery/change_form.html"

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in Delivery._meta.fields] + ["customer_tracking_link", "timeline"]

    GEOFENCE_FIELDS = ("geofence_override_reason", "geofence_override_distance_m")

    def get_fieldsets(self, request, obj=None):
        fields = [f.name for f in Delivery._meta.fields if f.name not in self.GEOFENCE_FIELDS]
        # Completed away from the drop-off on the driver's word: in sight, not among the times.
        flagged = [("Completed away from the drop-off", {"fields": list(self.GEOFENCE_FIELDS)})] if (
            obj is not None and obj.geofence_override_reason) else []
        return [
            (None, {"fields": fields[:12]}),
            *flagged,
            ("Timeline", {"fields": ["timeline"]}),
            ("Customer tracking", {"fields": ["customer_tracking_link"]}),
            ("Status, times and ETA", {"fields": fields[12:], "classes": ["collapse"]}),
        ]

    @admin.display(description="tracking link")
    def customer_tracking_link(self, delivery):
        return format_html('<a href="{0}" target="_blank" rel="noopener noreferrer" id="tracking-link">{0}</a>', delivery.tracking_url)

    @admin.display(description="what happened")
    def timeline(self, delivery):
        rows = list(DeliveryAuditLog.objects.filter(delivery=delivery).order_by("timestamp", "seq"))
        names = timeline_names(rows)
        return format_html(
            '<table id="delivery-timeline"><thead><tr><th>time ({})</th><th>who</th><th>what</th></tr></thead><tbody>{}</tbody></table>',
            timezone.get_current_timezone_name(),
            format_html_join("", "<tr data-event='{}'><td><time datetime='{}'>{}</time></td><td>{}</td><td>{}</td></tr>", (
                (row.event_type, row.timestamp.isoformat(), timezone.localtime(row.timestamp).strftime("%Y-%m-%d %H:%M:%S %Z"),
                 actor_name(row, names), describe_event(row, names))
                for row in rows
            )) or format_html("<tr><td colspan='3'>{}</td></tr>", "Nothing recorded yet."),
        )

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        if obj is not None:
            context["delivery_map"] = delivery_map_data(obj)
            context["tile_url"] = settings.OPS_MAP_TILE_URL
        # Nothing here is editable (changes go through the actions): no Save buttons; the
        # actions this delivery takes now are buttons on its page (the live map links here).
        context.update(show_save=False, show_save_and_continue=False, show_save_and_add_another=False)
        if obj is not None and self.has_change_permission(request):
            context["delivery_actions"] = self.page_actions(obj)
        return super().render_change_form(request, context, add=add, change=change, form_url=form_url, obj=obj)

    @staticmethod
    def page_actions(delivery) -> list[tuple[str, str]]:
        """(action, button) for the list actions this delivery takes in its status, each run as
        from the list with this one delivery selected (the ones asking for a reason or a driver
        show their form first)."""
        if delivery.status == DeliveryStatus.READY:
            actions = [("dispatch_now", "Dispatch now"), ("assign_to_driver", "Assign to a driver…")]
        elif delivery.status == DeliveryStatus.ASSIGNED:
            actions = [("reassign_deliveries", "Reassign…")]
        else:
            actions = []
        return actions + [("cancel_deliveries", "Cancel…")] if delivery.is_open else actions

    def has_add_permission(self, request):
        return False  # deliveries come from sellers through the API

    def has_delete_permission(self, request, obj=None):
        return False  # cancel instead: the audit trail keeps the delivery

    @admin.action(description="Dispatch selected ready deliveries now", permissions=["change"])
    def dispatch_now(self, request, queryset):

        def dispatch(delivery):
            result = delivery_dispatch(delivery_id=delivery.pk, actor=Actor.for_user(request.user), strict=True)
            text = f"offered to {_driver_name(result.offer.driver_id)}" if result.offer else f"unassigned ({result.failure_reason})"
            self.message_user(request, f"{delivery.seller_order_id}: {text}", messages.INFO)

        run_for_each(self, request, queryset, dispatch, label=lambda d: d.seller_order_id)

    @admin.action(description="Assign to a driver (offer it to a nearby available driver)…", permissions=["change"])
    def assign_to_driver(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Choose exactly one delivery to assign.", messages.WARNING)
            return None
        delivery = queryset.get()
        if delivery.status != DeliveryStatus.READY:  # (the page listed drivers, and only the submit said no)
            self.message_user(request, f"{delivery.seller_order_id}: Delivery is {delivery.status}; only a ready "
                              "delivery can be offered.", messages.WARNING)
            return None
        candidates = assign_candidates(delivery)
        applying = "apply" in request.POST
        form = AssignToDriverForm(request.POST if applying else None, candidates=candidates)
        if applying and form.is_valid():
            driver_id = form.cleaned_data["driver"]
            results = run_for_each(
                self, request, queryset,
                lambda d: offer_create(delivery_id=d.pk, driver_id=driver_id, actor=Actor.for_user(request.user)),
                label=lambda d: d.seller_order_id,
            )
            if results:
                name = _driver_name(driver_id)  # (the choice's label carries the distance: "· 0.0 km")
                self.message_user(
                    request, f"{delivery.seller_order_id}: offered to {name}; the driver has until "
                    f"{timezone.localtime(results[0].expires_at):%H:%M:%S %Z} to accept.", messages.SUCCESS,
                )
            return None
        return TemplateResponse(request, "admin/dispatch/delivery/assign_to_driver.html", {
            **self.admin_site.each_context(request), "title": f"Assign {delivery.seller_order_id} to a driver",
            "form": form, "delivery": delivery, "candidates": candidates, "radius_km": ASSIGN_RADIUS_KM,
            "opts": self.model._meta,
        })

    @admin.action(description="Reassign selected deliveries to another driver (asks for a reason)…", permissions=["change"])
    def reassign_deliveries(self, request, queryset):
        def run(form):
            reason = form.cleaned_data["reason"]

            def reassign(delivery):
                previous, result = deliveries.delivery_reassign(delivery_id=delivery.pk, reason=reason, actor=Actor.for_user(request.user))
                self.message_user(request, f"{delivery.seller_order_id}: taken from {_driver_name(previous)}, {result.text()}", messages.INFO)
                return result

            run_for_each(self, request, queryset, reassign, label=lambda d: d.seller_order_id)

        return confirm_then(
            self, request, queryset, action="reassign_deliveries", title="Reassign deliveries",
            explanation="Each delivery is taken from its driver (who becomes available again) and offered to the next candidate.",
            button="Yes, reassign", run=run, describe=lambda d: f"{d.seller_order_id} · {bidi_isolated(d.store_name)} ({d.status})",
        )

    @admin.action(description="Cancel selected deliveries (asks for a reason)…", permissions=["change"])
    def cancel_deliveries(self, request, queryset):
        def run(form):
            reason = form.cleaned_data["reason"]
            run_for_each(
                self, request, queryset,
                lambda d: deliveries.delivery_cancel(delivery_id=d.pk, reason=reason, actor=Actor.for_user(request.user)),
                label=lambda d: d.seller_order_id,
                done=lambda results: f"Cancelled {len(results)} {'delivery' if len(results) == 1 else 'deliveries'}.",
            )

        return confirm_then(
            self, request, queryset, action="cancel_deliveries", title="Cancel deliveries",
            explanation="Cancelling withdraws any pending offer, frees the driver and closes the unassigned record. It cannot be undone.",
            button="Yes, cancel", run=run, describe=lambda d: f"{d.seller_order_id} · {bidi_isolated(d.store_name)} ({d.status})",
        )


@admin.register(Assignment)
class AssignmentAdmin(ChangedFieldsOnlyAdmin):
    list_display = ("delivery", "driver", "status", "created_at", "ended_at")
    list_filter = ("status",)
    search_fields = ("delivery__seller_order_id", "driver__name", "id")
    list_select_related = ("delivery", "driver")
    readonly_fields = ("id", "delivery", "driver", "status", "created_at", "ended_at", "end_reason")

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
