"""common.db.save_fields: `save(update_fields=…)` by an UPDATE built once, with save()'s
preparation, checks and failures."""
import uuid
from unittest import mock

import pytest
from django.db import DatabaseError, connection, transaction
from django.db.models import F, signals
from django.db.models.sql.compiler import SQLCompiler
from django.test.utils import CaptureQueriesContext

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
