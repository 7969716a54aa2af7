"""Every write of the webhooks: endpoints (create, change, rotate, delete, test), the fan-out
of outbox events to the endpoints that want them, sending what is due, recording each
attempt, replay.

How a message goes out, and the races it has to survive:
- `webhooks_fan_out` makes one message per (event, endpoint) under `SKIP LOCKED`; the unique
  constraint (event, endpoint) has the last word if two fan-outs meet.
- `webhooks_claim_due` leases due messages by one conditional UPDATE (`FOR UPDATE SKIP
  LOCKED` in its sub-select): two workers never send one message at once, and a worker that
  dies after claiming leaves a lease that expires, after which the sweep sends it again (the
  receiver sees the same `webhook-id`: at least once). A message is not due while an earlier
  event of the same delivery is pending for that endpoint or not yet fanned out: per delivery
  the receiver gets events in order.
- The HTTP request runs outside any transaction; `message_attempt_record` then locks the
  endpoint and the message (the order every write to an endpoint takes) and writes the outcome, the attempt row and, after 24 h of
  failures, disables the endpoint and alerts ops on commit.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.utils import parsedate_to_datetime

from celery import current_app as current_celery_app
from celery.exceptions import SoftTimeLimitExceeded
from redis.exceptions import LockError

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.db.models import Count, Max, Min
from django.utils import timezone

from common.broadcast import enqueue_kick_on_commit
from common.errors import iso
from common.redis import RedisFailed, get_redis
from common.exceptions import Conflict, InvalidInput, NotFound
from notifications import alerts
from notifications.customers import message_rows_for_events
from notifications.egress import HttpResult, TargetRefused, ascii_host_url, post_json, url_check
from notifications.models import (
    ALL_EVENTS,
    TEST_EVENT_TYPE,
    WEBHOOK_EVENT_TYPES,
    MessageStatus,
    OutboxEvent,
    PushDevice,
    WebhookAttempt,
    WebhookEndpoint,
    WebhookMessage,
)
from notifications.outbox import DELIVER_TASK, outbox_render_pending
from notifications.payloads import webhook_body
from notifications.signing import secret_new, signed_headers

logger = logging.getLogger(__name__)

LEASE_SECONDS = 120  # longer than a sweep's budget (WEBHOOK_SEND_BUDGET_SECONDS) and one attempt (WEBHOOK_TIMEOUT_SECONDS)


# ------------------------------------------------------------------------------ endpoints


def endpoint_events_clean(events: list[str]) -> list[str]:
    """The subscription as stored, or InvalidInput naming `events`."""
    if not events:
        raise InvalidInput({"events": ['Subscribe to at least one event type, or ["*"] for all.']})
    unknown = sorted(set(events) - set(WEBHOOK_EVENT_TYPES) - {ALL_EVENTS})
    if unknown:
        raise InvalidInput({"events": [f"Unknown event type {u!r}; one of {', '.join(WEBHOOK_EVENT_TYPES)} or \"*\"." for u in unknown]})
    return [ALL_EVENTS] if ALL_EVENTS in events else list(dict.fromkeys(events))


def endpoint_url_clean(url: str) -> str:
    """The URL if we would send to its form (scheme, no credentials, no private literal), or
    InvalidInput naming `url`. Its addresses are checked again at each send. A host name in
    another script is kept in its ASCII form (`https://xn--exmple-cua.example/` for
    `https://exämple.example/`): the name a resolver looks up, and a URI (stored as given it was
    shown back as an IRI, which the schema's `format: uri` refuses)."""
    try:
        url_check(url)
        url = ascii_host_url(url)
    except TargetRefused as exc:
        raise InvalidInput({"url": [str(exc)]}) from exc
    if not url.isascii():  # (a fragment: never sent, but shown back, and a URI is ASCII)
        raise InvalidInput({"url": ["The URL may not contain non-ASCII characters; percent-encode them."]})
    if len(url) > WebhookEndpoint._meta.get_field("url").max_length:
        raise InvalidInput({"url": [f"Ensure this field has no more than {WebhookEndpoint._meta.get_field('url').max_length} characters "
                                    "(its host name in ASCII form)."]})
    return url


@transaction.atomic
def endpoint_create(*, owner, all_deliveries: bool, url: str, events: list[str], description: str = "",
                    active: bool = True, now: datetime | None = None) -> WebhookEndpoint:
    """A new endpoint; at most WEBHOOK_MAX_ENDPOINTS_PER_OWNER per account (409). Every event
    is one message per endpoint that wants it: a fuzzer's 850 ops endpoints made 800 messages
    of each event, 4 million in 15 minutes, and the fan-out held endpoint deletes up to 15 s."""
    now = now or timezone.now()
    limit = settings.WEBHOOK_MAX_ENDPOINTS_PER_OWNER
    if limit:
        # (the owner's row, locked: two creates at the cap count in turn; NO KEY UPDATE leaves
        # the owner's deliveries, whose keys share-lock it, to go on)
        get_user_model().objects.select_for_update(no_key=True).filter(pk=owner.pk).exists()
        if WebhookEndpoint.objects.filter(owner=owner).count() >= limit:
            raise Conflict(f"An account has at most {limit} webhook endpoints: delete one before adding another.")
    return WebhookEndpoint.objects.create(
        owner=owner, all_deliveries=all_deliveries, url=endpoint_url_clean(url), events=endpoint_events_clean(events),
        description=description, secret=secret_new(), created_at=now, updated_at=now,
        **({} if active else {"active": False, "disabled_at": now, "disabled_reason": "switched off"}),
    )


@transaction.atomic
def endpoint_update(*, endpoint_id, url: str | None = None, events: list[str] | None = None,
                    description: str | None = None, active: bool | None = None, now: datetime | None = None) -> WebhookEndpoint:
    """Change an endpoint. Switching it back on clears its failure record and sends what
    waited meanwhile, at once (its messages' backoff is over); so does a new URL for an
    endpoint that is on and failing (the usual fix of a wrong URL). A change that changes
    nothing writes nothing (`updatedAt` stays)."""
    now = now or timezone.now()
    endpoint = _endpoint_locked(endpoint_id)
    before = (endpoint.url, endpoint.events, endpoint.description, endpoint.active)
    if url is not None:
        endpoint.url = endpoint_url_clean(url)
    if events is not None:
        endpoint.events = endpoint_events_clean(events)
    if description is not None:
        endpoint.description = description
    send_waiting = False
    if active is not None and active != endpoint.active:
        endpoint.active = active
        endpoint.drop_warned_at = None
        if active:
            endpoint.disabled_at = None
            endpoint.disabled_reason = ""
            send_waiting = True
        else:
            endpoint.disabled_at = now
            endpoint.disabled_reason = "switched off"
    elif endpoint.active and endpoint.failing_since is not None and (active or endpoint.url != before[0]):
        # On, but failing, and fixed (the receiver, said by switching it on again; or its URL)
        send_waiting = True
    if send_waiting:  # (the backoff starts again, as after a replay)
        endpoint.failing_since = None
        WebhookMessage.objects.filter(endpoint_id=endpoint.pk, status=MessageStatus.PENDING, next_attempt_at__gt=now).update(
            next_attempt_at=now, attempt_count=0)
        enqueue_kick_on_commit(DELIVER_TASK)
    elif (endpoint.url, endpoint.events, endpoint.description, endpoint.active) == before:
        return endpoint
    endpoint.updated_at = now
    endpoint.save()
    return endpoint


def _endpoint_locked(endpoint_id, *, for_delete: bool = False) -> WebhookEndpoint:
    """The endpoint, locked (404 if it is gone: a DELETE that won the race). Every write to an
    endpoint and its messages locks the endpoint first (then its messages), so a delete and a
    change, a test or an attempt's record wait for each other in one order. Only a delete
    takes the full lock; the fan-out skips an endpoint under it (`_endpoints_to_fan_out_to`)."""
    endpoint = WebhookEndpoint.objects.select_for_update(of=("self",), no_key=not for_delete).filter(pk=endpoint_id).first()
    if endpoint is None:
        raise NotFound("Webhook endpoint not found.")
    return endpoint


@transaction.atomic
def endpoint_delete(*, endpoint_id) -> None:
    """Delete the endpoint and its messages. A test event written at the same instant waits for
    the lock and then finds no endpoint (404), instead of breaking the key at commit (a 500)."""
    _endpoint_locked(endpoint_id, for_delete=True).delete()


@transaction.atomic
def endpoint_rotate_secret(*, endpoint_id, now: datetime | None = None) -> WebhookEndpoint:
    """A new secret; the current one keeps signing too for `WEBHOOK_SECRET_OVERLAP_SECONDS`."""
    now = now or timezone.now()
    endpoint = _endpoint_locked(endpoint_id)
    endpoint.previous_secret = endpoint.secret
    endpoint.previous_secret_expires_at = now + timedelta(seconds=settings.WEBHOOK_SECRET_OVERLAP_SECONDS)
    endpoint.secret = secret_new()
    endpoint.updated_at = now
    endpoint.save(update_fields=["secret", "previous_secret", "previous_secret_expires_at", "updated_at"])
    return endpoint


def endpoint_signing_secrets(endpoint: WebhookEndpoint, *, now: datetime) -> list[str]:
    secrets_ = [endpoint.secret]
    if endpoint.previous_secret and endpoint.previous_secret_expires_at and endpoint.previous_secret_expires_at > now:
        secrets_.append(endpoint.previous_secret)
    return secrets_


@transaction.atomic
def endpoint_send_test(*, endpoint_id, now: datetime | None = None) -> OutboxEvent:
    """A `webhook.test` event for this endpoint only, sent like any other."""
    now = now or timezone.now()
    endpoint = _endpoint_locked(endpoint_id)
    if not endpoint.active:
        raise Conflict("The endpoint is disabled; enable it first.")
    event = OutboxEvent(type=TEST_EVENT_TYPE, endpoint=endpoint, owner_id=endpoint.owner_id, created_at=now, payload={})
    event.payload = webhook_body(
        webhook_id=event.webhook_id, type=TEST_EVENT_TYPE, created_at=now,
        data={"endpointId": str(endpoint.pk), "message": "A test event from the dispatch platform."},
    )
    event.save(force_insert=True)
    enqueue_kick_on_commit(DELIVER_TASK)
    return event


# ------------------------------------------------------------------------------ fan-out


FAN_OUT_MAX_MESSAGES = 5_000


@transaction.atomic
def webhooks_fan_out(*, now: datetime | None = None, batch_size: int = 500) -> int:
    """One message per (event, endpoint that wants it) for the events not yet fanned out.
    An endpoint gets the events written after it was created: its owner's deliveries', or
    every delivery's for an ops endpoint. A switched-off endpoint gets its messages too; they
    wait until it is switched on again. Returns the number of events fanned out."""
    now = now or timezone.now()
    events = list(
        OutboxEvent.objects.select_for_update(skip_locked=True).filter(fanned_out_at__isnull=True).order_by("seq")[:batch_size]
    )
    events = outbox_render_pending(events)  # the payloads written by one-statement changes
    if not events:
        return 0
    endpoints = _endpoints_to_fan_out_to(events)
    wanted = {ep.pk for ep in endpoints}
    messages = []
    for event in events:
        if event.endpoint_id is not None:
            targets = [event.endpoint_id] if event.endpoint_id in wanted else []
        else:
            targets = [
                ep.pk for ep in endpoints
                if (ep.all_deliveries or ep.owner_id == event.owner_id) and ep.subscribes_to(event.type)
                and ep.created_at <= event.created_at
            ]
        if messages and len(messages) + len(targets) > FAN_OUT_MAX_MESSAGES:
            # (at most FAN_OUT_MAX_MESSAGES a transaction, which share-locks its endpoints: 500
            # events to 850 endpoints were 425,000 rows in one, and an endpoint's delete waited;
            # the events left stay for the next fan-out, unlocked at commit)
            events = events[:events.index(event)]
            break
        messages += [
            WebhookMessage(event=event, endpoint_id=target, delivery_id=event.delivery_id, next_attempt_at=event.created_at,
                           window_started_at=event.created_at, created_at=now)
            for target in targets
        ]
    WebhookMessage.objects.bulk_create(messages, ignore_conflicts=True)
    chained = [e.seq for e in events if e.delivery_id is not None]
    if messages and chained:
        _fall_due_with_the_chain(chained)
    message_rows_for_events(events, now=now)  # the customer's SMS and e-mail, once each
    OutboxEvent.objects.filter(seq__in=[e.seq for e in events]).update(fanned_out_at=now)
    return len(events)


def _endpoints_to_fan_out_to(events: list[OutboxEvent]) -> list[WebhookEndpoint]:
    """The endpoints the events may go to (switched-off ones too: their messages wait and go
    out when switched on), each under a key-share lock, skipping any being deleted. The fan-out
    holds its events' locks; waiting here for a delete that waits for one of those events (a
    test event it deletes with its endpoint) deadlocked, and a message written for an endpoint
    deleted meanwhile broke the key at commit."""
    owners = list({e.owner_id for e in events if e.endpoint_id is None})
    own = list({e.endpoint_id for e in events if e.endpoint_id is not None})
    if not owners and not own:
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT id FROM {WebhookEndpoint._meta.db_table} "
            "WHERE (all_deliveries AND %(any_owner)s) OR owner_id = ANY(%(owners)s) OR id = ANY(%(own)s) "
            "FOR KEY SHARE SKIP LOCKED",
            {"any_owner": bool(owners), "owners": owners, "own": own},
        )
        ids = [row[0] for row in cursor.fetchall()]
    return list(WebhookEndpoint.objects.filter(pk__in=ids))


# ------------------------------------------------------------------------------ sending

# The claim: for each active endpoint, its first sendable messages in the order they fell due
# (at most `per_endpoint`, so that one endpoint's backlog cannot fill a batch), read on
# `webhook_message_turn_idx` (endpoint, due time, event), whose range is the due messages only:
# a message waiting behind an earlier one of its delivery falls due with it (`_chain_follows`,
# `_fall_due_with_the_chain`), so a failing endpoint's backlog is not walked. Of those, the
# oldest events, locked at the outer level, whose conditions PostgreSQL checks again on a row
# another sweep leased meanwhile, and whose LIMIT counts only rows it locked (a sweep beside
# another takes the next ones). Until 2026-12-06 it ranked every due message of every endpoint
# (a window function): 104 ms a claim with 100,000 due, 4 ms now (bench/webhook_claim.py,
# bench/README.md).
#
# A message `m` that may go now: pending, due, not leased, and the first of its delivery's for
# its endpoint, with none of that delivery's events still waiting for fan-out before it.
SENDABLE_SQL = """m.status = 'pending' AND m.next_attempt_at <= %(now)s
              AND (m.leased_until IS NULL OR m.leased_until < %(now)s)
              AND NOT EXISTS (
                  SELECT 1 FROM {message} p
                  WHERE p.endpoint_id = m.endpoint_id AND p.delivery_id = m.delivery_id
                    AND p.status = 'pending' AND p.event_id < m.event_id
              )
              AND NOT EXISTS (
                  SELECT 1 FROM {outbox} o
                  WHERE o.delivery_id = m.delivery_id AND o.fanned_out_at IS NULL AND o.seq < m.event_id
              )"""
_CLAIM_SQL = """
UPDATE {message} SET leased_until = %(lease)s
WHERE id IN (
    SELECT l.id FROM {message} l
    WHERE l.id IN (
        SELECT turn.id FROM {endpoint} e
        CROSS JOIN LATERAL (
            SELECT m.id FROM {message} m
            WHERE m.endpoint_id = e.id AND {sendable}
            ORDER BY m.next_attempt_at, m.event_id
            LIMIT %(per_endpoint)s
        ) turn
        WHERE e.active AND NOT (e.id = ANY(%(skip)s))
    )
      -- (again on the row itself: PostgreSQL re-checks only these on the newest version of a row
      -- changed while this statement ran; without the due time, a sweep whose snapshot predated
      -- another's claim, send and release took the message again, sent it twice within 0.1 s)
      AND l.status = 'pending' AND l.next_attempt_at <= %(now)s
      AND (l.leased_until IS NULL OR l.leased_until < %(now)s)
    ORDER BY l.event_id
    LIMIT %(limit)s
    FOR UPDATE OF l SKIP LOCKED
)
RETURNING id
"""


# An endpoint's messages a claim takes at most: a sweep sends them in turn, and one that
# times out (WEBHOOK_TIMEOUT_SECONDS) each would outlast the sweep's budget anyway.
CLAIM_PER_ENDPOINT = 5


def webhooks_claim_due(*, now: datetime, limit: int, per_endpoint: int = CLAIM_PER_ENDPOINT,
                       skip_endpoints=()) -> list[int]:
    """Lease up to `limit` due messages (see the module docstring), oldest event first, at
    most `per_endpoint` of one endpoint, none of `skip_endpoints` (those a sweep is sending)."""
    tables = {"message": WebhookMessage._meta.db_table, "endpoint": WebhookEndpoint._meta.db_table,
              "outbox": OutboxEvent._meta.db_table}
    sql = _CLAIM_SQL.format(sendable=SENDABLE_SQL.format(**tables), **tables)
    with connection.cursor() as cursor:
        cursor.execute(sql, {"now": now, "lease": now + timedelta(seconds=LEASE_SECONDS), "limit": limit,
                             "per_endpoint": per_endpoint, "skip": list(skip_endpoints)})
        return sorted(row[0] for row in cursor.fetchall())


# How many sweeps send at once (WEBHOOK_SENDING_SWEEPS, each with up to
# WEBHOOK_SEND_CONCURRENCY threads): a sweep that finds every slot taken only fans out (the
# customer messages too) and ends. Before 2026-12-07 every sweep sent: with a slow receiver,
# the beat's sweep every 15 s and each kick ran to the 30 s budget, and the worker's processes
# were all in them; customer messages, ETA refreshes and every other task of its queues waited.
SENDING_KEY = "webhooks:sending:{}"
# While it sends, a sweep fans out what was committed meanwhile, and claims more for its idle
# threads, at most this often (seconds).
TOP_UP_SECONDS = 1.0


# A sending sweep's slot expires SLOT_TTL_SECONDS after its last renewal (every
# SLOT_RENEW_SECONDS, by a thread of the holder's process): a worker killed while it sends frees
# its slot within that, not at the end of the longest sweep (45 s). A holder stuck past its
# budget stops renewing at `hold_seconds`. The slot bounds how many sweeps send, nothing more:
# two sweeps sending at once (a slot that lapsed under a frozen holder) never send one
# message twice (the claims' leases see to that).
SLOT_TTL_SECONDS = 10.0
SLOT_RENEW_SECONDS = 2.0


def _renew_slot(lock, stop: threading.Event, until: float) -> None:
    while not stop.wait(SLOT_RENEW_SECONDS) and time.monotonic() < until:
        try:
            lock.reacquire()
        except LockError:  # lapsed (Redis was unreachable longer than the TTL): another sweep may send too
            logger.warning("webhook sending slot %s lapsed while its sweep ran", lock.name)
            return
        except RedisFailed:  # (it lapses if Redis stays away: every sweep then sends, as without slots)
            logger.warning("webhook sending slot %s: could not renew it", lock.name, exc_info=True)


@contextmanager
def _sending_slot(hold_seconds: float):
    """Yields whether this sweep may send: it holds one of the WEBHOOK_SENDING_SWEEPS slots (a
    Redis lock renewed while the sweep runs, for at most `hold_seconds`, and lapsing
    SLOT_TTL_SECONDS after its holder dies). Redis failing (unreachable, read-only, out of
    memory): yes (every sweep sends, as before the slots)."""
    lock = None
    try:
        client = get_redis()
        for slot in range(max(settings.WEBHOOK_SENDING_SWEEPS, 1)):
            candidate = client.lock(SENDING_KEY.format(slot), timeout=SLOT_TTL_SECONDS, blocking=False,
                                    thread_local=False)  # (renewed from another thread)
            if candidate.acquire():
                lock = candidate
                break
        may_send = lock is not None
    except RedisFailed:  # (unreachable, read-only after a failover, out of memory)
        logger.warning("webhook sending slot: Redis failed; this sweep sends", exc_info=True)
        may_send = True
    stop = threading.Event()
    renewer = None
    if lock is not None:
        renewer = threading.Thread(target=_renew_slot, args=(lock, stop, time.monotonic() + hold_seconds),
                                   name="webhooks-slot", daemon=True)
        renewer.start()
    try:
        yield may_send
    finally:
        if renewer is not None:
            stop.set()
            renewer.join()
        if lock is not None:
            try:
                lock.release()
            except (LockError, *RedisFailed):  # lapsed, or Redis failed: it lapses
                pass


# One fan-out's share of a sweep's time. After an outage of the workers the fan-out can have many
# thousands of events to go through: gone through in slices, the sending sweep records and sends
# between them, and a sweep that may not send hands its worker back (the ETA refreshes and the
# customer messages share it) after a slice, kicking the next sweep, instead of fanning out for
# its whole budget: two such sweeps held a worker's two processes 30 s each (a live check, with
# 1.1 M messages queued), and the ETA refreshes and customer messages waited behind them.
FAN_OUT_SLICE_SECONDS = 5.0


def _fan_out_until(deadline: float) -> bool:
    """Fan out until nothing is left, `deadline` or the slice's end; whether events are left."""
    end = min(deadline, time.monotonic() + FAN_OUT_SLICE_SECONDS)
    while webhooks_fan_out(now=timezone.now()):
        if time.monotonic() >= end:
            return True
    return False


def webhooks_deliver_due(*, batch_size: int = 20, max_seconds: float | None = None) -> int:
    """Fan out, then send what is due until nothing is or `max_seconds` have passed (a task's
    time limit). Returns the number of attempts made. Safe to run in several workers at once;
    at most WEBHOOK_SENDING_SWEEPS of them send (`_sending_slot`), the others only fan out.

    Claimed messages go out in threads (up to WEBHOOK_SEND_CONCURRENCY endpoints at once),
    each endpoint's messages one after another, each outcome recorded (in this thread) as it
    comes. While one endpoint is slow, the sweep goes on fanning out and claiming for its idle
    threads (other endpoints' messages; at most every TOP_UP_SECONDS), so a slow receiver holds
    back only its own events. No attempt starts once the budget is spent, and what is left is
    released for the next sweep. (One slow endpoint, 10 s an attempt, once held every other
    endpoint's events behind its own and outran the task's time limit, which killed the worker
    mid-batch.) A sweep that ends at its budget with messages still due kicks the next one, as
    does one that left events to fan out (`FAN_OUT_SLICE_SECONDS`)."""
    budget = max_seconds if max_seconds is not None else settings.WEBHOOK_SEND_BUDGET_SECONDS
    deadline = time.monotonic() + budget
    # The fan-out commits before the slot is tried, and a sweep that held the slot looks again
    # for due messages after letting it go: a sweep that fanned out while another held the slot
    # (and found nothing to claim any more) leaves what it made to that one, which sees it.
    more_to_fan_out = _fan_out_until(deadline)
    attempts = idle_rounds = 0
    while idle_rounds < 2:
        if time.monotonic() >= deadline:  # (a claim after the budget would only be released again)
            # Messages are still due (a backlog, slow receivers) or events still to fan out: the
            # next sweep starts now (a kick, unless one is queued), not at the beat's next (≤ 15 s).
            # (Not with tasks run eagerly, in tests: the kick would run inside this sweep, and again.)
            if not current_celery_app.conf.task_always_eager:
                enqueue_kick_on_commit(DELIVER_TASK)
            break
        # (the slot is held at most until the longest attempt started just before the budget's end ends)
        with _sending_slot(budget + settings.WEBHOOK_TIMEOUT_SECONDS + 5) as may_send:
            if not may_send:
                break
            made = _Sweep(deadline=deadline, batch_size=batch_size).run()
        attempts += made
        idle_rounds = 0 if made else idle_rounds + 1
        if not webhooks_due_exist(now=timezone.now()):
            break
    if more_to_fan_out and not current_celery_app.conf.task_always_eager:
        enqueue_kick_on_commit(DELIVER_TASK)  # (a backlog's rest: the next sweep goes on with it, at once)
    return attempts


_DUE_SQL = """
SELECT EXISTS (
    SELECT 1 FROM {endpoint} e
    CROSS JOIN LATERAL (
        SELECT 1 FROM {message} m WHERE m.endpoint_id = e.id AND {sendable}
        ORDER BY m.next_attempt_at, m.event_id LIMIT 1
    ) turn
    WHERE e.active
)
"""


def webhooks_due_exist(*, now: datetime) -> bool:
    """Whether a claim now would find a message (as `webhooks_claim_due` reads them, no lock)."""
    tables = {"message": WebhookMessage._meta.db_table, "endpoint": WebhookEndpoint._meta.db_table,
              "outbox": OutboxEvent._meta.db_table}
    with connection.cursor() as cursor:
        cursor.execute(_DUE_SQL.format(sendable=SENDABLE_SQL.format(**tables), **tables), {"now": now})
        return cursor.fetchone()[0]


@dataclass(frozen=True)
class _Outgoing:
    message_id: int
    endpoint_id: object
    url: str
    webhook_id: str
    body: str
    secrets_: list[str]


def _outgoing(message_id: int) -> _Outgoing | None:
    """What a claimed message sends (no HTTP yet). None: not pending any more, or its endpoint
    was deleted after the claim (its messages went with it)."""
    message = WebhookMessage.objects.select_related("event", "endpoint").filter(pk=message_id).first()
    if message is None or message.status != MessageStatus.PENDING:
        return None
    endpoint, event = message.endpoint, message.event
    return _Outgoing(
        message_id=message_id, endpoint_id=endpoint.pk, url=endpoint.url, webhook_id=event.webhook_id,
        body=json.dumps(event.payload, separators=(",", ":"), ensure_ascii=False),
        secrets_=endpoint_signing_secrets(endpoint, now=timezone.now()),
    )


def _post(out: _Outgoing) -> HttpResult:
    """Sign (as of now) and POST: no database, so it may run in any thread. Whatever fails is
    this attempt's error (a URL stored before its checks were tightened, say), never the
    batch's."""
    started = timezone.now()  # (the attempt's date: the `webhook-timestamp` the receiver logs)
    headers = signed_headers(webhook_id=out.webhook_id, timestamp=started, body=out.body, secrets_=out.secrets_)
    try:
        result = post_json(out.url, out.body.encode("utf-8"), headers, timeout=settings.WEBHOOK_TIMEOUT_SECONDS)
    except TargetRefused as exc:
        result = HttpResult(status=None, headers={}, body=b"", duration_ms=0, error=f"refused: {exc}"[:500], sent=False)
    except Exception as exc:  # noqa: BLE001 - recorded as the attempt's failure
        logger.warning("webhook message %s: the attempt failed before sending", out.message_id, exc_info=True)
        result = HttpResult(status=None, headers={}, body=b"", duration_ms=0, error=f"{type(exc).__name__}: {exc}"[:500],
                            sent=False)
    return dataclasses.replace(result, started_at=started)


class _Sweep:
    """One sweep's sending (see `webhooks_deliver_due`): the threads only sign and POST; the
    database is read and written in this thread, each outcome as it comes."""

    def __init__(self, *, deadline: float, batch_size: int):
        self.deadline, self.batch_size = deadline, batch_size
        self.queues: dict[object, list[_Outgoing]] = {}  # endpoint → its claimed messages not started, in turn
        self.leases: dict[int, datetime] = {}  # message → the lease its claim set
        self.in_flight: set = set()  # endpoints with an attempt running
        self.attempts = 0

    def claim(self) -> int:
        """Lease due messages of the endpoints this sweep is not sending; how many."""
        waiting = sum(len(q) for q in self.queues.values())
        if waiting >= self.batch_size:
            return 0
        now = timezone.now()
        claimed = webhooks_claim_due(now=now, limit=self.batch_size - waiting,
                                     skip_endpoints=[*self.queues, *self.in_flight])
        for message_id in claimed:
            self.leases[message_id] = now + timedelta(seconds=LEASE_SECONDS)
            try:
                out = _outgoing(message_id)
            except SoftTimeLimitExceeded:
                raise  # (the task's time limit stops the sweep, not this message)
            except Exception:  # one bad message never stops the sweep; its lease expires
                logger.exception("webhook message %s could not be prepared", message_id)
                continue
            if out is not None:
                self.queues.setdefault(out.endpoint_id, []).append(out)
        return len(claimed)

    def record(self, out: _Outgoing, result: HttpResult) -> None:
        self.attempts += 1
        try:
            message_attempt_record(message_id=out.message_id, result=result, now=timezone.now())
        except SoftTimeLimitExceeded:
            raise  # (the task's time limit stops the sweep: logged as a failed record, it ran on to the hard kill)
        except Exception:  # one bad message never stops the sweep; its lease expires
            logger.exception("webhook message %s: its attempt could not be recorded", out.message_id)

    def run(self) -> int:
        if not self.claim():
            return 0
        workers = max(settings.WEBHOOK_SEND_CONCURRENCY, 1)
        try:
            self._send(workers)
        finally:
            # what was claimed and not started goes to the next sweep now, not at its lease's end
            # (the budget ran out, or a database error or the task's time limit stopped the sweep:
            # an attempt already running then goes again once its lease ends, at least once)
            unsent = [out.message_id for queue in self.queues.values() for out in queue]
            for lease in {self.leases[m] for m in unsent}:
                WebhookMessage.objects.filter(pk__in=unsent, status=MessageStatus.PENDING, leased_until=lease).update(
                    leased_until=None)
        return self.attempts

    def _send(self, workers: int) -> None:
        running = {}
        topped_up = time.monotonic()
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhooks") as pool:
            while True:
                for endpoint_id in [e for e, q in self.queues.items() if q and e not in self.in_flight]:
                    if len(running) >= workers or time.monotonic() >= self.deadline:
                        break
                    out = self.queues[endpoint_id].pop(0)
                    self.in_flight.add(endpoint_id)
                    running[pool.submit(_post, out)] = out
                self.queues = {e: q for e, q in self.queues.items() if q}
                if not running:
                    # nothing in flight: claim again (fanning out first), unless the budget is spent
                    if time.monotonic() >= self.deadline:
                        break
                    _fan_out_until(self.deadline)
                    if time.monotonic() >= self.deadline or not self.claim():  # (a slice may end at the budget)
                        break
                    continue
                done, _ = wait(running, timeout=TOP_UP_SECONDS, return_when=FIRST_COMPLETED)
                drained = False
                for future in done:
                    out = running.pop(future)
                    self.in_flight.discard(out.endpoint_id)
                    self.record(out, future.result())
                    if out.endpoint_id in self.queues:  # its next message, after the others' (in turn)
                        self.queues[out.endpoint_id] = self.queues.pop(out.endpoint_id)
                    else:
                        drained = True
                if drained and running and len(running) < workers and time.monotonic() < self.deadline:
                    # An endpoint sent all it had while another's attempt runs on: what is due to
                    # it now (a delivery's next event, due once the one before was delivered) is
                    # claimed at once. It waited for the next top-up, a second: one event a second
                    # behind a hanging receiver.
                    self.claim()
                if time.monotonic() - topped_up >= TOP_UP_SECONDS and time.monotonic() < self.deadline:
                    # an endpoint is slow: what was committed meanwhile, and the others' due messages
                    topped_up = time.monotonic()
                    _fan_out_until(self.deadline)
                    if len(running) < workers and time.monotonic() < self.deadline:
                        self.claim()


def message_send(*, message_id: int) -> WebhookAttempt | None:
    """One attempt of a claimed message: sign, POST, record the outcome. A message whose
    endpoint was deleted after the claim (its messages go with it) is not sent."""
    out = _outgoing(message_id)
    if out is None:
        return None
    return message_attempt_record(message_id=message_id, result=_post(out), now=timezone.now())


def _retryable(status: int | None) -> bool:
    return status is None or status in (408, 429) or status >= 500 or 300 <= status < 400


def retry_after_seconds(value: str | None, *, now: datetime) -> float | None:
    """`Retry-After` as seconds from now (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max((when - now).total_seconds(), 0.0)


def retry_delay(attempt_count: int, *, retry_after: float | None = None) -> timedelta:
    """Exponential backoff with jitter (±20 %), capped at `WEBHOOK_RETRY_MAX_DELAY_SECONDS`; a
    receiver's `Retry-After` wins (at least a second, at most a day)."""
    if retry_after is not None:
        return timedelta(seconds=min(max(retry_after, 1.0), 24 * 3600))
    base = settings.WEBHOOK_RETRY_BASE_SECONDS * 2 ** max(attempt_count - 1, 0)
    capped = min(base, settings.WEBHOOK_RETRY_MAX_DELAY_SECONDS)
    return timedelta(seconds=capped * random.uniform(0.8, 1.2))


@transaction.atomic
def message_attempt_record(*, message_id: int, result: HttpResult, now: datetime) -> WebhookAttempt | None:
    """Write the outcome of one attempt: delivered (2xx), stopped (a 4xx other than 408/429),
    retried later, or given up when the retry window has passed. Failures for
    `WEBHOOK_DISABLE_AFTER_SECONDS` disable the endpoint and alert ops. The endpoint deleted
    during the attempt (the message with it): nothing to record, None."""
    endpoint_id = WebhookMessage.objects.filter(pk=message_id).values_list("endpoint_id", flat=True).first()
    endpoint = WebhookEndpoint.objects.select_for_update(of=("self",), no_key=True).filter(pk=endpoint_id).first()
    if endpoint is None:  # (the endpoint first, as a delete locks it: never the other order)
        return None
    message = WebhookMessage.objects.select_for_update(of=("self",)).select_related("event").filter(pk=message_id).first()
    if message is None:
        return None
    message.attempt_count += 1
    message.leased_until = None
    message.last_status_code = result.status
    next_retry = None
    ok = result.status is not None and 200 <= result.status < 300
    if ok:
        message.status = MessageStatus.DELIVERED
        message.delivered_at = now
        message.last_error = ""
        if endpoint.failing_since is not None:
            endpoint.failing_since = None
            endpoint.save(update_fields=["failing_since"])
    else:
        error = result.error or f"HTTP {result.status}"
        message.last_error = error[:500]
        window_end = message.window_started_at + timedelta(seconds=settings.WEBHOOK_RETRY_WINDOW_SECONDS)
        if not _retryable(result.status):
            message.status = MessageStatus.FAILED
        elif now >= window_end:
            message.status = MessageStatus.FAILED
            message.last_error = f"gave up after {message.attempt_count} attempts: {error}"[:500]
        else:
            delay = retry_delay(message.attempt_count, retry_after=retry_after_seconds(result.headers.get("retry-after"), now=now))
            next_retry = min(now + delay, window_end)  # one last attempt at the end of the window
            message.next_attempt_at = next_retry
        _endpoint_failed(endpoint, error=error, now=now)
    message.save(update_fields=[
        "status", "attempt_count", "leased_until", "last_status_code", "last_error", "delivered_at", "next_attempt_at",
    ])
    _chain_follows(message, next_retry=next_retry, now=now)
    return WebhookAttempt.objects.create(
        # (when it started: the receiver got the request then, durationMs before its outcome was known)
        message=message, endpoint_id=endpoint.pk,
        attempted_at=result.started_at or now - timedelta(milliseconds=result.duration_ms),
        status_code=result.status,
        duration_ms=result.duration_ms, error=(result.error or ("" if ok else f"HTTP {result.status}"))[:500],
        next_retry_at=next_retry,
    )


# Each new message takes the due time of the last pending message of its delivery for its
# endpoint written before this batch (`webhook_message_chain_idx`, read backwards: one entry),
# which follows the first of them (`_chain_follows`); the batch's own earlier messages of that
# delivery are due at once and are not asked. Not quite always the latest of them: once the
# first is delivered, a later one with attempts of its own keeps its backoff while those after
# it fall due, and a new message then falls due at once too; the claim's "earlier event
# pending?" check holds it back all the same (order is kept; the claim reads one more row).
# Until 2026-12-06 it took the latest due time of all of them (a join grouped per new
# message): its cost grew with the chain, 0.5 s for 20 events when each delivery had 500
# events waiting for an endpoint that did not answer (bench/webhook_fan_out.py, bench/README.md).
_FALL_DUE_WITH_THE_CHAIN_SQL = """
UPDATE {message} m SET next_attempt_at = h.due
FROM (
    SELECT n.id, p.due
    FROM {message} n
    CROSS JOIN LATERAL (
        SELECT q.next_attempt_at AS due FROM {message} q
        WHERE q.endpoint_id = n.endpoint_id AND q.delivery_id = n.delivery_id
          AND q.status = 'pending' AND q.event_id < %(first)s
        ORDER BY q.event_id DESC
        LIMIT 1
    ) p
    WHERE n.event_id = ANY(%(events)s) AND n.status = 'pending' AND n.delivery_id IS NOT NULL
) h
WHERE m.id = h.id AND h.due > m.next_attempt_at
"""


def _fall_due_with_the_chain(event_seqs: list[int]) -> None:
    """New messages behind an earlier pending one of their delivery (which is backing off) fall
    due with it, not at once (`_chain_follows`, for messages made while it waits)."""
    with connection.cursor() as cursor:
        cursor.execute(_FALL_DUE_WITH_THE_CHAIN_SQL.format(message=WebhookMessage._meta.db_table),
                       {"events": event_seqs, "first": min(event_seqs)})


def _chain_follows(message: WebhookMessage, *, next_retry: datetime | None, now: datetime) -> None:
    """The later pending messages of the message's delivery for its endpoint wait for it (the
    claim's "earlier event pending?" check); their due time follows it, so that the claim,
    which reads the due ones only, does not walk them while it backs off: pushed to its next
    attempt, and due now again once it is delivered or stopped (those never attempted; one
    with attempts of its own keeps its backoff)."""
    if message.delivery_id is None:
        return
    later = WebhookMessage.objects.filter(endpoint_id=message.endpoint_id, delivery_id=message.delivery_id,
                                          status=MessageStatus.PENDING, event_id__gt=message.event_id)
    if next_retry is not None:
        later.filter(next_attempt_at__lt=next_retry).update(next_attempt_at=next_retry)
    else:
        later.filter(next_attempt_at__gt=now, attempt_count=0).update(next_attempt_at=now)


def _endpoint_failed(endpoint: WebhookEndpoint, *, error: str, now: datetime) -> None:
    """The caller holds the endpoint's lock."""
    if endpoint.failing_since is None:
        endpoint.failing_since = now
        endpoint.save(update_fields=["failing_since"])
        return
    if endpoint.active and now - endpoint.failing_since >= timedelta(seconds=settings.WEBHOOK_DISABLE_AFTER_SECONDS):
        endpoint.active = False
        endpoint.disabled_at = now
        endpoint.disabled_reason = "failing for 24 h"
        endpoint.drop_warned_at = None
        endpoint.save(update_fields=["active", "disabled_at", "disabled_reason", "drop_warned_at"])
        hours = int((now - endpoint.failing_since).total_seconds() // 3600)
        alerts.ops_alert_on_commit(
            subject=f"[dispatch] webhook endpoint disabled: {endpoint.url}",
            body="\n".join([
                f"The webhook endpoint {endpoint.url} ({endpoint.pk}) of {endpoint.owner} has failed for {hours} h",
                f"(since {iso(endpoint.failing_since)}) and was disabled at {iso(now)}.",
                f"Last error: {error}",
                "Its pending events wait; enable it again (API PATCH active=true or the admin) to send them.",
                f"Events still waiting {settings.WEBHOOK_RETENTION_DAYS} days after they were queued are dropped "
                "(another alert comes before).",
                f"Admin: {settings.SITE_URL.rstrip('/')}/admin/notifications/webhookendpoint/{endpoint.pk}/change/",
            ]),
        )


# ------------------------------------------------------------------------------ replay, purge


@transaction.atomic
def messages_replay(*, message_ids, now: datetime | None = None) -> int:
    """Send these messages again (same event, same `webhook-id`), now, with a fresh retry
    window and backoff (`attempt_count` counts the window's attempts; the attempts' rows keep
    the history). Returns how many were queued."""
    now = now or timezone.now()
    count = WebhookMessage.objects.filter(pk__in=list(message_ids)).update(
        status=MessageStatus.PENDING, next_attempt_at=now, window_started_at=now, leased_until=None, attempt_count=0,
    )
    if count:
        enqueue_kick_on_commit(DELIVER_TASK)
    return count


def endpoint_replay_failed(*, endpoint_id, since: datetime, now: datetime | None = None) -> int:
    """Replay every failed message of the endpoint whose event was written since `since`."""
    ids = WebhookMessage.objects.filter(
        endpoint_id=endpoint_id, status=MessageStatus.FAILED, event__created_at__gte=since
    ).values_list("pk", flat=True)
    return messages_replay(message_ids=list(ids), now=now)


def webhooks_purge(*, now: datetime | None = None, batch_size: int = 5000, max_seconds: float = 30.0) -> int:
    """Delete outbox events older than `WEBHOOK_RETENTION_DAYS` with nothing left to send
    (their messages and attempts go with them), after giving up the messages a switched-off
    endpoint has kept waiting that long (`_switched_off_give_up`). Returns the events purged.
    Stops after the batch that passes `max_seconds` (within the task's time limit); the next
    run goes on."""
    deadline = time.monotonic() + max_seconds
    now = now or timezone.now()
    cutoff = now - timedelta(days=settings.WEBHOOK_RETENTION_DAYS)
    _switched_off_warn(cutoff=cutoff, now=now)
    _switched_off_give_up(cutoff=cutoff, batch_size=batch_size, deadline=deadline)
    old = (
        OutboxEvent.objects.filter(created_at__lt=cutoff, fanned_out_at__isnull=False)
        .exclude(messages__status=MessageStatus.PENDING)
        .values_list("seq", flat=True)
    )
    purged = 0
    while True:  # (in batches until none is left: one batch an hour fell behind 5,000 events an hour)
        _, by_model = OutboxEvent.objects.filter(seq__in=list(old[:batch_size])).delete()
        count = by_model.get(OutboxEvent._meta.label, 0)
        purged += count
        if count < batch_size or time.monotonic() >= deadline:
            return purged


DROP_WARNING = timedelta(days=2)


def _switched_off_warn(*, cutoff: datetime, now: datetime) -> int:
    """Ops are told, by the alert channels, when a switched-off endpoint has messages that the
    purge will give up within DROP_WARNING (at most half the retention): how many events wait
    in all, how many go by then, and when the first and the last of those waiting now go. The
    alert covers every message waiting at that moment (`drop_warned_at`); messages queued (or
    replayed) after it get one of their own when they come as close, so an endpoint left off is
    reminded about every `WEBHOOK_RETENTION_DAYS - 2` days while it keeps losing events. Read
    per switched-off endpoint (few), on the pending messages' endpoint index; the endpoint is
    locked first (`SKIP LOCKED`: one being changed is warned by the next run). Returns how many
    endpoints were warned."""
    days = settings.WEBHOOK_RETENTION_DAYS
    ahead = min(DROP_WARNING, timedelta(days=days) / 2)
    warned = 0
    for endpoint_id in WebhookEndpoint.objects.filter(active=False).values_list("pk", flat=True):
        with transaction.atomic():
            endpoint = WebhookEndpoint.objects.select_for_update(of=("self",), no_key=True, skip_locked=True).filter(
                pk=endpoint_id, active=False).select_related("owner").first()
            if endpoint is None:
                continue  # switched on, deleted or being changed meanwhile
            waiting = WebhookMessage.objects.filter(endpoint_id=endpoint.pk, status=MessageStatus.PENDING)
            soon = waiting.filter(window_started_at__lt=cutoff + ahead)
            if endpoint.drop_warned_at is not None:
                soon = soon.filter(window_started_at__gt=endpoint.drop_warned_at)  # (the last alert covered the rest)
            if not soon.exists():
                continue
            span = waiting.aggregate(total=Count("pk"), first=Min("window_started_at"), last=Max("window_started_at"))
            going = waiting.filter(window_started_at__lt=cutoff + ahead).count()
            endpoint.drop_warned_at = now
            endpoint.save(update_fields=["drop_warned_at"])
            first_at = max(span["first"] + timedelta(days=days), now)
            last_at = max(span["last"] + timedelta(days=days), now)
            alerts.ops_alert_on_commit(
                subject=f"[dispatch] webhook events about to be dropped: {endpoint.url}",
                body="\n".join([
                    f"The webhook endpoint {endpoint.url} ({endpoint.pk}) of {endpoint.owner} is switched off "
                    f"({endpoint.disabled_reason or 'switched off'}, since {iso(endpoint.disabled_at) if endpoint.disabled_at else 'unknown'}).",
                    f"{span['total']} of its events are waiting. The hourly purge drops each once it has waited {days} days "
                    f"since it was queued: {going} by {iso(now + ahead)}, the first at {iso(first_at)}, the last of those "
                    f"waiting now at {iso(last_at)} (each within the hour after).",
                    "Switch it on (API PATCH active=true or the admin) to send them, or delete it if it is gone for good.",
                    f"Admin: {settings.SITE_URL.rstrip('/')}/admin/notifications/webhookendpoint/{endpoint.pk}/change/",
                ]),
            )
            logger.warning("webhooks: %s messages of the switched-off endpoint %s (%s) are dropped from %s to %s",
                           span["total"], endpoint.pk, endpoint.url, iso(first_at), iso(last_at))
            warned += 1
    return warned


def _switched_off_give_up(*, cutoff: datetime, batch_size: int, deadline: float) -> int:
    """A switched-off endpoint's messages wait for it to be switched on again; those queued
    (or replayed) before `cutoff` are given up (`failed`), so that an endpoint left off does not
    keep every event from then on for ever. Their events are then as old as the retention, and
    the purge that follows deletes them (unless another endpoint still has one pending): a
    warning per endpoint says how many went. The endpoint is locked first, then its messages
    (the order of every write to them); one switched on meanwhile keeps its messages. Returns
    how many."""
    given_up = 0
    stale = WebhookMessage.objects.filter(status=MessageStatus.PENDING, window_started_at__lt=cutoff)
    endpoint_ids = list(WebhookEndpoint.objects.filter(active=False).values_list("pk", flat=True))
    for endpoint_id in endpoint_ids:
        while time.monotonic() < deadline:
            with transaction.atomic():
                endpoint = WebhookEndpoint.objects.select_for_update(of=("self",), no_key=True, skip_locked=True).filter(
                    pk=endpoint_id, active=False).first()
                if endpoint is None:  # switched on, deleted, or being changed: the next run
                    break
                batch = stale.filter(endpoint_id=endpoint_id).values("pk")[:batch_size]
                count = WebhookMessage.objects.filter(pk__in=batch).update(
                    status=MessageStatus.FAILED, leased_until=None,
                    last_error=f"gave up: waited {settings.WEBHOOK_RETENTION_DAYS} days for a switched-off endpoint",
                )
            given_up += count
            if count:
                logger.warning("webhooks: gave up %s messages queued before %s for the switched-off endpoint %s (%s)",
                               count, iso(cutoff), endpoint.pk, endpoint.url)
            if count < batch_size:
                break
    return given_up


# ------------------------------------------------------------------------------ push devices


PUSH_DEVICES_PER_DRIVER = 10


def device_register(*, driver, platform: str, token: str, now: datetime | None = None) -> tuple[PushDevice, bool]:
    """Register the driver's device for push; (device, created). A token already registered
    (by this driver, or by another who had the phone before) becomes this driver's. The token
    is unique in the database: of two registrations racing, `update_or_create` turns the
    loser's IntegrityError into an update."""
    with transaction.atomic():
        # One registration of a driver at a time (not its row lock, which offers take): two at
        # once each trimmed what it saw without the other's new device, and left 11.
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", [f"push.devices:{driver.pk}"])
        now = now or timezone.now()  # (after the lock: the one that waited is the newer)
        device, created = PushDevice.objects.update_or_create(
            token=token, defaults={"driver": driver, "platform": platform, "last_seen_at": now},
            create_defaults={"driver": driver, "platform": platform, "created_at": now, "last_seen_at": now},
        )
        # A driver keeps its PUSH_DEVICES_PER_DRIVER most recently registered devices: every offer is
        # pushed to each (one FCM call apiece), and an app that registers a new token on every start
        # would otherwise pile them up. The one just registered is always kept.
        kept = PushDevice.objects.filter(driver=driver).order_by("-last_seen_at", "-id").values("pk")[:PUSH_DEVICES_PER_DRIVER]
        PushDevice.objects.filter(driver=driver).exclude(pk=device.pk).exclude(pk__in=kept).delete()
    return device, created


def device_delete(*, driver_id, device_id) -> None:
    """Remove one of the driver's devices (another driver's is a NotFound)."""
    deleted, _ = PushDevice.objects.filter(pk=device_id, driver_id=driver_id).delete()
    if not deleted:
        raise NotFound("Device not found.")
