"""Receivers that take their time: one slow endpoint does not hold the others' events (a sweep
sends each endpoint in its own thread, stops at its budget and releases what it did not send),
and a receiver trickling its answer is cut off at the timeout."""
from __future__ import annotations

import socket
import threading
import time
import types

import pytest
from django.utils import timezone

from notifications import services
from notifications.egress import post_json
from notifications.models import MessageStatus, WebhookAttempt, WebhookMessage
from tests.factories import IntegrationUserFactory
from tests.notifications.receiver import Answer, Receiver

pytestmark = pytest.mark.django_db


def test_a_slow_endpoint_does_not_hold_another_endpoints_event_and_the_sweep_keeps_its_budget(receiver, settings):
    settings.WEBHOOK_TIMEOUT_SECONDS = 3.0
    merchant = IntegrationUserFactory()
    slow_receiver = Receiver()
    slow_receiver.default = Answer(delay=5)  # every attempt times out (3 s)
    try:
        slow = services.endpoint_create(owner=merchant, all_deliveries=False, url=slow_receiver.url, events=["*"])
        fast = services.endpoint_create(owner=merchant, all_deliveries=False, url=receiver.url, events=["*"])
        for _ in range(6):
            services.endpoint_send_test(endpoint_id=slow.pk)
        services.endpoint_send_test(endpoint_id=fast.pk)  # the newest event of all

        attempts = services.webhooks_deliver_due(max_seconds=1.5)  # (the fast one's attempt starts well within it)

        # The fast endpoint got its event in the same sweep; the slow one had one attempt (its
        # thread starts none after the budget), not six in a row (it held the fast one ~6 s).
        assert len(receiver.requests) == 1
        assert WebhookAttempt.objects.filter(message__endpoint=slow).count() == 1
        assert attempts == 2
        # the claimed messages it did not send are free for the next sweep at once (no lease)
        waiting = WebhookMessage.objects.filter(endpoint=slow, status=MessageStatus.PENDING, attempt_count=0)
        assert waiting.count() == 5 and not waiting.filter(leased_until__isnull=False).exists()
    finally:
        slow_receiver.close()


def test_a_claim_takes_at_most_a_few_messages_of_one_endpoint():
    merchant = IntegrationUserFactory()
    busy = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://busy.example.com/h", events=["*"])
    other = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://other.example.com/h", events=["*"])
    for _ in range(services.CLAIM_PER_ENDPOINT + 4):
        services.endpoint_send_test(endpoint_id=busy.pk)
    services.endpoint_send_test(endpoint_id=other.pk)
    while services.webhooks_fan_out(now=timezone.now()):
        pass

    claimed = services.webhooks_claim_due(now=timezone.now(), limit=20)

    by_endpoint = list(WebhookMessage.objects.filter(pk__in=claimed).values_list("endpoint_id", flat=True))
    assert by_endpoint.count(busy.pk) == services.CLAIM_PER_ENDPOINT and by_endpoint.count(other.pk) == 1


def test_an_answer_trickled_a_byte_at_a_time_is_cut_off_at_the_timeout():
    """The socket timeout bounds each read: 200, Content-Length 4096, then a byte every 0.3 s
    kept an attempt (and a worker) for as long as the receiver liked."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def trickle():
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n")
            deadline = time.monotonic() + 5  # (then it hangs up: an old client got an IncompleteRead)
            while not stop.is_set() and time.monotonic() < deadline:
                try:
                    conn.sendall(b"x")
                except OSError:
                    return
                time.sleep(0.3)

    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    try:
        result = post_json(f"http://127.0.0.1:{listener.getsockname()[1]}/h", b"{}", {}, timeout=1.0)
    finally:
        stop.set()
        listener.close()

    assert result.status is None and result.error == "timeout: no complete answer within 1 s"
    assert result.duration_ms < 4000  # (cut off at 1 s, not when the receiver hung up)


def test_a_look_up_that_used_up_the_time_sends_nothing(receiver, monkeypatch):
    """The watchdog started after the DNS look-up: a slow one set it off before the connection
    existed, the request then went out whole, and its 200 was recorded as a timeout (and sent
    again)."""
    from notifications import egress

    real = egress.resolve_checked

    def slow(host, port, **kwargs):
        time.sleep(1.2)
        return real(host, port, **kwargs)

    monkeypatch.setattr(egress, "resolve_checked", slow)

    result = post_json(receiver.url, b"{}", {}, timeout=1.0)

    assert result.error == "timeout: could not connect within 1 s" and not result.sent and receiver.requests == []


def test_a_name_whose_dns_does_not_answer_is_given_up_at_the_timeout(monkeypatch):
    """`getaddrinfo` cannot be interrupted and was waited for whole: a receiver whose name
    server does not answer held the sender's thread for as long as the resolver retried. Now the
    attempt gives the look-up up at its timeout, and attempts for the same name meanwhile share
    the one look-up still running."""
    release, returned, calls = threading.Event(), threading.Event(), []
    real = socket.getaddrinfo

    def hanging(host, *args, **kwargs):
        if host != "hangs.example.com":
            return real(host, *args, **kwargs)
        calls.append(host)
        release.wait(5)
        returned.set()
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        results = [post_json("http://hangs.example.com/hook", b"{}", {}, timeout=0.3) for _ in range(3)]
        still_looking_up = not returned.is_set()
    finally:
        release.set()

    assert still_looking_up
    assert [(r.status, r.error) for r in results] == [
        (None, "DNS lookup timed out: no answer for hangs.example.com within 0.3 s")] * 3
    assert calls == ["hangs.example.com"]
    for thread in threading.enumerate():
        if thread.name == "webhook DNS hangs.example.com":
            thread.join(5)
    # the next attempt, once that look-up has ended, looks up again
    # (EAI_AGAIN: the resolver failing, which says nothing of the name, retried)
    assert post_json("http://hangs.example.com/hook", b"{}", {}, timeout=1).error == (
        "DNS lookup failed temporarily; it is tried again.")
    assert calls == ["hangs.example.com"] * 2


def test_a_sweep_stops_fanning_out_once_its_budget_is_spent(monkeypatch):
    """Fan-out batches of an outbox backlog (each 10 s here) stop at the sweep's budget, and
    nothing is claimed after them. In slices (FAN_OUT_SLICE_SECONDS), a sweep claims what a
    slice made and leaves the rest to the next (kicked: tests/notifications/test_webhook_kicks.py).
    The fan-out and the clock are stand-ins: time-machine does not move `time.monotonic`, and a
    real backlog slow enough would make a slow test."""
    clock, batches, claims = [0.0], [], []

    def fan_out(now):
        batches.append(now)
        clock[0] += 10.0
        return 500 if len(batches) < 10 else 0

    def claim_due(**kwargs):
        if clock[0] >= 25:
            pytest.fail("claimed past the budget")
        claims.append(clock[0])
        return []

    monkeypatch.setattr(services, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    monkeypatch.setattr(services, "webhooks_fan_out", fan_out)
    monkeypatch.setattr(services, "webhooks_claim_due", claim_due)
    monkeypatch.setattr(services, "FAN_OUT_SLICE_SECONDS", 100.0)  # (a slice longer than the budget)

    assert services.webhooks_deliver_due(max_seconds=25) == 0
    assert len(batches) == 3 and claims == []

    clock[0], batches[:] = 0.0, []
    monkeypatch.setattr(services, "FAN_OUT_SLICE_SECONDS", 5.0)  # a slice, then what it made is claimed
    assert services.webhooks_deliver_due(max_seconds=25) == 0
    assert len(batches) == 1 and claims and all(at < 25 for at in claims)


def test_a_hanging_endpoint_does_not_slow_another_endpoints_events_of_one_delivery(receiver, settings, monkeypatch):
    """One delivery's events go to an endpoint in order, each due once the one before it is
    delivered. While another endpoint's attempt hung, the next was claimed only at the sweep's
    next top-up (every second): 13 events of a quick flow took 10 s instead of 1 (an audit). The
    top-ups are put out of reach here: the fast endpoint gets all four within the budget only
    if a finished attempt's successor is claimed when it finishes."""
    from common.actors import Actor
    from tests.factories import DeliveryFactory, online_driver
    from workflows import deliveries as flows

    settings.WEBHOOK_TIMEOUT_SECONDS = 4.0
    monkeypatch.setattr(services, "TOP_UP_SECONDS", 60.0)
    merchant = IntegrationUserFactory()
    hanging = Receiver()
    hanging.default = Answer(delay=6)  # (cut at 4 s: after the sweep's budget)
    try:
        services.endpoint_create(owner=merchant, all_deliveries=False, url=hanging.url, events=["delivery.assigned"])
        fast = services.endpoint_create(owner=merchant, all_deliveries=False, url=receiver.url, events=["*"])
        delivery, driver = DeliveryFactory(created_by=merchant), online_driver()
        flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        for step in ("pickup-started", "pickup-completed", "delivery-started"):
            flows.delivery_advance(delivery_id=delivery.pk, driver_id=driver.pk, step=step, actor=Actor.for_user(driver.user))

        services.webhooks_deliver_due(max_seconds=2.5)

        assert WebhookMessage.objects.filter(endpoint=fast).count() == 4
        assert len(receiver.requests) == 4
        # each attempt dated when its request was signed and sent (the receiver's webhook-timestamp)
        dated = sorted(int(a.attempted_at.timestamp()) for a in WebhookAttempt.objects.filter(message__endpoint=fast))
        assert dated == sorted(int(r.headers["webhook-timestamp"]) for r in receiver.requests)
        assert len(hanging.requests) <= 1
    finally:
        hanging.close()


def test_an_attempt_is_dated_when_its_request_was_sent():
    """`attemptedAt` was when the outcome was known: a timed-out attempt read 10 s after the
    receiver got it (and its `webhook-timestamp`), which made receivers' logs hard to match."""
    from datetime import timedelta

    from notifications.egress import HttpResult

    merchant = IntegrationUserFactory()
    endpoint = services.endpoint_create(owner=merchant, all_deliveries=False, url="https://slow.example.com/h", events=["*"])
    services.endpoint_send_test(endpoint_id=endpoint.pk)
    while services.webhooks_fan_out(now=timezone.now()):
        pass
    message = WebhookMessage.objects.get(endpoint=endpoint)
    now = timezone.now()

    attempt = services.message_attempt_record(message_id=message.pk, now=now, result=HttpResult(
        status=None, headers={}, body=b"", duration_ms=10_000, error="timeout: no complete answer within 10 s"))

    assert attempt.attempted_at == now - timedelta(seconds=10) and attempt.duration_ms == 10_000
