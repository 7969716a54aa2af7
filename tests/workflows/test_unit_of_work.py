"""A workflow's transaction (`workflows.unit.unit_of_work`): its audit rows go in by one INSERT
before commit, in order; its live events go out together after commit, in order per group;
nothing of either survives a rollback (of the transaction or of a savepoint inside it). And
the statement-saving paths keep the database as the last word: races still end in a 409."""
import logging

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from audit.models import DeliveryAuditLog
from audit.services import audit_record
from availability.models import Driver
from common import broadcast
from common.actors import Actor
from common.broadcast import broadcast_on_commit
from common.exceptions import Conflict
from dispatch.models import Assignment, Delivery
from dispatch.services import DeliveryInput
from offers.models import DriverOffer
from tests.concurrency import race
from tests.factories import DeliveryFactory, online_driver, point
from workflows import deliveries, locks, offers
from workflows.unit import unit_of_work

pytestmark = pytest.mark.django_db(transaction=True)


def test_audit_rows_of_a_workflow_go_in_by_one_insert_in_the_order_recorded():
    delivery = DeliveryFactory()
    types = ["pickup_started", "pickup_completed", "delivery_started", "delivery_completed"]
    with CaptureQueriesContext(connection) as queries:
        with unit_of_work():
            for t in types:
                audit_record(delivery=delivery, event_type=t, actor=Actor.system())
            assert not DeliveryAuditLog.objects.filter(delivery=delivery).exists()  # not yet: at the end
    inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('INSERT INTO "delivery_audit_logs"')]
    assert len(inserts) == 1
    rows = list(DeliveryAuditLog.objects.filter(delivery=delivery).order_by("seq"))
    assert [r.event_type for r in rows] == types


def test_audit_rows_of_a_failed_workflow_or_a_rolled_back_savepoint_are_not_written():
    delivery = DeliveryFactory()
    with pytest.raises(Conflict), unit_of_work():
        audit_record(delivery=delivery, event_type="pickup_started", actor=Actor.system())
        raise Conflict("no")
    assert not DeliveryAuditLog.objects.filter(delivery=delivery).exists()

    with unit_of_work():
        audit_record(delivery=delivery, event_type="pickup_started", actor=Actor.system())
        try:
            with transaction.atomic():
                audit_record(delivery=delivery, event_type="pickup_completed", actor=Actor.system())
                raise ValueError
        except ValueError:
            pass
        audit_record(delivery=delivery, event_type="delivery_started", actor=Actor.system())
    rows = DeliveryAuditLog.objects.filter(delivery=delivery).order_by("seq")
    assert [r.event_type for r in rows] == ["pickup_started", "delivery_started"]


def test_events_of_a_workflow_go_after_commit_in_one_send_in_order_per_group(listen, monkeypatch):
    sends, real_send_many = [], broadcast.send_many

    def spy(entries):
        sends.append((connection.in_atomic_block, [e["n"] for _, e in entries]))
        real_send_many(entries)

    monkeypatch.setattr(broadcast, "send_many", spy)
    ops, drv = listen("ops"), listen("driver.d1")
    with unit_of_work():
        for n in range(5):
            broadcast_on_commit(["ops", "driver.d1"] if n % 2 == 0 else ["ops"], {"type": "offer_created", "n": n})
        assert sends == []  # nothing before commit
    assert sends == [(False, [0, 1, 2, 3, 4])]  # one send, after commit
    assert [e["n"] for e in ops.drain()] == [0, 1, 2, 3, 4]
    assert [e["n"] for e in drv.drain()] == [0, 2, 4]


def test_no_event_goes_for_a_rolled_back_workflow_or_savepoint(listen):
    ops = listen("ops")
    with pytest.raises(Conflict), unit_of_work():
        broadcast_on_commit(["ops"], {"type": "offer_created", "n": 0})
        raise Conflict("no")
    with unit_of_work():
        broadcast_on_commit(["ops"], {"type": "offer_created", "n": 1})
        try:
            with transaction.atomic():
                broadcast_on_commit(["ops"], {"type": "offer_created", "n": 2})
                raise ValueError
        except ValueError:
            pass
        broadcast_on_commit(["ops"], {"type": "offer_created", "n": 3})
    assert [e["n"] for e in ops.drain()] == [1, 3]


@pytest.mark.parametrize("backend", ["common.channels.CoalescingPubSubChannelLayer", "channels_redis.core.RedisChannelLayer"])
def test_a_channel_layer_failure_is_logged_never_raised(settings, caplog, backend):
    from channels.layers import channel_layers

    settings.CHANNEL_LAYERS = {"default": {"BACKEND": backend, "CONFIG": {"hosts": ["redis://127.0.0.1:6399/0"]}}}
    channel_layers.backends.pop("default", None)
    try:
        with caplog.at_level(logging.WARNING), unit_of_work():
            broadcast_on_commit(["ops"], {"type": "offer_created"})
        assert any("broadcast" in r.getMessage() for r in caplog.records)
    finally:
        channel_layers.backends.pop("default", None)


def _input(seller_order_id="RACE-1"):
    return DeliveryInput(
        seller_order_id=seller_order_id, store_name="Race Store", pickup_location=point(), dropoff_location=point(),
    )


def test_two_creates_of_one_seller_order_id_make_one_delivery_and_a_409():
    delivery = DeliveryFactory()  # its integration user
    owner = delivery.created_by
    results, errors = race(
        [lambda: deliveries.delivery_create(data=_input(), created_by=owner, actor=Actor.system())] * 4
    )
    assert len(results) == 1 and len(errors) == 3, errors
    assert all(isinstance(e, Conflict) for e in errors), errors
    assert Delivery.objects.filter(created_by=owner, seller_order_id="RACE-1").count() == 1


def test_two_accepts_racing_for_one_driver_make_one_assignment_and_a_409():
    """Two offers to one driver cannot both be pending, but an ops direct assignment can race
    the accept: the partial unique index decides, the loser gets a Conflict (never a 500)."""
    driver = online_driver(km=0.5)
    first = DeliveryFactory()
    offer = offers.offer_create(delivery_id=first.pk, driver_id=driver.pk, actor=Actor.system())
    second = DeliveryFactory()
    results, errors = race([
        lambda: offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk)),
        lambda: deliveries.assignment_create(delivery_id=second.pk, driver_id=driver.pk, actor=Actor.system()),
    ])
    assert len(results) == 1 and len(errors) == 1, errors
    assert isinstance(errors[0], Conflict), errors
    assert Assignment.objects.filter(driver=driver, status="active").count() == 1


def test_a_step_racing_a_reassign_either_applies_before_it_or_is_refused():
    for _ in range(3):
        driver = online_driver(km=0.5)
        online_driver(km=1.0)  # where the delivery goes next
        delivery = DeliveryFactory()
        offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
        offers.offer_accept(offer_id=offer.pk, driver_id=driver.pk, actor=Actor("driver", driver.pk))
        actor = Actor("driver", driver.pk)
        results, errors = race([
            lambda d=delivery, drv=driver, a=actor: (
                "step", deliveries.delivery_advance(delivery_id=d.pk, driver_id=drv.pk, step="pickup-started", actor=a)
            ),
            lambda d=delivery: ("reassign", deliveries.delivery_reassign(delivery_id=d.pk, reason="ops", actor=Actor.system())),
        ])
        assert all(isinstance(e, Conflict) for e in errors), errors
        started = DeliveryAuditLog.objects.filter(delivery=delivery, event_type="pickup_started")
        reassigned = DeliveryAuditLog.objects.filter(delivery=delivery, event_type="assignment_reassigned")
        if reassigned.exists():
            # the step either came first (and is in the trail before the reassign) or was refused
            if started.exists():
                assert started.get().seq < reassigned.get().seq
            else:
                assert [name for name, _ in results] == ["reassign"]
        else:
            assert started.count() == 1
        assert DeliveryAuditLog.objects.filter(delivery=delivery, event_type="pickup_started").count() <= 1


def test_the_one_statement_lock_takes_offer_then_delivery_then_driver():
    """While the driver is held elsewhere, the accept's lock statement waits on it already
    holding the offer and the delivery (the order of workflows/locks.py), not the other way."""
    import threading
    import time

    from django.db import OperationalError, connections

    driver = online_driver(km=0.5)
    delivery = DeliveryFactory()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    holding, release, locked = threading.Event(), threading.Event(), threading.Event()

    def hold_driver():
        try:
            with transaction.atomic():
                Driver.objects.select_for_update().get(pk=driver.pk)
                holding.set()
                release.wait(20)
        finally:
            connections.close_all()

    def lock_all():
        try:
            with transaction.atomic():
                locks.lock_offer_delivery_driver(offer.pk, driver_id=driver.pk)
                locked.set()
        finally:
            connections.close_all()

    def nowait(model, pk):
        try:
            with transaction.atomic():
                model.objects.select_for_update(nowait=True).get(pk=pk)
            return "free"
        except OperationalError:
            return "held"

    a = threading.Thread(target=hold_driver)
    a.start()
    assert holding.wait(10)
    b = threading.Thread(target=lock_all)
    b.start()
    deadline = time.monotonic() + 10
    with connection.cursor() as cur:
        while time.monotonic() < deadline:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()")
            if cur.fetchone()[0] >= 1:
                break
            time.sleep(0.02)
    try:
        assert not locked.is_set()
        assert nowait(DriverOffer, offer.pk) == "held"
        assert nowait(Delivery, delivery.pk) == "held"
    finally:
        release.set()
        a.join(30)
        b.join(30)
    assert locked.is_set()
