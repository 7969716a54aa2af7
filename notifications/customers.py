"""Messages to a delivery's customer: on assignment (with the tracking link), when another
driver takes over after the customer was told of one (once per new driver), when the driver is
arriving (within `CUSTOMER_ARRIVING_METERS` of the drop-off, once), delivered and failed, and
cancelled when the customer had been told of a driver; an
SMS to `customerPhone` and an e-mail to `customerEmail` when the delivery has them.

They are made from the webhook outbox (`message_rows_for_events`, called by the fan-out after
commit): the outbox event is the durable record of the change, so nothing is lost and nothing
runs in the request. One row per (delivery, kind, channel), unique in the database: a customer
gets each message at most once, however often an event is fanned out. A worker claims a row
by a conditional UPDATE (pending → sending) before handing it to the provider; only a send
that certainly did not happen goes back to pending for a retry, so an unknown outcome (a
timeout, a worker killed mid-send) is never sent twice. Templates: `notifications/customer/
<language>/<kind>.{sms,subject,email}.txt`, falling back to the base language, then English."""
from __future__ import annotations

import logging
import smtplib
import uuid
from datetime import datetime, timedelta
from email.utils import make_msgid

import phonenumbers
from django.conf import settings
from django.core.mail import EmailMessage, get_connection
from django.db import transaction
from django.db.models import Exists, F, OuterRef
from django.template.loader import select_template
from django.utils import timezone

from availability.models import Driver
from common.broadcast import OPS_GROUP, broadcast_on_commit, driver_group, enqueue_task_on_commit
from common.db import insert_unless_conflict
from dispatch.models import CODE_POLICIES, OPEN_DELIVERY_STATUSES, Assignment, AssignmentStatus, Delivery, DeliveryStatus
from notifications import events
from notifications.models import (
    Channel, CustomerMessage, CustomerOptOut, CustomerReply, MessageKind, OptOutSource, OutboxEvent,
)
from notifications.models import CustomerMessageStatus as St
from notifications.sms import TWILIO_UNSUBSCRIBED, SmsNotSent, SmsOutcomeUnknown, SmsRecipientOptedOut, get_sms_backend
from tracking.eta import haversine_km

logger = logging.getLogger(__name__)

SEND_TASK = "notifications.send_customer_messages"
DEFAULT_LANGUAGE = "en"


def _kind_for(event: OutboxEvent, told: dict[str, str]) -> str | None:
    """`told`: delivery id → the driver its customer was last told of (`_drivers_told`)."""
    data = event.payload.get("data", {})
    if event.type == "delivery.assigned":
        named, new = told.get(str(event.delivery_id)), data.get("driverId")
        return MessageKind.DRIVER_CHANGED if named and new and named != new else MessageKind.ASSIGNED
    if event.type == "delivery.status_changed" and data.get("status") in ("delivered", "failed"):
        return MessageKind.DELIVERED if data["status"] == "delivered" else MessageKind.FAILED
    if event.type == "delivery.eta_updated" and data.get("status") == "in_transit" and _arriving(data):
        return MessageKind.ARRIVING
    if event.type == "delivery.status_changed" and data.get("status") == "cancelled" and _told_of_a_driver(event.delivery_id):
        return MessageKind.CANCELLED
    return None


def _told_of_a_driver(delivery_id) -> bool:
    """A cancellation is news to a customer who was told a driver is on the way (an assigned
    message sent, or being sent; one still pending is skipped, the delivery being cancelled)."""
    return CustomerMessage.objects.filter(
        delivery_id=delivery_id, kind=MessageKind.ASSIGNED, status__in=(St.SENT, St.SENDING)
    ).exists()


def _drivers_told(delivery_ids) -> dict[str, str]:
    """Delivery id → the driver its customer was last told of: named by an assigned or
    driver-changed message sent or being sent (one read for a fan-out's batch). Another
    driver's assignment (ops reassigned it) is news: the customer had that one's name and
    nothing more. The same driver's (its event fanned out again, or ops offered it back), or
    one an assigned message still pending will name when it goes, is not."""
    if not delivery_ids:
        return {}
    rows = (
        CustomerMessage.objects.filter(
            delivery_id__in=list(delivery_ids), kind__in=(MessageKind.ASSIGNED, MessageKind.DRIVER_CHANGED),
            status__in=(St.SENT, St.SENDING), driver_id__isnull=False,
        ).order_by("delivery_id", "-created_at").distinct("delivery_id").values_list("delivery_id", "driver_id")
    )
    return {str(delivery_id): str(driver_id) for delivery_id, driver_id in rows}


def _arriving(data: dict) -> bool:
    """The delivery's driver is within CUSTOMER_ARRIVING_METERS of the drop-off (its last fix)."""
    if not data.get("driverId") or not data.get("dropoffLocation"):
        return False
    location = Driver.objects.filter(pk=data["driverId"]).values_list("location", flat=True).first()
    if location is None:
        return False
    drop = data["dropoffLocation"]
    return haversine_km(location.y, location.x, drop["lat"], drop["lon"]) * 1000 <= settings.CUSTOMER_ARRIVING_METERS


def sms_number(raw: str) -> str | None:
    """The customer's number in E.164 when it is a valid one, else None."""
    try:
        number = phonenumbers.parse(raw, settings.PHONE_DEFAULT_REGION)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


OPTED_OUT = "not sent: the customer opted out"


def opt_out_key(channel: str, recipient: str) -> str:
    """A recipient as opt-outs hold it: a number in E.164 (as valid numbers' messages hold it),
    an address in lower case."""
    if channel == Channel.SMS:
        return sms_number(recipient) or recipient.strip()
    return recipient.strip().lower()


@transaction.atomic
def customer_opt_out(*, channel: str, recipient: str, source: str) -> CustomerOptOut:
    """No more messages to `recipient` on `channel`: recorded once, and its pending messages
    skipped (one being sent at that moment still goes). The opt-out row (the one there was, if
    any: its source is kept)."""
    key = opt_out_key(channel, recipient)
    opt_out, _ = CustomerOptOut.objects.get_or_create(channel=channel, recipient=key, defaults={"source": source})
    CustomerMessage.objects.filter(channel=channel, recipient__iexact=key, status=St.PENDING).update(
        status=St.SKIPPED, error=OPTED_OUT)
    return opt_out


# The words a text to our number opts out or back in with, as Twilio's defaults (a message of
# that word alone, any case; with Advanced Opt-Out Twilio names it in `OptOutType`, which wins).
SMS_OPT_OUT_WORDS = frozenset({"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "OPTOUT", "REVOKE"})
SMS_OPT_IN_WORDS = frozenset({"START", "YES", "UNSTOP"})


def customer_opt_in(*, channel: str, recipient: str) -> bool:
    """`recipient` wants messages on `channel` again (the number texted START): its opt-out,
    whoever recorded it, is removed; messages skipped meanwhile stay skipped. Whether there was
    one."""
    deleted, _ = CustomerOptOut.objects.filter(channel=channel, recipient=opt_out_key(channel, recipient)).delete()
    return bool(deleted)


def sms_reply_received(*, sender: str, body: str, opt_out_type: str = "", provider_id: str = "") -> str | None:
    """A text a customer sent to our number (Twilio's incoming-message webhook): STOP and its
    kin record the number's opt-out (source `provider`, as Twilio's own block), START and its kin
    remove it, HELP and INFO are Twilio's to answer. "stop", "start", "help"; any other text is
    the customer's reply (`customer_reply_record`): "reply", or None when it was recorded
    before (the provider sent the webhook again) or is empty."""
    body = body.replace("\x00", "")  # (PostgreSQL's text holds no NUL)
    word = (opt_out_type or body).strip().upper()
    if word in SMS_OPT_OUT_WORDS:
        customer_opt_out(channel=Channel.SMS, recipient=sender, source=OptOutSource.PROVIDER)
        logger.info("sms opt-out by reply %r", word)
        return "stop"
    if word in SMS_OPT_IN_WORDS:
        had = customer_opt_in(channel=Channel.SMS, recipient=sender)
        logger.info("sms opt-in by reply %r (an opt-out removed: %s)", word, had)
        return "start"
    if word in SMS_HELP_WORDS:
        return "help"
    if not body.strip():
        return None  # (a picture alone, say: nothing to read)
    reply = customer_reply_record(channel=Channel.SMS, sender=sender, body=body, provider_id=provider_id,
                                  now=timezone.now())
    return "reply" if reply is not None else None


SMS_HELP_WORDS = frozenset({"HELP", "INFO"})
REPLY_MATCH_WINDOW = timedelta(days=7)  # a closed delivery's texts answered this long after


@transaction.atomic
def customer_reply_record(*, channel: str, sender: str, body: str, provider_id: str, now: datetime):
    """Keep a customer's reply with the delivery it answers: of the deliveries our texts to that
    number were about, an open one first, then the latest texted in the last 7 days (none when
    we never texted it, or not lately).
    Ops hear of it (`customer_replied`), and so does the driver who has that delivery (on their
    socket and as a push notice), up to CUSTOMER_REPLIES_TOLD_PER_HOUR of a number's texts an
    hour (past it a reply is only kept). The reply, or None when the provider's message id was
    recorded before (a retried webhook: nothing is told twice)."""
    key = opt_out_key(channel, sender)[:254]
    last = (
        CustomerMessage.objects.filter(channel=channel, recipient=key)
        .filter(status__in=(St.SENT, St.SENDING))  # (texts that reached, or may have reached, the number)
        .order_by("-created_at").values_list("delivery_id", flat=True)
    )
    # (a text weeks after our last one, from a number that may have changed hands, answers none)
    delivery_id = (last.filter(delivery__status__in=OPEN_DELIVERY_STATUSES).first()
                   or last.filter(created_at__gte=now - REPLY_MATCH_WINDOW).first())
    # The delivery locked (a reassign or a cancel in flight finishes first), so the driver told
    # is the one who has it when the reply is recorded.
    delivery = Delivery.objects.select_for_update(of=("self",)).filter(pk=delivery_id).first() if delivery_id else None
    reply = CustomerReply(delivery=delivery, channel=channel, sender=key, body=body, provider_id=provider_id[:200],
                          received_at=now)
    if not insert_unless_conflict(reply):
        return None
    told = CustomerReply.objects.filter(sender=key, received_at__gt=now - timedelta(hours=1)).count()
    if told > settings.CUSTOMER_REPLIES_TOLD_PER_HOUR:
        logger.warning("customer reply %s kept, not told: %s texts from one number in the hour", reply.pk, told)
        return reply
    driver_id = None
    if delivery is not None and delivery.status in OPEN_DELIVERY_STATUSES:
        driver_id = (Assignment.objects.filter(delivery=delivery, status=AssignmentStatus.ACTIVE)
                     .values_list("driver_id", flat=True).first())
    groups = [OPS_GROUP] + ([driver_group(driver_id)] if driver_id else [])
    broadcast_on_commit(groups, events.customer_replied(reply, delivery=delivery, driver_id=driver_id))
    logger.info("customer reply %s recorded (delivery %s)", reply.pk, delivery.pk if delivery else None)
    return reply


# A message's end as Twilio's status callback reports it (`MessageStatus`) that means it never
# reached the phone.
SMS_UNDELIVERED = frozenset({"failed", "undelivered"})


@transaction.atomic
def sms_status_reported(*, message_id: str = "", provider_id: str, status: str, error_code: str = "") -> str | None:
    """Twilio's status callback for one of our SMS (by our id in the callback's URL, else by its
    `sid`): one that did not reach the phone is `failed`, with the provider's words; refused as
    the number had replied STOP (21610, reported this way with a Messaging Service) it is
    `skipped` and the number recorded, as when the send itself is refused. Only a message
    recorded `sent`, or still `sending` (the report came before the provider's answer was
    written), changes: a late or repeated report changes nothing. Its new status, or None."""
    unsubscribed = error_code == str(TWILIO_UNSUBSCRIBED)
    if not (unsubscribed or status in SMS_UNDELIVERED):
        return None  # (on its way, sent, delivered: nothing to record)
    if unsubscribed:
        new, error = St.SKIPPED, f"{OPTED_OUT} (at the SMS provider: {status}, error {error_code})"
    else:
        new, error = St.FAILED, f"the SMS provider reported it {status}" + (f" (error {error_code})" if error_code else "")
    messages = CustomerMessage.objects.filter(channel=Channel.SMS, status__in=(St.SENT, St.SENDING))
    if message_id:
        try:
            messages = messages.filter(pk=uuid.UUID(message_id))
        except ValueError:
            return None
    elif provider_id:
        messages = messages.filter(provider_id=provider_id)
    else:
        return None
    message = messages.select_for_update().first()
    if message is None:
        return None
    if unsubscribed:
        customer_opt_out(channel=Channel.SMS, recipient=message.recipient, source=OptOutSource.PROVIDER)
    # (a message still `sending` gets its provider's id from the report: the sender's own
    # finish, which changes only a `sending` row, then changes nothing)
    CustomerMessage.objects.filter(pk=message.pk).update(
        status=new, error=error[:500], provider_id=(message.provider_id or provider_id)[:200])
    return new


@transaction.atomic
def delivery_customer_opt_out(*, delivery, source: str = OptOutSource.CUSTOMER) -> list[str]:
    """The customer of `delivery` wants no more messages: its number and its address, each
    on its channel. The channels it had (and has opted out of)."""
    channels = []
    if delivery.customer_phone:
        customer_opt_out(channel=Channel.SMS, recipient=delivery.customer_phone, source=source)
        channels.append(Channel.SMS)
    if delivery.customer_email:
        customer_opt_out(channel=Channel.EMAIL, recipient=delivery.customer_email, source=source)
        channels.append(Channel.EMAIL)
    return channels


def _opted_out(message: CustomerMessage) -> bool:
    return CustomerOptOut.objects.filter(
        channel=message.channel, recipient=opt_out_key(message.channel, message.recipient)).exists()


def opt_out_url(delivery) -> str:
    """The customer's page for no more messages (the tracking link's, with its token)."""
    base = settings.TRACKING_BASE_URL.rstrip("/")
    return f"{base}/{delivery.pk}/opt-out?token={delivery.tracking_token}"


def message_rows_for_events(events: list[OutboxEvent], *, now: datetime) -> int:
    """The customer messages these outbox events call for (once each: existing rows win).
    The caller is the fan-out, inside its transaction; sending follows after commit."""
    if not settings.CUSTOMER_MESSAGES_ENABLED:
        return 0
    rows = []
    told = _drivers_told({
        event.delivery_id for event in events if event.type == "delivery.assigned" and event.delivery_id is not None
        and (event.payload["data"].get("customerPhone") or event.payload["data"].get("customerEmail"))
    })
    for event in events:
        if event.delivery_id is None:
            continue
        kind = _kind_for(event, told)
        if kind is None:
            continue
        data = event.payload["data"]
        rows += _message_rows(event.delivery_id, kind, phone=data.get("customerPhone"), email=data.get("customerEmail"),
                              language=data.get("customerLanguage"), now=now,
                              driver_id=data.get("driverId") if kind == MessageKind.DRIVER_CHANGED else None)
    return _messages_create(rows)


def arriving_message_rows(fixes: list[tuple[str, float, float]], *, now: datetime) -> int:
    """The arriving messages of the in-transit deliveries among `fixes` ((delivery id, lat, lon)
    of their drivers' fixes, the latest last) whose driver is within CUSTOMER_ARRIVING_METERS of
    the drop-off and whose customer has none yet: one read. Called with the ETA refresh of
    fixes (at its cadence: ETA_MIN_INTERVAL_SECONDS, sooner after ETA_MIN_MOVE_METERS). Seen
    only in an ETA update's webhook row, the message was lost when the ETA did not move by its
    threshold near the door, or when that update's webhook was held back by the merchants' 60 s
    throttle (an audit: the driver reached the door 34 s after the last one; no message)."""
    if not settings.CUSTOMER_MESSAGES_ENABLED or not fixes:
        return 0
    last = {str(delivery_id): (lat, lon) for delivery_id, lat, lon in fixes}
    told = CustomerMessage.objects.filter(delivery_id=OuterRef("pk"), kind=MessageKind.ARRIVING)
    rows = []
    for pk, drop, phone, email, language in (
        Delivery.objects.filter(pk__in=list(last), status=DeliveryStatus.IN_TRANSIT).exclude(Exists(told))
        .values_list("pk", "dropoff_location", "customer_phone", "customer_email", "customer_language")
    ):
        lat, lon = last[str(pk)]
        if haversine_km(lat, lon, drop.y, drop.x) * 1000 <= settings.CUSTOMER_ARRIVING_METERS:
            rows += _message_rows(pk, MessageKind.ARRIVING, phone=phone, email=email, language=language, now=now)
    return _messages_create(rows)


def _message_rows(delivery_id, kind: str, *, phone: str | None, email: str | None, language: str | None,
                  now: datetime, driver_id=None) -> list[CustomerMessage]:
    """A message's rows: an SMS to `phone` (skipped when it is not a valid number), an e-mail to `email`."""
    language = language or DEFAULT_LANGUAGE
    rows = []
    if phone:
        number = sms_number(phone)
        rows.append(CustomerMessage(
            delivery_id=delivery_id, kind=kind, channel=Channel.SMS, recipient=number or phone,
            language=language, status=St.PENDING if number else St.SKIPPED,
            error="" if number else "not a valid phone number", next_attempt_at=now, created_at=now, driver_id=driver_id,
        ))
    if email:
        rows.append(CustomerMessage(
            delivery_id=delivery_id, kind=kind, channel=Channel.EMAIL, recipient=email,
            language=language, next_attempt_at=now, created_at=now, driver_id=driver_id,
        ))
    return rows


def _messages_create(rows: list[CustomerMessage]) -> int:
    """Store the rows (once each: existing rows win) and have a worker send them after commit."""
    if not rows:
        return 0
    made = CustomerMessage.objects.bulk_create(rows, ignore_conflicts=True)
    enqueue_task_on_commit(SEND_TASK)
    return len(made)


def _subtag(part: str, index: int) -> str:
    if index == 0 or len(part) not in (2, 4):
        return part.lower()
    return part.upper() if len(part) == 2 else part.title()  # a region (MX), a script (Hant)


def language_chain(tag: str) -> list[str]:
    """The template languages to try for a BCP 47 tag, most specific first, in the tags'
    conventional case (tags are case-insensitive; template directories are not):
    "ES-mx" → es-MX, es, en; "zh-hant-tw" → zh-Hant-TW, zh-Hant, zh, en."""
    parts = [_subtag(part, i) for i, part in enumerate((tag or "").split("-")) if part]
    return list(dict.fromkeys(["-".join(parts[:n]) for n in range(len(parts), 0, -1)] + [DEFAULT_LANGUAGE]))


def _templates(message: CustomerMessage, part: str) -> list[str]:
    return [f"notifications/customer/{lang}/{message.kind}.{part}.txt" for lang in language_chain(message.language)]


def _render(message: CustomerMessage, context: dict, part: str) -> tuple[str, str]:
    template = select_template(_templates(message, part))
    return template.template.name, template.render(context).strip()


# What the customer reads of a failure: the driver's reason code in the customer's language (the
# driver's own words, or a code without a phrase, are not sent: they are for ops).
FAILURE_REASON_TEXT = {
    "en": {
        "customer_unavailable": "nobody was there to receive it",
        "address_not_found": "the driver could not find the address",
        "refused": "it was refused at the door",
        "damaged": "it was damaged on the way",
        "unsafe": "the driver could not reach the address safely",
    },
    "es": {
        "customer_unavailable": "no había nadie para recibirlo",
        "address_not_found": "el repartidor no encontró la dirección",
        "refused": "fue rechazado en la puerta",
        "damaged": "se dañó en el camino",
        "unsafe": "el repartidor no pudo llegar a la dirección de forma segura",
    },
}


def failure_reason_text(code: str, language: str) -> str:
    for lang in language_chain(language):
        if lang in FAILURE_REASON_TEXT:
            return FAILURE_REASON_TEXT[lang].get(code, "")
    return ""


_NAMES_THE_DRIVER = (MessageKind.ASSIGNED, MessageKind.DRIVER_CHANGED, MessageKind.ARRIVING)


def _named_driver(message: CustomerMessage):
    """The driver a message naming one names: the delivery's latest assignment's."""
    if message.kind not in _NAMES_THE_DRIVER:
        return None
    assignment = message.delivery.assignments.select_related("driver").order_by("-created_at").first()
    return assignment.driver if assignment else None


def _context(message: CustomerMessage, named=None) -> dict:
    delivery = message.delivery
    driver = named.name.split(" ")[0] if named is not None else None
    return {
        "customer_name": delivery.customer_name, "store_name": delivery.store_name,
        "seller_order_id": delivery.seller_order_id, "tracking_url": delivery.tracking_url,
        "opt_out_url": opt_out_url(delivery),  # (the e-mails' footer; texts: STOP, at the provider)
        "driver_first_name": driver, "failure_reason": failure_reason_text(delivery.failure_code, message.language),
        # The code the customer gives the driver at the door (code and code_or_photo policies):
        # in the customer's messages while it is on its way, never anywhere a driver reads.
        "handoff_code": delivery.handoff_code
        if delivery.proof_required in CODE_POLICIES and message.kind in _NAMES_THE_DRIVER
        else "",
    }


def customer_messages_send_due(*, now: datetime | None = None, batch_size: int = 50) -> int:
    """Send the due pending messages (bounded). Safe in several workers at once. Nothing while
    CUSTOMER_MESSAGES_ENABLED is false (pending ones wait)."""
    if not settings.CUSTOMER_MESSAGES_ENABLED:
        return 0
    now = now or timezone.now()
    ids = list(
        CustomerMessage.objects.filter(status=St.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at").values_list("pk", flat=True)[:batch_size]
    )
    sent = 0
    for message_id in ids:
        try:
            sent += customer_message_send(message_id=message_id)
        except Exception:  # one bad message never stops the rest
            logger.exception("customer message %s failed", message_id)
    return sent


# News a later state makes wrong: "a driver is on the way" to a delivery that was cancelled (or
# has ended) by the time a worker sends it (a retry waits up to minutes).
_OUTDATED_BY = {
    MessageKind.ASSIGNED: {"delivered", "failed", "cancelled"},
    MessageKind.DRIVER_CHANGED: {"delivered", "failed", "cancelled"},
    MessageKind.ARRIVING: {"delivered", "failed", "cancelled"},
}
_SMTP_TRANSIENT = range(400, 500)  # an SMTP 4xx: the server refused it for now (nothing was sent)


def customer_message_send(*, message_id) -> int:
    """Claim the message (pending → sending), render it, hand it to its provider once.

    What certainly was not sent goes back to pending (the provider answered 429/5xx or an SMTP
    4xx, or could not be reached: the connection failed) or is `failed` (refused for good, or
    the message cannot be made); what may have been sent is never repeated (`failed`, "outcome
    unknown"). A message the delivery's state has outdated is `skipped`."""
    now = timezone.now()
    claimed = CustomerMessage.objects.filter(pk=message_id, status=St.PENDING, next_attempt_at__lte=now).update(
        status=St.SENDING, attempts=F("attempts") + 1
    )
    if claimed != 1:
        return 0
    message = CustomerMessage.objects.select_related("delivery").get(pk=message_id)
    if message.delivery.status in _OUTDATED_BY.get(message.kind, ()):
        _finish(message, status=St.SKIPPED, error=f"not sent: the delivery is {message.delivery.status}", now=now)
        return 0
    if _opted_out(message):
        _finish(message, status=St.SKIPPED, error=OPTED_OUT, now=now)
        return 0
    try:
        named = _named_driver(message)
        if message.kind == MessageKind.DRIVER_CHANGED and (named is None or str(named.pk) != str(message.driver_id)):
            # (yet another driver took over before it went: that one's message says so)
            _finish(message, status=St.SKIPPED, error="not sent: another driver has the delivery now", now=now)
            return 0
        if named is not None and message.kind != MessageKind.DRIVER_CHANGED:
            # who the customer is told of, before it goes (a send whose outcome is unknown told them too)
            CustomerMessage.objects.filter(pk=message.pk).update(driver_id=named.pk)
        context = _context(message, named)
        if message.channel == Channel.SMS:
            template, body = _render(message, context, "sms")
        else:
            template, body = _render(message, context, "email")
            # one line whatever the store's name holds (a line break in a header is refused)
            subject = " ".join(_render(message, context, "subject")[1].split())
            provider_id = make_msgid(domain=settings.CUSTOMER_EMAIL_FROM.rsplit("@", 1)[-1] or "localhost")
            # (one-click unsubscribe, RFC 8058: mail clients offer it, and large mailbox providers
            # expect it of bulk senders)
            email = EmailMessage(subject, body, settings.CUSTOMER_EMAIL_FROM, [message.recipient], headers={
                "Message-ID": provider_id, "List-Unsubscribe": f"<{opt_out_url(message.delivery)}>",
                "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
            })
            email.message()  # built now: a message that cannot be made is refused before any provider sees it
    except Exception as exc:
        logger.exception("customer message %s could not be made", message_id)
        _finish(message, status=St.FAILED, error=f"could not be made: {str(exc) or type(exc).__name__}", now=now)
        return 0
    try:
        if message.channel == Channel.SMS:
            provider_id = get_sms_backend().send(to=message.recipient, body=body, message_id=str(message.pk))
        else:
            provider_id = _email_send(email, provider_id)
    except SmsRecipientOptedOut as exc:  # (the number replied STOP to the provider)
        customer_opt_out(channel=Channel.SMS, recipient=message.recipient, source=OptOutSource.PROVIDER)
        _finish(message, status=St.SKIPPED, error=f"{OPTED_OUT} (at the SMS provider: {exc})", now=now)
        return 0
    except (SmsNotSent, ConnectionRefusedError) as exc:  # (refused: nothing reached the provider)
        _not_sent(message, error=str(exc) or type(exc).__name__, retry=getattr(exc, "retry", True), now=now)
        return 0
    except (SmsOutcomeUnknown, smtplib.SMTPException, OSError) as exc:
        _finish(message, status=St.FAILED, error=f"outcome unknown, not retried: {str(exc) or type(exc).__name__}", now=now)
        return 0
    _finish(message, status=St.SENT, template=template, provider_id=provider_id, now=now)
    return 1


class _EmailNotSent(SmsNotSent):
    """An e-mail that certainly was not sent (the same contract as an SMS backend's SmsNotSent)."""


def _email_send(email: EmailMessage, provider_id: str) -> str:
    """Send through EMAIL_BACKEND: the connection first (a failure there sent nothing: a DNS
    failure, a refused or timed-out connection, a refused login), then the message (refused
    recipients or sender, or an SMTP 4xx for the data, sent nothing either). The provider's
    id: django-anymail's, else our Message-ID."""
    connection = get_connection(fail_silently=False)
    try:
        connection.open()
    except (smtplib.SMTPException, OSError) as exc:
        raise _EmailNotSent(f"could not reach the mail server: {str(exc) or type(exc).__name__}", retry=True) from exc
    try:
        email.connection = connection
        email.send(fail_silently=False)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        raise _EmailNotSent(str(exc), retry=all(code in _SMTP_TRANSIENT for code in codes)) from exc
    except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
        raise _EmailNotSent(str(exc), retry=exc.smtp_code in _SMTP_TRANSIENT) from exc
    finally:
        try:
            connection.close()
        except (smtplib.SMTPException, OSError):  # after the message was taken: it is sent
            logger.warning("closing the mail connection failed", exc_info=True)
    status = getattr(email, "anymail_status", None)  # django-anymail's backends report the provider's id
    if status is not None and getattr(status, "message_id", None):
        return str(status.message_id)
    return provider_id


def _not_sent(message: CustomerMessage, *, error: str, retry: bool, now: datetime) -> None:
    if retry and message.attempts < settings.CUSTOMER_MESSAGE_MAX_ATTEMPTS:
        delay = timedelta(seconds=30 * 2 ** (message.attempts - 1))
        CustomerMessage.objects.filter(pk=message.pk, status=St.SENDING).update(
            status=St.PENDING, error=error[:500], next_attempt_at=now + delay
        )
    else:
        _finish(message, status=St.FAILED, error=error, now=now)


def _finish(message: CustomerMessage, *, status: str, now: datetime, error: str = "", template: str = "", provider_id: str = "") -> None:
    CustomerMessage.objects.filter(pk=message.pk, status=St.SENDING).update(
        status=status, error=error[:500], template=template, provider_id=provider_id[:200],
        sent_at=now if status == St.SENT else None,
    )
