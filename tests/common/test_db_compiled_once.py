"""common.db: `save_fields` (save(update_fields=…) by an UPDATE built once, with save()'s
preparation, checks and failures) and `insert_many`'s INSERT text kept per shape."""
import uuid
from unittest import mock

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models import F, signals
from django.db.models.sql.compiler import SQLCompiler, SQLInsertCompiler
from django.test.utils import CaptureQueriesContext

from common import db
from common.db import save_fields
from dispatch.models import Delivery, DeliveryStatus
from offers.models import DriverOffer
from tests.factories import DeliveryFactory

pytestmark = pytest.mark.django_db


def _row(pk):
    return {f.attname: getattr(o, f.attname) for o in [Delivery.objects.get(pk=pk)] for f in Delivery._meta.concrete_fields}


def test_it_writes_what_save_writes_in_one_update_without_compiling():
    d = DeliveryFactory()
    stored = _row(d.pk)
    d.status, d.store_name, d.customer_name = DeliveryStatus.CANCELLED, "Renamed", "not in the fields: not written"
    save_fields(d, ["status", "store_name", "updated_at"])  # built here
    d.store_name = "Again"
    with CaptureQueriesContext(connection) as queries, \
            mock.patch.object(SQLCompiler, "as_sql", autospec=True, side_effect=SQLCompiler.as_sql) as as_sql:
        save_fields(d, ["status", "store_name", "updated_at"])
    assert len(queries) == 1 and queries[0]["sql"].startswith("UPDATE") and as_sql.call_count == 0
    now = _row(d.pk)
    assert {k for k in now if now[k] != stored[k]} == {"status", "store_name", "updated_at"}
    assert (now["status"], now["store_name"]) == (DeliveryStatus.CANCELLED, "Again")
    assert now["updated_at"] > stored["updated_at"] and now["updated_at"] == d.updated_at  # auto_now, as save() sets it


def test_a_row_that_is_gone_fails_as_save_does():
    d = DeliveryFactory()
    Delivery.objects.filter(pk=d.pk).update(status=DeliveryStatus.CANCELLED)
    ghost = Delivery.objects.get(pk=d.pk)
    ghost.pk = uuid.uuid4()
    for save in (lambda: ghost.save(update_fields=["status"]), lambda: save_fields(ghost, ["status"])):
        with pytest.raises(DatabaseError, match="did not affect any rows"), transaction.atomic():
            with transaction.atomic():
                save()
        # both leave the transaction marked for rollback, as save() does
        with transaction.atomic():
            with pytest.raises(DatabaseError):
                save()
            assert connection.needs_rollback
            transaction.set_rollback(False)


def test_an_unsaved_related_object_is_refused_as_save_refuses_it():
    d = DeliveryFactory()
    d.accepted_offer = DriverOffer(delivery=d)
    d.accepted_offer.pk = None
    with pytest.raises(ValueError) as by_save:
        d.save(update_fields=["status"])
    with pytest.raises(ValueError) as by_helper:
        save_fields(d, ["status"])
    assert str(by_helper.value) == str(by_save.value)


def test_receivers_and_expressions_go_through_save():
    d = DeliveryFactory()
    seen = []
    receiver = lambda sender, instance, update_fields, **kw: seen.append(set(update_fields))  # noqa: E731
    signals.post_save.connect(receiver, sender=Delivery)
    try:
        save_fields(d, ["status"])
    finally:
        signals.post_save.disconnect(receiver, sender=Delivery)
    assert seen == [{"status"}]
    d.handoff_code_failures = F("handoff_code_failures") + 2
    save_fields(d, ["handoff_code_failures"])
    assert Delivery.objects.get(pk=d.pk).handoff_code_failures == 2


def test_insert_many_compiles_each_shape_once_and_writes_what_the_compiler_writes():
    """`insert_many` of a workflow's rows (audit rows with a database sequence as `db_default`,
    availability history): the first time compiled, then the text reused; every value and the
    sequence read back are those of the rows."""
    from django.utils import timezone

    from audit.models import DeliveryAuditLog
    from availability.models import DriverAvailabilityHistory
    from common.db import insert_many
    from tests.factories import online_driver

    d, driver = DeliveryFactory(), online_driver(km=0.3)

    def rows(n):
        now = timezone.now()
        audit = [DeliveryAuditLog(delivery=d, timestamp=now, event_type="delivery_created", details={"n": i, "x": [1]})
                 for i in range(n)]
        history = [DriverAvailabilityHistory(driver=driver, from_state="AVAILABLE", to_state="BUSY", reason="assigned",
                                             actor_type="system", timestamp=now)]
        return audit, history

    compiled = mock.patch.object(SQLInsertCompiler, "as_sql", autospec=True, side_effect=SQLInsertCompiler.as_sql)
    with mock.patch.dict(db._insert_texts, clear=True):  # the shapes other tests left forgotten
        insert_many(*rows(2))  # compiled and kept
        with compiled as as_sql:
            audit, history = rows(2)
            insert_many(audit, history)
            assert as_sql.call_count == 0
            insert_many(*rows(3))  # another shape: compiled
            assert as_sql.call_count > 0
    stored = {a.pk: a for a in DeliveryAuditLog.objects.filter(pk__in=[a.pk for a in audit])}
    for a in audit:
        s = stored[a.pk]
        assert (s.seq, s.details, s.timestamp, s.delivery_id, s.event_type) == (a.seq, a.details, a.timestamp, d.pk, a.event_type)
        assert not a._state.adding
    assert audit[1].seq == audit[0].seq + 1
    h = DriverAvailabilityHistory.objects.get(pk=history[0].pk)
    assert (h.driver_id, h.to_state, h.timestamp) == (driver.pk, "BUSY", history[0].timestamp)


def test_insert_unless_conflict_keeps_its_text_with_geometries_and_still_sees_the_conflict():
    """A delivery (two geography points) by INSERT … ON CONFLICT DO NOTHING: the second
    compiles nothing, the rows hold what was given, the conflict is still seen."""
    from django.contrib.gis.geos import Point
    from django.utils import timezone

    from common.db import insert_unless_conflict
    from tests.factories import IntegrationUserFactory

    owner, now = IntegrationUserFactory(), timezone.now()

    def new(order, lon, lat):
        return Delivery(created_by=owner, seller_order_id=order, store_name="S", pickup_location=Point(lon, lat, srid=4326),
                        dropoff_location=Point(77.6, 13.0, srid=4326), prep_time_minutes=0, ready_at=now)

    compiled = mock.patch.object(SQLInsertCompiler, "as_sql", autospec=True, side_effect=SQLInsertCompiler.as_sql)
    with mock.patch.dict(db._insert_texts, clear=True):
        assert insert_unless_conflict(new("G-1", 77.59, 12.97))
        with compiled as as_sql:
            second = new("G-2", 77.5, 12.9)
            assert insert_unless_conflict(second)
            assert not insert_unless_conflict(new("G-2", 70.0, 10.0))  # sellerOrderId taken
            assert as_sql.call_count == 0
    rows = {d.seller_order_id: d for d in Delivery.objects.filter(created_by=owner)}
    assert set(rows) == {"G-1", "G-2"}
    assert rows["G-2"].pk == second.pk and rows["G-2"].pickup_location.coords == (77.5, 12.9)
    assert rows["G-1"].pickup_location.coords == (77.59, 12.97) and rows["G-1"].dropoff_location.coords == (77.6, 13.0)
