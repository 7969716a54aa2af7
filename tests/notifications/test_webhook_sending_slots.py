"""At most WEBHOOK_SENDING_SWEEPS sweeps send at once; another only fans out. A sending sweep
goes on fanning out and claiming other endpoints' messages while one endpoint is slow, so a
slow receiver holds back neither the others' events nor the customer's messages (made by the
fan-out), nor, with every worker process in a 30 s sweep, the worker's other tasks."""
from __future__ import annotations

import threading
import time

import pytest

from common.actors import Actor
from common.redis import get_redis
from notifications import services
from notifications.models import CustomerMessage, MessageStatus, WebhookAttempt, WebhookMessage
from tests.factories import DeliveryFactory, IntegrationUserFactory, online_driver
from tests.notifications.receiver import Answer, Receiver
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)


def endpoint_for(url):
    return services.endpoint_create(owner=IntegrationUserFactory(), all_deliveries=False, url=url, events=["*"])


def test_a_sweep_that_finds_the_slot_taken_only_fans_out(receiver, no_worker):
    endpoint = endpoint_for(receiver.url)
    services.endpoint_send_test(endpoint_id=endpoint.pk)
    held = get_redis().lock(services.SENDING_KEY.format(0), timeout=60, blocking=False)
    assert held.acquire()  # another sweep is sending

    assert services.webhooks_deliver_due(max_seconds=5) == 0

    message = WebhookMessage.objects.get(endpoint=endpoint)  # fanned out
    assert message.status == MessageStatus.PENDING and message.leased_until is None and not receiver.requests

    held.release()
    assert services.webhooks_deliver_due(max_seconds=5) == 1
    assert len(receiver.requests) == 1
    assert not get_redis().exists(services.SENDING_KEY.format(0))  # the sweep gave its slot back


def test_more_slots_let_more_sweeps_send(receiver, no_worker, settings):
    settings.WEBHOOK_SENDING_SWEEPS = 2
    endpoint = endpoint_for(receiver.url)
    services.endpoint_send_test(endpoint_id=endpoint.pk)
    held = get_redis().lock(services.SENDING_KEY.format(0), timeout=60, blocking=False)
    assert held.acquire()

    assert services.webhooks_deliver_due(max_seconds=5) == 1
    held.release()


def test_with_redis_unreachable_every_sweep_sends(receiver, no_worker, monkeypatch):
    endpoint = endpoint_for(receiver.url)
    services.endpoint_send_test(endpoint_id=endpoint.pk)
    monkeypatch.setattr(services, "get_redis", lambda: get_redis("redis://127.0.0.1:1/0"))

    assert services.webhooks_deliver_due(max_seconds=5) == 1
    assert len(receiver.requests) == 1


def test_while_one_endpoint_is_slow_the_sweep_sends_what_was_committed_meanwhile(receiver, no_worker, settings):
    """Before: the sweep waited for the slow attempt (3 s) past its budget (2.5 s) and ended;
    the fast endpoint's event and the customer's messages waited for the next sweep."""
    settings.WEBHOOK_TIMEOUT_SECONDS = 3.0
    in_flight = threading.Event()
    slow_receiver = Receiver()

    def slow(received):
        in_flight.set()
        return Answer(delay=5)  # times out (3 s)

    slow_receiver.responder = slow
    try:
        slow = endpoint_for(slow_receiver.url)
        fast = endpoint_for(receiver.url)
        services.endpoint_send_test(endpoint_id=slow.pk)
        outcome = {}
        sweep = threading.Thread(target=lambda: outcome.update(attempts=services.webhooks_deliver_due(max_seconds=2.5)))
        sweep.start()
        assert in_flight.wait(10)
        ttl_ms = get_redis().pttl(services.SENDING_KEY.format(0))  # the sweep holds the slot, with an expiry
        assert 0 < ttl_ms <= services.SLOT_TTL_SECONDS * 1000

        services.endpoint_send_test(endpoint_id=fast.pk)  # committed while the slow attempt runs
        delivery = DeliveryFactory(customer_phone="+14155552671")
        flows.assignment_create(delivery_id=delivery.pk, driver_id=online_driver().pk, actor=Actor.system())
        sweep.join(15)

        assert not sweep.is_alive()
        assert outcome["attempts"] == 2
        assert len(receiver.requests) == 1
        assert WebhookAttempt.objects.filter(message__endpoint=fast, status_code=200).count() == 1
        assert CustomerMessage.objects.filter(delivery=delivery, kind="assigned").count() == 1  # made, to be sent
    finally:
        slow_receiver.close()


def test_what_a_sweep_without_the_slot_fanned_out_is_sent_by_the_one_that_held_it(receiver, no_worker, monkeypatch):
    """The holder found nothing to claim; meanwhile another sweep fanned out an event, found the
    slot taken and ended. The holder must see it after letting the slot go (a lost wake-up:
    before, nobody sent it until the next sweep)."""
    from django.db import connection

    endpoint = endpoint_for(receiver.url)
    claim = services.webhooks_claim_due
    other = {}

    def another_sweep():
        try:
            services.endpoint_send_test(endpoint_id=endpoint.pk)
            other["attempts"] = services.webhooks_deliver_due(max_seconds=5)
        finally:
            connection.close()

    def claim_then_another_sweep(**kwargs):
        found = claim(**kwargs)
        if not other:
            t = threading.Thread(target=another_sweep)
            t.start()
            t.join(10)
        return found

    monkeypatch.setattr(services, "webhooks_claim_due", claim_then_another_sweep)

    attempts = services.webhooks_deliver_due(max_seconds=5)

    assert other == {"attempts": 0}  # it fanned out, found the slot taken and ended
    assert attempts == 1 and len(receiver.requests) == 1


def test_a_sweep_stopped_by_an_error_frees_what_it_claimed_and_its_slot(no_worker, settings, monkeypatch):
    """A database error in the middle of a sweep left its queued messages leased for 2 minutes."""
    from django.db import OperationalError

    settings.WEBHOOK_TIMEOUT_SECONDS = 3.0
    slow_receiver = Receiver()
    slow_receiver.default = Answer(delay=1.5)
    try:
        endpoint = endpoint_for(slow_receiver.url)
        for _ in range(5):
            services.endpoint_send_test(endpoint_id=endpoint.pk)
        fan_out = services.webhooks_fan_out
        calls = []

        def failing_after_the_first(**kwargs):
            calls.append(1)
            if len(calls) > 2:  # (1, 2: the sweep's own fan-out) the top-up while the first attempt runs
                raise OperationalError("server closed the connection unexpectedly")
            return fan_out(**kwargs)

        monkeypatch.setattr(services, "webhooks_fan_out", failing_after_the_first)
        with pytest.raises(OperationalError):
            services.webhooks_deliver_due(max_seconds=10)

        waiting = WebhookMessage.objects.filter(endpoint=endpoint, status=MessageStatus.PENDING, attempt_count=0)
        assert waiting.count() == 5  # (the attempt that ran was not recorded: it goes again, at least once)
        assert waiting.filter(leased_until__isnull=True).count() == 4  # the queued ones, free at once
        assert not get_redis().exists(services.SENDING_KEY.format(0))
    finally:
        slow_receiver.close()


def test_the_tasks_time_limit_stops_the_sweep_and_frees_what_it_claimed(receiver, no_worker, monkeypatch):
    """`record()` caught every Exception: the soft time limit raised while recording was logged
    as one message's failure and the sweep ran on to the hard kill."""
    from celery.exceptions import SoftTimeLimitExceeded

    endpoint = endpoint_for(receiver.url)
    for _ in range(3):
        services.endpoint_send_test(endpoint_id=endpoint.pk)

    def time_is_up(**kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(services, "message_attempt_record", time_is_up)
    with pytest.raises(SoftTimeLimitExceeded):
        services.webhooks_deliver_due(max_seconds=10)

    assert len(receiver.requests) == 1  # no attempt after the limit
    waiting = WebhookMessage.objects.filter(endpoint=endpoint, status=MessageStatus.PENDING)
    assert waiting.filter(leased_until__isnull=True).count() == 2  # the queued ones, free at once
    assert not get_redis().exists(services.SENDING_KEY.format(0))


def test_a_sweep_running_longer_than_the_slots_ttl_keeps_it(receiver, no_worker, monkeypatch):
    """The holder's process renews the slot while the sweep runs (the TTL only bounds how long a
    dead holder keeps it)."""
    monkeypatch.setattr(services, "SLOT_TTL_SECONDS", 2.0)
    monkeypatch.setattr(services, "SLOT_RENEW_SECONDS", 0.2)  # (a stall of up to 1.8 s is survived)
    key = services.SENDING_KEY.format(0)
    seen = {}

    def slow(received):  # a receiver taking twice the slot's TTL to answer
        threading.Event().wait(4.0)
        seen["held"], seen["ttl_ms"] = get_redis().exists(key), get_redis().pttl(key)
        return Answer()

    receiver.responder = slow
    services.endpoint_send_test(endpoint_id=endpoint_for(receiver.url).pk)

    assert services.webhooks_deliver_due(max_seconds=8) == 1
    assert seen["held"] == 1 and 0 < seen["ttl_ms"] <= 2000
    assert not get_redis().exists(key)  # given back at the end


def test_a_worker_killed_while_it_sends_frees_its_slot_within_the_ttl(monkeypatch):
    """Before: the slot's lock outlived the longest sweep (budget + timeout + 5 s = 45 s), and a
    worker killed holding it stopped every webhook for that long."""
    import os
    import select
    import signal

    monkeypatch.setattr(services, "SLOT_TTL_SECONDS", 2.0)
    monkeypatch.setattr(services, "SLOT_RENEW_SECONDS", 0.2)
    key = services.SENDING_KEY.format(0)
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: holds the slot (as a sweep sending for the whole budget would) until killed
        os.close(ready_r)
        try:
            with services._sending_slot(60) as may_send:
                os.write(ready_w, b"1" if may_send else b"0")
                threading.Event().wait(60)
        finally:
            os._exit(0)
    os.close(ready_w)  # (the child's end only: a child that fails before writing is an EOF here)
    try:
        assert select.select([ready_r], [], [], 15)[0], "the worker never took the slot"
        assert os.read(ready_r, 1) == b"1"
        threading.Event().wait(3.0)  # past one TTL: the holder's renewals keep it
        assert get_redis().exists(key)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(ready_r)
    ttl_ms = get_redis().pttl(key)
    assert ttl_ms == -2 or 0 < ttl_ms <= 2000  # gone, or going within the TTL (no renewal any more)
    deadline = time.monotonic() + 5
    while get_redis().exists(key) and time.monotonic() < deadline:
        threading.Event().wait(0.1)
    with services._sending_slot(5) as may_send_now:
        assert may_send_now


def test_a_sweep_out_of_budget_with_messages_due_kicks_the_next(no_worker, settings, monkeypatch):
    """Before: what the budget left waited for the beat's sweep (up to 15 s) or the next commit."""
    from celery.app.task import Task

    from common.broadcast import kick_started
    from notifications.outbox import DELIVER_TASK

    settings.WEBHOOK_TIMEOUT_SECONDS = 3.0
    slow_receiver = Receiver()
    slow_receiver.default = Answer(delay=1.5)
    published = []
    monkeypatch.setattr(Task, "apply_async", lambda self, *a, **kw: published.append(self.name))
    try:
        endpoint = endpoint_for(slow_receiver.url)
        for _ in range(3):
            services.endpoint_send_test(endpoint_id=endpoint.pk)
        kick_started(DELIVER_TASK)  # (as the task does first)
        published.clear()

        assert services.webhooks_deliver_due(max_seconds=1.0) == 1  # one attempt, then the budget was spent

        assert published == [DELIVER_TASK]
        assert WebhookMessage.objects.filter(endpoint=endpoint, leased_until__isnull=True, attempt_count=0).count() == 2
    finally:
        slow_receiver.close()


def test_a_sweep_that_sent_everything_kicks_nothing(receiver, no_worker, monkeypatch):
    from celery.app.task import Task

    from common.broadcast import kick_started
    from notifications.outbox import DELIVER_TASK

    published = []
    monkeypatch.setattr(Task, "apply_async", lambda self, *a, **kw: published.append(self.name))
    endpoint = endpoint_for(receiver.url)
    for _ in range(3):
        services.endpoint_send_test(endpoint_id=endpoint.pk)
    kick_started(DELIVER_TASK)
    published.clear()

    assert services.webhooks_deliver_due(max_seconds=10) == 3
    assert published == []
