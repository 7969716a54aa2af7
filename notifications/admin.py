"""Ops console for webhooks: endpoints (change, switch off/on, replay the failed events since a
time), every message with its attempt log (replay one or a selection), the outbox. Rows are
written by the services only; the actions call the same services as the API."""
from __future__ import annotations

import logging
import re
import uuid

from django import forms
from django.contrib import admin, messages
from django.core.validators import validate_email
from django.db.models import Q
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from common.admin import LiveListMixin, ReadOnlyInline, json_block, recent_filter, run_for_each
from common.admin_confirm import selection, selection_holds, too_many
from common.exceptions import InvalidInput, NotFound
from notifications import customers, services
from notifications.models import (
    CustomerMessage, CustomerOptOut, CustomerReply, OptOutSource, OutboxEvent, WebhookAttempt, WebhookEndpoint,
    WebhookMessage,
)

logger = logging.getLogger(__name__)

RECENT_ATTEMPTS = 20


# A receiver logs the `webhook-id` header, `msg_` and the event's id in hex; the search's
# icontains reads the UUID column as text with hyphens, so that never matched anything.
WEBHOOK_ID = re.compile(r"msg_([0-9a-f]{32})", re.IGNORECASE)
# what may be part of an id read as text (else a term can only match an endpoint's URL)
ID_PART = re.compile(r"[0-9a-f-]+", re.IGNORECASE)


class _WebhookIdSearch:
    """The searches ops make, by indexed paths: a `webhook-id` lists that event's rows only; a
    whole UUID, a delivery's (or an event's) rows; a word that cannot be part of an id (a URL,
    a host), its endpoints' rows. Anything else (part of an id, a seller order id, several
    words): the search fields, which read every row's text (the messages and attempts grow by
    millions; before, a whole id or URL did so too)."""

    event_id_path = "event__event_id"
    delivery_path = "event__delivery_id"
    endpoint_path: str | None = "endpoint_id"  # None: rows with no endpoint (the outbox)
    seller_order_path: str | None = None  # where the list's search fields take a seller order id

    def get_search_results(self, request, queryset, search_term):
        term = search_term.strip()
        match = WEBHOOK_ID.fullmatch(term)
        if match:
            return queryset.filter(**{self.event_id_path: uuid.UUID(match[1])}), False
        try:
            as_uuid = uuid.UUID(term)
        except ValueError:
            as_uuid = None
        if as_uuid is not None:
            found = Q(**{self.delivery_path: as_uuid}) | Q(**{self.event_id_path: as_uuid})
            if self.seller_order_path:  # (a seller's order id may look like a UUID)
                found |= Q(**{self.seller_order_path: term})
            return queryset.filter(found), False
        if self.endpoint_path and term and not ID_PART.fullmatch(term) and not any(c.isspace() for c in term):
            endpoints = WebhookEndpoint.objects.filter(url__icontains=term).values("pk")  # (a few rows)
            return queryset.filter(**{f"{self.endpoint_path}__in": endpoints}), False
        return super().get_search_results(request, queryset, search_term)


class _ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return request.method in ("GET", "HEAD") and super().has_change_permission(request, obj)

    def has_delete_permission(self, request, obj=None):
        return False


class ReplaySinceForm(forms.Form):
    since = forms.SplitDateTimeField(help_text="Events written at or after this time (the console's time zone).")


class WebhookEndpointForm(forms.ModelForm):
    url = forms.URLField(max_length=2000, assume_scheme="https")

    class Meta:
        model = WebhookEndpoint
        fields = ("url", "description", "events", "active")

    def clean_url(self):
        return _clean(services.endpoint_url_clean, self.cleaned_data["url"])

    def clean_events(self):
        return _clean(services.endpoint_events_clean, self.cleaned_data["events"])


def _clean(check, value):
    """A service's check as a form field's: its InvalidInput becomes the field's error."""
    try:
        return check(value)
    except InvalidInput as exc:
        raise forms.ValidationError([m for msgs in exc.details.values() for m in msgs]) from exc


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    form = WebhookEndpointForm
    list_display = ("url", "owner", "active", "all_deliveries", "events_list", "failing_since", "disabled_at", "created_at")
    list_filter = ("active", "all_deliveries")
    search_fields = ("url", "description", "owner__username", "id")
    list_select_related = ("owner",)
    readonly_fields = ("id", "owner", "all_deliveries", "failing_since", "disabled_at", "disabled_reason", "drop_warned_at",
                       "previous_secret_expires_at", "created_at", "updated_at", "recent_attempts")
    actions = ["replay_failed_since", "switch_on", "switch_off"]

    def has_add_permission(self, request):
        return False  # created through the API, which shows the secret once

    @admin.display(description="events")
    def events_list(self, endpoint):
        return ", ".join(endpoint.events)

    @admin.display(description=f"last {RECENT_ATTEMPTS} attempts")
    def recent_attempts(self, endpoint):
        attempts = WebhookAttempt.objects.filter(endpoint=endpoint).select_related("message__event")[:RECENT_ATTEMPTS]
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td><td>{}</td></tr>",
            ((a.attempted_at, a.message.event.webhook_id, a.message.event.type, a.status_code or "—", a.duration_ms,
              a.error or "", a.next_retry_at or "") for a in attempts),
        )
        link = reverse("admin:notifications_webhookattempt_changelist") + f"?endpoint__id__exact={endpoint.pk}"
        return format_html(
            '<table><tr><th>at</th><th>webhook-id</th><th>type</th><th>HTTP</th><th>took</th><th>error</th>'
            '<th>next retry</th></tr>{}</table><p><a href="{}">All attempts</a></p>', rows, link,
        )

    def save_model(self, request, obj, form, change):
        v = form.cleaned_data
        # `active` only when it was changed: true on a failing endpoint clears its failure
        # record and retries now, which an edit of its description must not do
        services.endpoint_update(endpoint_id=obj.pk, url=v["url"], events=v["events"], description=v["description"],
                                 active=v["active"] if "active" in form.changed_data else None)

    def get_deleted_objects(self, objs, request):
        """What the confirmation page lists: the endpoints, and as counts what goes with them (their
        messages with their attempts, and their test events), as the API's DELETE does. Django's
        own listing asked for the delete permission on those rows, which their read-only pages
        never give, so an endpoint that had ever been sent anything could not be deleted here;
        and it would have listed every one of an endpoint's messages."""
        endpoints = list(objs)
        ids = [endpoint.pk for endpoint in endpoints]
        model_count = {WebhookEndpoint._meta.verbose_name_plural: len(endpoints)}
        for model, rows in ((WebhookMessage, WebhookMessage.objects.filter(endpoint_id__in=ids)),
                            (WebhookAttempt, WebhookAttempt.objects.filter(endpoint_id__in=ids)),
                            (OutboxEvent, OutboxEvent.objects.filter(endpoint_id__in=ids))):
            if count := rows.count():
                model_count[model._meta.verbose_name_plural] = count
        listed = [f"{WebhookEndpoint._meta.verbose_name.capitalize()}: {endpoint}" for endpoint in endpoints]
        return listed, model_count, set(), []

    def delete_queryset(self, request, queryset):
        """"Delete selected" through the service too (its locks), one endpoint at a time."""
        for endpoint_id in queryset.values_list("pk", flat=True):
            self.delete_model(request, WebhookEndpoint(pk=endpoint_id))

    def delete_model(self, request, obj):
        try:
            services.endpoint_delete(endpoint_id=obj.pk)
        except NotFound:  # deleted meanwhile (the API, another tab): what was asked is done
            logger.info("webhook endpoint %s was already deleted", obj.pk)

    @admin.action(description="Replay failed events since…", permissions=["change"])
    def replay_failed_since(self, request, queryset):
        form = ReplaySinceForm(request.POST if "apply" in request.POST else None)
        if "apply" not in request.POST and too_many(request, queryset):
            return None
        if "apply" in request.POST and form.is_valid() and selection_holds(request, queryset):
            since = form.cleaned_data["since"]
            counts = [services.endpoint_replay_failed(endpoint_id=e.pk, since=since) for e in queryset.order_by("pk")]
            self.message_user(request, f"Queued {sum(counts)} failed event(s) to send again.", messages.SUCCESS)
            return None
        return TemplateResponse(
            request, "admin/notifications/webhookendpoint/replay.html",
            {**self.admin_site.each_context(request), "form": form, "title": "Replay failed events",
             "selection": selection(request, queryset, lambda e: e.url)},
        )

    @admin.action(description="Switch on (and send what waited)", permissions=["change"])
    def switch_on(self, request, queryset):
        run_for_each(self, request, queryset, lambda e: services.endpoint_update(endpoint_id=e.pk, active=True),
                     done=lambda r: f"Switched on {len(r)} endpoint(s).")

    @admin.action(description="Switch off", permissions=["change"])
    def switch_off(self, request, queryset):
        run_for_each(self, request, queryset, lambda e: services.endpoint_update(endpoint_id=e.pk, active=False),
                     done=lambda r: f"Switched off {len(r)} endpoint(s).")


class AttemptInline(ReadOnlyInline):
    model = WebhookAttempt
    fields = ("attempted_at", "status_code", "duration_ms", "error", "next_retry_at")
    readonly_fields = fields
    ordering = ("-attempted_at", "-id")


@admin.register(WebhookMessage)
class WebhookMessageAdmin(_WebhookIdSearch, _ReadOnly):
    list_display = ("webhook_id", "event_type", "endpoint", "delivery_id", "status", "attempt_count", "next_attempt_at",
                    "last_status_code", "last_error", "created_at")
    list_filter = ("status", "event__type", "endpoint")
    search_fields = ("delivery_id", "event__event_id", "endpoint__url")
    search_help_text = "A webhook-id (msg_…), a delivery id or an endpoint URL."
    list_select_related = ("event", "endpoint")
    date_hierarchy = "created_at"
    readonly_fields = ("event", "endpoint", "delivery_id", "status", "attempt_count", "next_attempt_at",
                       "window_started_at", "leased_until", "last_status_code", "last_error", "delivered_at",
                       "created_at", "payload")
    fields = readonly_fields
    inlines = [AttemptInline]
    actions = ["replay"]

    @admin.display(description="webhook-id")
    def webhook_id(self, message):
        return message.event.webhook_id

    @admin.display(description="type", ordering="event__type")
    def event_type(self, message):
        return message.event.type

    @admin.display(description="payload")
    def payload(self, message):
        return json_block(message.event.payload)

    def has_change_permission(self, request, obj=None):
        # read-only pages, but the replay action needs the change permission (on the list only:
        # a POST of a message's page would save the row as the page read it, over the sender's)
        if obj is not None and request.method not in ("GET", "HEAD"):
            return False
        return admin.ModelAdmin.has_change_permission(self, request, obj)

    def get_readonly_fields(self, request, obj=None):
        return self.readonly_fields

    @admin.action(description="Replay (send again with the same webhook-id)", permissions=["change"])
    def replay(self, request, queryset):
        if too_many(request, queryset):
            return
        count = services.messages_replay(message_ids=list(queryset.values_list("pk", flat=True)))
        self.message_user(request, f"Queued {count} message(s) to send again.", messages.SUCCESS)


@admin.register(WebhookAttempt)
class WebhookAttemptAdmin(_WebhookIdSearch, _ReadOnly):
    list_display = ("attempted_at", "endpoint", "message", "status_code", "duration_ms", "error", "next_retry_at")
    event_id_path = "message__event__event_id"
    delivery_path = "message__event__delivery_id"
    search_fields = ("message__delivery_id", "endpoint__url")
    search_help_text = "A webhook-id (msg_…), a delivery id or an endpoint URL."
    list_filter = ("endpoint", "status_code")
    list_select_related = ("endpoint", "message__event")
    date_hierarchy = "attempted_at"


@admin.register(OutboxEvent)
class OutboxEventAdmin(_WebhookIdSearch, _ReadOnly):
    list_display = ("seq", "type", "delivery_id", "owner", "created_at", "fanned_out_at")
    list_filter = ("type",)
    search_fields = ("delivery__id", "delivery__seller_order_id", "event_id")
    search_help_text = "A webhook-id (msg_…), a delivery id or a seller order id."
    event_id_path = "event_id"
    delivery_path = "delivery_id"
    endpoint_path = None
    seller_order_path = "delivery__seller_order_id"
    list_select_related = ("owner",)
    date_hierarchy = "created_at"
    fields = ("seq", "event_id", "type", "delivery", "owner", "endpoint", "payload_shown", "created_at", "fanned_out_at")
    readonly_fields = fields

    @admin.display(description="payload")
    def payload_shown(self, event):
        return json_block(event.payload)


class CustomerMessageInline(ReadOnlyInline):
    """On the delivery's admin page: every message its customer got (or did not)."""

    model = CustomerMessage
    fields = ("created_at", "kind", "channel", "recipient", "language", "status", "template", "provider_id", "error",
              "attempts", "sent_at")
    readonly_fields = fields
    ordering = ("created_at",)
    verbose_name_plural = "customer messages"


class CustomerReplyInline(ReadOnlyInline):
    """On the delivery's admin page: what its customer texted back."""

    model = CustomerReply
    fields = ("received_at", "channel", "sender", "body")
    readonly_fields = fields
    ordering = ("received_at",)
    verbose_name_plural = "customer replies"


@admin.register(CustomerReply)
class CustomerReplyAdmin(LiveListMixin, _ReadOnly):
    """Customers' texts back, newest first; the bar counts new ones while the list is open."""

    live_events = ("customer_replied",)
    list_display = ("received_at", "delivery", "channel", "sender", "body")
    list_filter = ("channel", recent_filter("received_at", "received"))
    search_fields = ("delivery__seller_order_id", "sender", "body")
    list_select_related = ("delivery",)
    date_hierarchy = "received_at"


@admin.register(CustomerMessage)
class CustomerMessageAdmin(_ReadOnly):
    list_display = ("created_at", "delivery", "kind", "channel", "recipient", "status", "provider_id", "error", "sent_at")
    list_filter = ("status", "kind", "channel")
    search_fields = ("delivery__seller_order_id", "recipient", "provider_id")
    list_select_related = ("delivery",)
    date_hierarchy = "created_at"


class CustomerOptOutForm(forms.ModelForm):
    """A valid number (stored in E.164) or address (in lower case), as messages are matched: a
    typo was stored as typed and matched nothing, and one written another way than the row
    there was passed the unique check and read "added"."""

    class Meta:
        model = CustomerOptOut
        fields = ("channel", "recipient")

    def clean(self):
        data = super().clean()
        channel, recipient = data.get("channel"), (data.get("recipient") or "").strip()
        if not channel or not recipient:
            return data
        if channel == "sms" and customers.sms_number(recipient) is None:
            raise forms.ValidationError({"recipient": "Not a valid phone number (give it with its country code, +…)."})
        if channel == "email":
            try:
                validate_email(recipient)
            except forms.ValidationError:
                raise forms.ValidationError({"recipient": "Not a valid e-mail address."})
        data["recipient"] = customers.opt_out_key(channel, recipient)
        self.instance.recipient = data["recipient"]
        return data


@admin.register(CustomerOptOut)
class CustomerOptOutAdmin(admin.ModelAdmin):
    """Who asked for no more messages. Ops add one for a customer who asked by phone (its
    pending messages are skipped); a superuser deletes one to send again (the customer asked
    to be messaged again)."""

    form = CustomerOptOutForm
    list_display = ("created_at", "channel", "recipient", "source")
    list_filter = ("channel", "source")
    search_fields = ("recipient",)
    date_hierarchy = "created_at"

    def has_change_permission(self, request, obj=None):
        return obj is None and super().has_change_permission(request, obj)  # add or delete; never rewritten

    def save_model(self, request, obj, form, change):
        made = customers.customer_opt_out(channel=obj.channel, recipient=obj.recipient, source=OptOutSource.OPS)
        obj.pk, obj.source, obj.created_at = made.pk, made.source, made.created_at  # (the console's message names it)
