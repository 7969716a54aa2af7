"""Webhooks to merchants: their endpoints, the transactional outbox of delivery events, one
message per (event, endpoint) with its retry state, and the log of every attempt."""
from __future__ import annotations

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q

# The webhook event types a merchant can subscribe to ("*": all of them).
WEBHOOK_EVENT_TYPES = (
    "delivery.created",
    "delivery.assigned",
    "delivery.status_changed",
    "delivery.eta_updated",
    "delivery.unassigned",
    "delivery.escalated",
    "delivery.proof_added",
)
TEST_EVENT_TYPE = "webhook.test"
ALL_EVENTS = "*"


class WebhookEndpoint(models.Model):
    """A URL that receives signed events. An integration's endpoint gets the events of its own
    deliveries; an endpoint created by ops (`all_deliveries`) gets every delivery's."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="webhook_endpoints")
    all_deliveries = models.BooleanField(default=False, help_text="Receives the events of every delivery (ops).")
    url = models.URLField(max_length=2000)
    description = models.CharField(max_length=500, blank=True, default="")
    events = ArrayField(models.CharField(max_length=64), default=list)
    active = models.BooleanField(default=True)
    secret = models.CharField(max_length=100, editable=False)
    previous_secret = models.CharField(max_length=100, blank=True, default="", editable=False)
    previous_secret_expires_at = models.DateTimeField(null=True, blank=True)
    failing_since = models.DateTimeField(null=True, blank=True)
    disabled_at = models.DateTimeField(null=True, blank=True)
    disabled_reason = models.CharField(max_length=200, blank=True, default="")
    drop_warned_at = models.DateTimeField(
        null=True, blank=True, help_text="When ops were last told that this switched-off endpoint's waiting events "
        "are about to be dropped (messages queued or replayed later are warned about again).")
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "created_at"], name="webhook_endpoint_owner_idx")]

    def __str__(self) -> str:
        return self.url

    def subscribes_to(self, event_type: str) -> bool:
        return ALL_EVENTS in self.events or event_type in self.events


class OutboxEvent(models.Model):
    """One delivery event, written in the transaction of the change that caused it. `seq`
    orders the events (per delivery, the order of the changes: they hold the delivery's row
    lock). `fanned_out_at`: a message was made for each endpoint that wants it."""

    seq = models.BigAutoField(primary_key=True)
    event_id = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    type = models.CharField(max_length=64)
    delivery = models.ForeignKey("dispatch.Delivery", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.CASCADE, related_name="+")
    # A test event is for one endpoint only.
    endpoint = models.ForeignKey(WebhookEndpoint, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    payload = models.JSONField()
    created_at = models.DateTimeField()
    fanned_out_at = models.DateTimeField(null=True, blank=True)
    # Written by a one-statement change (notifications.outbox.outbox_row_sql): the delivery's
    # row as that statement left it and its latest assignment; `payload.data` holds the change
    # alone until the worker renders the delivery from this (before fan-out) and clears it.
    delivery_row = models.JSONField(null=True, blank=True, editable=False)

    class Meta:
        indexes = [
            models.Index(fields=["seq"], name="outbox_unfanned_idx", condition=Q(fanned_out_at__isnull=True)),
            # a delivery's events still waiting for fan-out: the webhook claim asks, for each message
            # it looks at, whether an earlier one of its delivery is among them (services.SENDABLE_SQL);
            # through outbox_unfanned_idx that walked the whole backlog for every message
            models.Index(fields=["delivery", "seq"], name="outbox_unfanned_delivery_idx",
                         condition=Q(fanned_out_at__isnull=True)),
            models.Index(fields=["created_at"], name="outbox_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.webhook_id}"

    @property
    def webhook_id(self) -> str:
        return f"msg_{self.event_id.hex}"


class MessageStatus(models.TextChoices):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class WebhookMessage(models.Model):
    """One event for one endpoint: sent until it is delivered, stopped by the receiver (a 4xx
    other than 408/429) or its retry window passes. Per (endpoint, delivery) a message waits
    for the earlier pending ones: the receiver gets each delivery's events in order."""

    id = models.BigAutoField(primary_key=True)
    event = models.ForeignKey(OutboxEvent, on_delete=models.CASCADE, related_name="messages")
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="messages")
    delivery_id = models.UUIDField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=MessageStatus.choices, default=MessageStatus.PENDING)
    attempt_count = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    window_started_at = models.DateTimeField(help_text="Retries go on for the retry window from here (a replay restarts it).")
    leased_until = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True, default="")
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["event", "endpoint"], name="webhook_message_once_per_endpoint")]
        indexes = [
            models.Index(fields=["next_attempt_at"], name="webhook_message_due_idx", condition=Q(status="pending")),
            # a delivery's messages to one endpoint, in the order of their events
            models.Index(fields=["endpoint", "delivery_id", "event"], name="webhook_message_chain_idx", condition=Q(status="pending")),
            # an endpoint's pending messages by due time, then event: the claim reads each
            # endpoint's due ones in the order they fell due (notifications.services._CLAIM_SQL)
            models.Index(fields=["endpoint", "next_attempt_at", "event"], include=["leased_until"],
                         name="webhook_message_turn_idx", condition=Q(status="pending")),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} → {self.endpoint_id} ({self.status})"


class WebhookAttempt(models.Model):
    """One HTTP attempt of a message (append-only log shown in the API and the admin)."""

    id = models.BigAutoField(primary_key=True)
    message = models.ForeignKey(WebhookMessage, on_delete=models.CASCADE, related_name="attempts")
    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="attempts")
    attempted_at = models.DateTimeField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(default=0)
    error = models.CharField(max_length=500, blank=True, default="")
    next_retry_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-attempted_at", "-id"]
        indexes = [models.Index(fields=["endpoint", "attempted_at"], name="webhook_attempt_endpoint_idx")]


class MessageKind(models.TextChoices):
    ASSIGNED = "assigned"
    DRIVER_CHANGED = "driver_changed"  # another driver took over after the customer was told of one
    ARRIVING = "arriving"
    DELIVERED = "delivered"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Channel(models.TextChoices):
    SMS = "sms"
    EMAIL = "email"


class CustomerMessageStatus(models.TextChoices):
    PENDING = "pending"
    SENDING = "sending"  # handed to the provider; a worker that died here leaves it so (never sent twice)
    SENT = "sent"
    FAILED = "failed"
    SKIPPED = "skipped"  # nothing to send to (no valid number), outdated by the delivery's end, or opted out


class CustomerMessage(models.Model):
    """One message to a delivery's customer. At most one per (delivery, kind, channel), and
    per new driver for driver_changed: the unique constraints have the last word, and a message is handed to its provider once (a
    send whose outcome is unknown is not repeated)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", on_delete=models.CASCADE, related_name="customer_messages")
    kind = models.CharField(max_length=16, choices=MessageKind.choices)
    channel = models.CharField(max_length=8, choices=Channel.choices)
    recipient = models.CharField(max_length=254, help_text="E.164 number or e-mail address")
    language = models.CharField(max_length=16, default="en")
    template = models.CharField(max_length=200, blank=True, default="")
    status = models.CharField(max_length=16, choices=CustomerMessageStatus.choices, default=CustomerMessageStatus.PENDING)
    provider_id = models.CharField(max_length=200, blank=True, default="")
    error = models.CharField(max_length=500, blank=True, default="")
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    created_at = models.DateTimeField()
    sent_at = models.DateTimeField(null=True, blank=True)
    # The driver the message named: written as an assigned or arriving message is sent; a
    # driver_changed message's is the driver it is about, from its making.
    driver_id = models.UUIDField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["delivery", "kind", "channel"], name="customer_message_once_per_delivery",
                                    condition=~Q(kind="driver_changed")),
            # (a customer is told of each new driver once: a second reassign names the third)
            models.UniqueConstraint(fields=["delivery", "kind", "channel", "driver_id"],
                                    name="customer_message_once_per_new_driver", condition=Q(kind="driver_changed")),
        ]
        indexes = [
            models.Index(fields=["next_attempt_at"], name="customer_message_due_idx", condition=Q(status="pending")),
            # (a provider's status report names the message by its id: notifications.api.twilio)
            models.Index(fields=["provider_id"], name="customer_message_provider_idx", condition=~Q(provider_id="")),
            # (a customer's reply finds the delivery our last text to that number was about)
            models.Index(fields=["channel", "recipient", "-created_at"], name="customer_message_recipient_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.channel} to {self.recipient} ({self.status})"


class CustomerReply(models.Model):
    """A text a customer sent to our number that is not a keyword (STOP, START, HELP and their
    kin): "leave it at the door", "where is my order?". Kept with the delivery it answers (the
    open one our texts to that number were last about, else the latest; none when we never
    texted the number) and told to ops and to that delivery's driver (`customer_replied`).
    At most one per provider message id: a webhook the provider retries is recorded once."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    delivery = models.ForeignKey("dispatch.Delivery", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="customer_replies")
    channel = models.CharField(max_length=8, choices=Channel.choices, default=Channel.SMS)
    sender = models.CharField(max_length=254, help_text="E.164 number")
    body = models.CharField(max_length=1600)
    provider_id = models.CharField(max_length=200, blank=True, default="")
    received_at = models.DateTimeField()

    class Meta:
        ordering = ["-received_at"]
        constraints = [
            models.UniqueConstraint(fields=["provider_id"], name="customer_reply_once", condition=~Q(provider_id="")),
        ]
        indexes = [models.Index(fields=["sender", "-received_at"], name="customer_reply_sender_idx")]  # (the hourly cap)
        verbose_name_plural = "customer replies"

    def __str__(self) -> str:
        return f"{self.channel} from {self.sender} at {self.received_at:%Y-%m-%d %H:%M}"


class OptOutSource(models.TextChoices):
    CUSTOMER = "customer"  # the link in a message (or the e-mail's one-click unsubscribe)
    PROVIDER = "provider"  # the SMS provider refused: the number replied STOP (Twilio 21610)
    OPS = "ops"  # ops, in the console (a customer who asked by phone)


class CustomerOptOut(models.Model):
    """A recipient who asked for no more messages on a channel: nothing is sent there again
    (a pending message is skipped). Ops can remove one in the console (the customer opted in
    again). Keyed by the recipient as messages hold it: E.164 numbers, e-mail addresses in
    lower case."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    channel = models.CharField(max_length=8, choices=Channel.choices)
    recipient = models.CharField(max_length=254)
    source = models.CharField(max_length=16, choices=OptOutSource.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["channel", "recipient"], name="customer_opt_out_once")]
        verbose_name = "customer opt-out"

    def __str__(self) -> str:
        return f"{self.channel} {self.recipient} ({self.source})"


class DevicePlatform(models.TextChoices):
    ANDROID = "android"
    IOS = "ios"
    WEB = "web"


class PushDevice(models.Model):
    """A driver's phone or browser registered for push (an FCM registration token). A token
    belongs to one driver at a time: registering it again moves it."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    driver = models.ForeignKey("availability.Driver", on_delete=models.CASCADE, related_name="push_devices")
    platform = models.CharField(max_length=16, choices=DevicePlatform.choices)
    token = models.CharField(max_length=4096, unique=True)
    created_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"{self.platform} device of {self.driver_id}"
