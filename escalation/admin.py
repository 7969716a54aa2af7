"""Ops console for unassigned orders and support tickets. Records and tickets are written by
the services only; the escalate action calls the same workflow as the API."""
import uuid

from django import forms
from django.contrib import admin
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from common.actors import Actor
from common.admin import ChangedFieldsOnlyAdmin, LiveListMixin, run_for_each
from common.admin_confirm import selection, selection_holds, too_many
from common.exceptions import Conflict
from escalation import tickets
from escalation.models import (
    ACTIVE_TICKET_STATUSES,
    MAX_ESCALATION_LEVEL,
    SupportTicket,
    TicketComment,
    UnassignedOrder,
)
from workflows import escalations


class EscalateForm(forms.Form):
    level = forms.TypedChoiceField(coerce=int, choices=[(n, f"Level {n}") for n in range(1, MAX_ESCALATION_LEVEL + 1)])
    reason = forms.CharField(max_length=500)
    notes = forms.CharField(required=False, max_length=5000, widget=forms.Textarea(attrs={"rows": 3}))


class OpenFilter(admin.SimpleListFilter):
    """Open records by default, as `GET /v2/admin/unassigned-orders` (resolved and cancelled
    ones on asking: "Resolved" or "All")."""

    title = "open"
    parameter_name = "open"

    def lookups(self, request, model_admin):
        return [("yes", "Open"), ("no", "Resolved"), ("all", "All")]

    def value(self):
        return super().value() or "yes"

    def choices(self, changelist):
        # Django's own "All" link drops the parameter, which here means open: list ours only.
        for lookup, title in self.lookup_choices:
            yield {
                "selected": self.value() == lookup,
                "query_string": changelist.get_query_string({self.parameter_name: lookup}),
                "display": title,
            }

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(resolved_at__isnull=True)
        if self.value() == "no":
            return queryset.filter(resolved_at__isnull=False)
        return queryset


class ActiveTicketFilter(admin.SimpleListFilter):
    title = "active"
    parameter_name = "active"

    def lookups(self, request, model_admin):
        return [("yes", "Open or in progress"), ("no", "Resolved or closed")]

    def queryset(self, request, queryset):
        if self.value() == "yes":
            return queryset.filter(status__in=ACTIVE_TICKET_STATUSES)
        if self.value() == "no":
            return queryset.exclude(status__in=ACTIVE_TICKET_STATUSES)
        return queryset


class ReadOnlyAdmin(ChangedFieldsOnlyAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        # the list's actions need it; a record's own page has nothing to save (every field
        # read-only: its Save said "changed successfully" and wrote "No fields changed.")
        return obj is None and super().has_change_permission(request)

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]


@admin.register(UnassignedOrder)
class UnassignedOrderAdmin(LiveListMixin, ReadOnlyAdmin):
    # (a record comes with a dispatch that found nobody: after a creation, an offer's end; it goes
    # with an acceptance or a cancel)
    live_events = ("delivery_created", "offer_accepted", "offer_rejected", "offer_expired", "offer_cancelled",
                   "delivery_cancelled", "unassigned_order_escalated")
    list_display = (
        "seller_order_id", "failure_reason", "escalation_level", "escalation_status", "attempt_count",
        "first_attempt_at", "last_attempt_at", "ticket", "escalated_by", "resolved_at",
    )
    list_filter = (OpenFilter, "escalation_level", "failure_reason", "escalation_status")
    search_fields = ("seller_order_id", "delivery__id", "support_ticket_id")
    list_select_related = ("escalated_by",)
    date_hierarchy = "first_attempt_at"
    actions = ["escalate"]

    @admin.display(description="support ticket", ordering="support_ticket_id")
    def ticket(self, record):
        """A link to the ticket when it lives here (the local backend); the external id otherwise."""
        if not record.support_ticket_id:
            return "—"
        try:
            pk = uuid.UUID(record.support_ticket_id)
        except ValueError:
            return record.support_ticket_id
        return format_html('<a href="{}">{}</a>', reverse("admin:escalation_supportticket_change", args=[pk]), str(pk)[:8])

    @admin.action(description="Escalate to a level (with a reason)…", permissions=["change"])
    def escalate(self, request, queryset):
        form = EscalateForm(request.POST if "apply" in request.POST else None)
        if "apply" not in request.POST and too_many(request, queryset):
            return None
        if "apply" in request.POST and form.is_valid() and selection_holds(request, queryset):
            v = form.cleaned_data
            run_for_each(
                self, request, queryset,
                lambda record: escalations.unassigned_escalate(
                    record_id=record.pk, level=v["level"], reason=v["reason"], notes=v["notes"],
                    actor=Actor.for_user(request.user), user=request.user,
                ),
                label=lambda record: record.seller_order_id,
                done=lambda r: f"Escalated {len(r)} unassigned order{'s' if len(r) != 1 else ''}.",
            )
            return None
        return TemplateResponse(
            request, "admin/escalation/unassignedorder/escalate.html",
            {**self.admin_site.each_context(request), "form": form, "title": "Escalate", "selection": selection(
                request, queryset, lambda r: f"{r.seller_order_id} (level {r.escalation_level}, {r.escalation_status})")},
        )


class TicketCommentInline(admin.TabularInline):
    model = TicketComment
    extra = 0
    can_delete = False
    fields = ("created_at", "kind", "author", "body")
    readonly_fields = fields
    ordering = ("created_at", "seq")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(SupportTicket)
class SupportTicketAdmin(LiveListMixin, ReadOnlyAdmin):
    live_events = ("support_ticket_created", "support_ticket_updated")
    list_display = ("title", "priority", "status", "type", "assignee", "created_at", "updated_at")
    list_filter = (ActiveTicketFilter, "status", "priority", "type")
    search_fields = ("title", "delivery__seller_order_id", "id")
    list_select_related = ("assignee", "delivery")
    date_hierarchy = "created_at"
    inlines = [TicketCommentInline]
    actions = ["take"]

    @admin.action(description="Take selected tickets (assign to me)", permissions=["change"])
    def take(self, request, queryset):
        """Takes the selected tickets nobody holds (or the user does); one another agent holds is
        left to them (it may have been taken after the list was shown): taking it over is a
        deliberate act on its support page."""
        def take_one(ticket):
            try:
                return tickets.ticket_take(ticket_id=ticket.pk, user=request.user, actor=Actor.for_user(request.user),
                                           seen_assignee_id=None)
            except tickets.TicketHeld as held:
                raise Conflict(f"{held.holder} holds this ticket; take it over on its support page.") from None

        run_for_each(
            self, request, queryset, take_one,
            label=lambda ticket: ticket.title,
            done=lambda taken: f"You have taken {len(taken)} ticket{'s' if len(taken) != 1 else ''}.",
        )
