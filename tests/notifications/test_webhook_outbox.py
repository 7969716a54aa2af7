"""The transactional outbox and the sender, against a real HTTP receiver on 127.0.0.1 that
checks every request with the Standard Webhooks library: events are written with the change,
signed, delivered at least once with a stable webhook-id, in order per delivery, retried with
backoff (and Retry-After) through an outage, never lost when Redis, the worker or the receiver
is down."""
from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import time_machine
from django.db import connection, transaction
from django.utils import timezone

from common.actors import Actor
from common.exceptions import Conflict
from dispatch.models import Delivery
from notifications import services
from notifications.models import MessageStatus, OutboxEvent, WebhookAttempt, WebhookEndpoint, WebhookMessage
from tests.api import client_for
from tests.factories import CITY, DeliveryFactory, IntegrationUserFactory, driver_at_dropoff, online_driver
from tests.notifications.receiver import Answer
from tests.notifications.webhook_helpers import delivery_walk, endpoint_via_api, messages_of, sweep
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_delivery_reaches_its_merchant_signed_and_in_order(receiver):
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    body = {"sellerOrderId": "ORD-WH-1", "storeName": "Corner Shop", "autoDispatch": False,
            "pickupLocation": {"lat": CITY[0], "lon": CITY[1]}, "dropoffLocation": {"lat": CITY[0] + 0.01, "lon": CITY[1]}}
    created = client_for(merchant).post("/v2/deliveries", body, format="json")
    assert created.status_code == 201
    delivery = Delivery.objects.get(pk=created.json()["id"])
    driver = online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    for step in ("pickup-started", "pickup-completed", "delivery-started", "delivery-completed"):
        if step == "delivery-completed":
            driver_at_dropoff(driver, delivery)
        flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))

    # Celery runs eagerly in tests: each commit's task has sent its events already
    payloads = [r.verified(secret) for r in receiver.requests]
    assert [p["type"] for p in payloads] == [
        "delivery.created", "delivery.assigned", *["delivery.status_changed"] * 4,
    ]
    assert [p["data"]["status"] for p in payloads] == ["ready", "assigned", "assigned", "picked_up", "in_transit", "delivered"]
    assert [p["data"]["change"].get("fromStatus") for p in payloads[1:]] == [
        "ready", "assigned", "assigned", "picked_up", "in_transit",
    ]
    assert payloads[2]["data"]["change"]["step"] == "pickup_started"  # no status change, still told
    assert payloads[1]["data"]["driverId"] == str(driver.pk)
    assert all(p["data"]["id"] == str(delivery.pk) and p["data"]["sellerOrderId"] == "ORD-WH-1" for p in payloads)
    assert len({r.headers["webhook-id"] for r in receiver.requests}) == 6
    assert all(p["id"] == r.headers["webhook-id"] for p, r in zip(payloads, receiver.requests))
    assert all(m.status == MessageStatus.DELIVERED for m in messages_of(delivery))


def test_the_outbox_row_commits_with_the_change_or_not_at_all(receiver):
    merchant = IntegrationUserFactory()
    endpoint_via_api(merchant, receiver.url)
    delivery, driver = delivery_walk(merchant)
    before = OutboxEvent.objects.count()

    with pytest.raises(Conflict):
        flows.delivery_cancel(delivery_id=delivery.pk, reason="too late", actor=Actor.system())  # delivered: refused

    with pytest.raises(RuntimeError):
        with transaction.atomic():
            other = DeliveryFactory(created_by=merchant)
            flows.delivery_cancel(delivery_id=other.pk, reason="changed mind", actor=Actor.system())
            assert OutboxEvent.objects.filter(delivery=other).count() == 1  # written inside the transaction
            raise RuntimeError("the caller's transaction rolls back")

    assert OutboxEvent.objects.count() == before
    assert len(receiver.requests) == 5  # assigned, pickup started, picked up, in transit, delivered


def test_events_wait_through_an_outage_and_arrive_in_order_with_the_same_ids(receiver, settings):
    """The receiver is down (503, then a timeout, then a refused connection) for the first
    events; the later events of the same delivery wait behind the first, which is retried with
    backoff until the receiver is back; then all arrive in order."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 0.5
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    receiver.answer(Answer(503), Answer(200, delay=1.5), Answer(502))

    start = timezone.now()
    with time_machine.travel(start, tick=True) as clock:
        delivery, _ = delivery_walk(merchant)
        first = messages_of(delivery)[0]
        # the first event failed (503) at commit; the others were not sent past it
        assert [r.verified(secret)["data"]["status"] for r in receiver.requests] == ["assigned"]
        assert all(m.status == MessageStatus.PENDING for m in messages_of(delivery))

        # the later ones fall due with the first (the claim reads due messages only: a failing
        # endpoint's blocked backlog was walked on every claim)
        first.refresh_from_db()
        assert {m.next_attempt_at for m in messages_of(delivery)} == {first.next_attempt_at}

        for _ in range(8):  # the receiver is back after the scripted failures
            first.refresh_from_db()
            clock.move_to(first.next_attempt_at + timedelta(seconds=1))
            sweep()
            if all(m.status == MessageStatus.DELIVERED for m in messages_of(delivery)):
                break
            first.refresh_from_db()
            if first.status == MessageStatus.PENDING:  # failed again: the later ones pushed with it
                assert {m.next_attempt_at for m in messages_of(delivery)} == {first.next_attempt_at}

    statuses = [m.status for m in messages_of(delivery)]
    assert statuses == [MessageStatus.DELIVERED] * 5
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    first_id = messages_of(delivery)[0].event.webhook_id
    assert ids[:4] == [first_id] * 4  # 503, timeout (the receiver got it anyway), 502, 200: one id throughout
    delivered_after = [r.verified(secret)["data"]["status"] for r in receiver.requests[3:]]
    assert delivered_after == ["assigned", "assigned", "picked_up", "in_transit", "delivered"]  # 2nd: pickup started
    attempts = list(WebhookAttempt.objects.filter(message=first).order_by("attempted_at"))
    assert [a.status_code for a in attempts] == [503, None, 502, 200]
    assert "timeout" in attempts[1].error
    gaps = [(b.attempted_at - a.attempted_at).total_seconds() for a, b in zip(attempts, attempts[1:])]
    assert gaps[0] >= settings.WEBHOOK_RETRY_BASE_SECONDS * 0.8 and gaps[1] >= gaps[0] * 1.2  # exponential


def test_events_fanned_out_together_behind_a_backing_off_one_all_fall_due_with_it():
    """One fan-out batch with three events of a delivery whose first message backs off for an
    hour, and one of another delivery: the three wait the hour with it (the batch's own earlier
    messages of the delivery are due at once and set nothing), the other is due at once."""
    merchant = IntegrationUserFactory()
    endpoint = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://chain.example.com/h", events=["*"])
    waiting, other = DeliveryFactory(created_by=merchant), DeliveryFactory(created_by=merchant)
    now = timezone.now()

    def event(delivery, at):
        return OutboxEvent.objects.create(type="delivery.eta_updated", delivery=delivery, owner=merchant, payload={},
                                          created_at=at)

    event(waiting, now)
    services.webhooks_fan_out(now=now)
    WebhookMessage.objects.filter(endpoint=endpoint).update(attempt_count=1, next_attempt_at=now + timedelta(hours=1))
    later = [event(waiting, now + timedelta(seconds=s)) for s in (1, 2, 3)]
    elsewhere = event(other, now + timedelta(seconds=4))

    assert services.webhooks_fan_out(now=now + timedelta(seconds=5)) == 4

    due = dict(WebhookMessage.objects.filter(endpoint=endpoint).values_list("event_id", "next_attempt_at"))
    assert [due[e.seq] for e in later] == [now + timedelta(hours=1)] * 3
    assert due[elsewhere.seq] == elsewhere.created_at


def test_retry_after_from_the_receiver_is_honoured(receiver):
    merchant = IntegrationUserFactory()
    endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    receiver.answer(Answer(429, headers={"Retry-After": "600"}))
    now = timezone.now()
    with time_machine.travel(now, tick=False):
        delivery, _ = delivery_walk(merchant, steps=())
    (message,) = messages_of(delivery)
    assert message.status == MessageStatus.PENDING
    assert message.next_attempt_at == now + timedelta(seconds=600)
    with time_machine.travel(now + timedelta(seconds=599), tick=False):
        assert sweep() == 0
    with time_machine.travel(now + timedelta(seconds=601), tick=False):
        assert sweep() == 1
    message.refresh_from_db()
    assert message.status == MessageStatus.DELIVERED


def test_a_4xx_stops_that_event_and_the_next_ones_go_on(receiver):
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    receiver.answer(Answer(400))
    delivery, _ = delivery_walk(merchant, steps=("pickup-started", "pickup-completed"))
    first, *later = messages_of(delivery)  # assigned, then pickup started and picked up
    assert (first.status, first.last_status_code) == (MessageStatus.FAILED, 400)
    assert [m.status for m in later] == [MessageStatus.DELIVERED] * 2
    assert len(receiver.requests) == 3


def test_an_event_written_while_redis_is_down_goes_out_with_the_sweep(receiver, broker_down):
    """The broker is unreachable at commit: the enqueue fails (logged), the change and its
    outbox row are committed all the same, and the periodic sweep sends it."""
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    delivery, _ = delivery_walk(merchant, steps=())
    assert Delivery.objects.get(pk=delivery.pk).status == "assigned"
    assert receiver.requests == []
    assert sweep() == 1
    assert receiver.requests[0].verified(secret)["type"] == "delivery.assigned"


def test_a_worker_killed_after_claiming_leaves_the_event_to_the_sweep(receiver, no_worker):
    """A worker leased the message and died before sending: nothing goes out until the lease
    has run out, then the sweep sends it, once."""
    merchant = IntegrationUserFactory()
    endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    delivery, _ = delivery_walk(merchant, steps=())
    now = timezone.now()
    services.webhooks_fan_out(now=now)
    claimed = services.webhooks_claim_due(now=now, limit=10)  # ... and the worker dies here
    assert len(claimed) == 1
    assert sweep() == 0  # leased
    with time_machine.travel(now + timedelta(seconds=services.LEASE_SECONDS + 1), tick=False):
        assert sweep() == 1
    assert len(receiver.requests) == 1


def test_an_endpoint_deleted_after_its_messages_were_claimed_is_sent_nothing(receiver, no_worker, caplog):
    """The merchant deletes the endpoint while a worker holds its claimed messages (they go
    with it): nothing is sent and nothing is logged as an error. Before: one traceback per
    message ("could not be sent", DoesNotExist)."""
    merchant = IntegrationUserFactory()
    endpoint, _ = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    delivery_walk(merchant, steps=())
    now = timezone.now()
    services.webhooks_fan_out(now=now)
    claimed = services.webhooks_claim_due(now=now, limit=10)
    assert len(claimed) == 1
    WebhookEndpoint.objects.filter(pk=endpoint).delete()

    with caplog.at_level("ERROR"):
        assert services.message_send(message_id=claimed[0]) is None
    assert receiver.requests == [] and not [r for r in caplog.records if r.levelname == "ERROR"]


def test_two_workers_sweeping_at_once_send_each_event_once_and_in_order(receiver, no_worker):
    merchant = IntegrationUserFactory()
    _, secret = endpoint_via_api(merchant, receiver.url)
    walked = [delivery_walk(merchant)[0] for _ in range(3)]
    barrier = threading.Barrier(2)
    errors = []

    def worker():
        try:
            barrier.wait()
            services.webhooks_deliver_due(max_seconds=20)
        except Exception as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    ids = [r.headers["webhook-id"] for r in receiver.requests]
    assert len(ids) == len(set(ids)) == 15
    for delivery in walked:
        mine = [r.verified(secret) for r in receiver.requests if r.json()["data"]["id"] == str(delivery.pk)]
        assert [p["data"]["status"] for p in mine] == ["assigned", "assigned", "picked_up", "in_transit", "delivered"]


def test_an_endpoint_failing_for_a_day_is_disabled_and_ops_are_told(receiver, settings):
    chat = type(receiver)()
    try:
        settings.OPS_ALERT_CHAT_WEBHOOK_URL = chat.url
        merchant = IntegrationUserFactory()
        endpoint_id, _ = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
        receiver.default = Answer(500)
        start = timezone.now()
        with time_machine.travel(start, tick=False) as clock:
            delivery, _ = delivery_walk(merchant, steps=())
            (message,) = messages_of(delivery)
            while True:
                message.refresh_from_db()
                if message.status != MessageStatus.PENDING:
                    break
                clock.move_to(message.next_attempt_at)
                sweep()
        endpoint = WebhookEndpoint.objects.get(pk=endpoint_id)
        assert not endpoint.active and endpoint.disabled_reason == "failing for 24 h"
        assert endpoint.disabled_at - start >= timedelta(hours=24)
        assert message.status == MessageStatus.FAILED and message.last_error.startswith("gave up")
        attempts = list(WebhookAttempt.objects.filter(message=message).order_by("attempted_at"))
        assert attempts[-1].attempted_at - attempts[0].attempted_at >= timedelta(hours=24)
        assert 10 <= len(attempts) <= 40
        (alert,) = chat.requests
        assert "webhook endpoint disabled" in alert.json()["text"] and receiver.url in alert.json()["text"]
        assert "waiting 14 days after they were queued are dropped" in alert.json()["text"]  # (the purge's rule)
    finally:
        chat.close()


def test_replay_sends_a_failed_event_again_with_the_same_id(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, secret = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    receiver.answer(Answer(410))
    delivery, _ = delivery_walk(merchant, steps=())
    (message,) = messages_of(delivery)
    assert message.status == MessageStatus.FAILED
    since = message.event.created_at - timedelta(seconds=1)
    assert services.endpoint_replay_failed(endpoint_id=endpoint_id, since=since) == 1
    message.refresh_from_db()
    assert message.status == MessageStatus.DELIVERED
    assert [r.headers["webhook-id"] for r in receiver.requests] == [message.event.webhook_id] * 2


def test_a_replay_starts_the_backoff_again(receiver, settings):
    """A replay restarted the retry window but not the backoff: a message with five attempts
    behind it was retried 4–5 minutes after its replay failed, not 10 s."""
    merchant = IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    receiver.answer(Answer(410))
    delivery, _ = delivery_walk(merchant, steps=())
    (message,) = messages_of(delivery)
    WebhookMessage.objects.filter(pk=message.pk).update(attempt_count=5)
    receiver.answer(Answer(503))
    now = timezone.now()
    with time_machine.travel(now, tick=False):
        services.messages_replay(message_ids=[message.pk])
    message.refresh_from_db()
    assert message.status == MessageStatus.PENDING and message.attempt_count == 1  # the replay's own attempt
    assert message.next_attempt_at - now <= timedelta(seconds=settings.WEBHOOK_RETRY_BASE_SECONDS * 1.2)
    assert WebhookAttempt.objects.filter(message=message).count() == 2  # (the history kept)
