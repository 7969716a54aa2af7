"""common.hotsql: the cached locking reads return what their querysets return, compile once
per connection, and keep the queryset's failures (bad id text, no transaction)."""
import uuid
from unittest import mock

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, connections, transaction
from django.db.models.sql.compiler import SQLCompiler
from django.db.transaction import TransactionManagementError

from common.actors import Actor
from common.hotsql import cached_first
from dispatch.models import Assignment
from offers.models import DriverOffer
from tests.factories import DeliveryFactory, online_driver
from workflows import locks, offers

pytestmark = pytest.mark.django_db


def _fields(obj):
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}


def _offer():
    driver = online_driver(km=0.5)
    delivery = DeliveryFactory()
    offer = offers.offer_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return driver, delivery, offer


def test_locking_reads_match_the_orm_and_compile_once_per_connection():
    driver, delivery, offer = _offer()
    connections["default"].__dict__.pop("_hot_sql", None)  # the wrapper, not the proxy
    with transaction.atomic():
        got = locks.lock_offer_delivery_driver(offer.pk, driver_id=str(driver.pk))  # the id as text too
        orm = (DriverOffer.objects.select_related("delivery", "delivery__zone", "driver")
               .filter(pk=offer.pk).first())
        assert _fields(got) == _fields(orm)
        assert _fields(got.delivery) == _fields(orm.delivery)  # geometry fields converted alike
        assert _fields(got.driver) == _fields(orm.driver)
        assert got.delivery.zone_id == orm.delivery.zone_id
        assert got._state.db == "default" and not got._state.adding

        with mock.patch.object(SQLCompiler, "as_sql", autospec=True, side_effect=SQLCompiler.as_sql) as as_sql:
            again = locks.lock_offer_delivery_driver(offer.pk, driver_id=driver.pk)
            assert [o.pk for o in locks.lock_offer_and_its_round(offer.pk, driver_id=driver.pk)] == [offer.pk]
            compiled_round = as_sql.call_count
            assert [o.pk for o in locks.lock_offer_and_its_round(offer.pk, driver_id=driver.pk)] == [offer.pk]
        assert again.pk == offer.pk
        assert compiled_round > 0 and as_sql.call_count == compiled_round  # the second round read compiled nothing

        with pytest.raises(Exception) as missing:
            locks.lock_offer_delivery_driver(offer.pk, driver_id=uuid.uuid4())  # another driver's
        assert missing.type.__name__ == "NotFound"
        assert locks.lock_pending_offer_of_delivery(delivery.pk).pk == offer.pk
        assert locks.lock_pending_offer_of_driver(uuid.uuid4()) is None
        assert locks.lock_delivery(delivery.pk, select_related=("zone",)).pk == delivery.pk
        assert locks.lock_driver(driver.pk, skip_locked=True, location__isnull=False).pk == driver.pk


def test_bad_id_text_and_no_transaction_fail_as_the_queryset_does():
    driver, delivery, offer = _offer()
    with transaction.atomic(), pytest.raises(ValidationError) as bad:
        locks.lock_offer(offer.pk, driver_id="not-a-uuid")
    with pytest.raises(ValidationError) as orm_bad:
        DriverOffer.objects.filter(pk="not-a-uuid")
    assert bad.value.messages == orm_bad.value.messages
    locks.lock_offer(offer.pk)  # compiled and cached (the test runs in a transaction)
    # then, with no transaction, the cached statement refuses as the ORM does
    with pytest.raises(TransactionManagementError):
        with mock.patch.object(connection, "get_autocommit", return_value=True):
            locks.lock_offer(offer.pk)


def test_none_runs_the_querysets_own_is_null():
    _offer()
    assignment_none = cached_first(("test_none",), Assignment, lambda d: Assignment.objects.filter(driver_id=d), None)
    assert assignment_none == Assignment.objects.filter(driver_id=None).first()


def test_screening_rows_match_the_uncached_query_for_every_shape():
    from django.db.models import CharField, Exists, OuterRef, Value

    from workflows.dispatching import _screening_rows, answer_counts
    from availability.models import Driver
    from offers.models import OfferStatus

    driver, delivery, offer = _offer()
    others = [online_driver(km=0.5 + i / 10) for i in range(4)]
    offers_q = DriverOffer.objects.filter(driver=OuterRef("pk"))
    for ids in ([driver.pk], [driver.pk, others[0].pk, others[1].pk], [str(d.pk) for d in [driver, *others]],
                [driver.pk, driver.pk, str(uuid.uuid4())]):
        ids = [str(i) for i in ids]
        expected = {
            str(r[0]): r[1:] for r in Driver.objects.filter(pk__in=ids).order_by().values_list(
                "pk", "availability", "vehicle_type", "user__is_active",
                Exists(offers_q.filter(delivery_id=delivery.pk)),
                Exists(offers_q.filter(status=OfferStatus.PENDING)),
                Value(None, output_field=CharField()) if not delivery.zone_id else Value("x"),
                *answer_counts())
        }
        got = _screening_rows(delivery, ids)
        assert set(got) == set(expected)
        for k, row in got.items():
            assert row[:5] == expected[k][:5] and row[6:] == expected[k][6:]
    assert got[str(driver.pk)][3] is True and got[str(driver.pk)][4] is True  # offered this delivery, pending
    assert got[str(driver.pk)][2] is True  # its login is active


def test_a_geometry_parameter_is_bound_per_call_and_annotations_come_back():
    """The zone lookup of intake: a Point parameter (a PostGIS adapter in the statement) and two
    annotations; the same zones, `covering` and `area_m2` as the ORM's queryset, compiled once."""
    from django.contrib.gis.geos import Point

    from tests.factories import ZoneFactory
    from zones.selectors import _best_zone_first, zone_for_point_and_any

    big = ZoneFactory(name="Big", bbox=(40.0, 20.0, 41.0, 21.0), priority_level=3)
    small = ZoneFactory(name="Small", bbox=(40.4, 20.4, 40.5, 20.5), priority_level=3)
    connections["default"].__dict__.pop("_hot_sql", None)
    points = [Point(40.45, 20.45, srid=4326), Point(40.9, 20.9, srid=4326), Point(-3.0, 5.0, srid=4326),
              Point(40.45, 20.45)]  # no SRID: taken as 4326, as the uncached lookup did
    expected = [small, big, None, small]
    for point, zone in zip(points, expected):
        got, any_zone = zone_for_point_and_any(point)
        assert got == zone and any_zone
        orm = _best_zone_first(Point(point.x, point.y, srid=4326)).first()
        cached = cached_first(("zones.zone_for_point_and_any",), type(big), _best_zone_first,
                              Point(point.x, point.y, srid=4326))
        assert _fields(cached) == _fields(orm)
        assert (cached.covering, cached.area_m2) == (orm.covering, orm.area_m2)
    with mock.patch.object(SQLCompiler, "as_sql", autospec=True, side_effect=SQLCompiler.as_sql) as as_sql:
        assert zone_for_point_and_any(Point(40.9, 20.9, srid=4326)) == (big, True)
    assert as_sql.call_count == 0
    # another SRID is another statement (ST_Transform), compiled for itself
    in_small_3857 = Point(40.45, 20.45, srid=4326).transform(3857, clone=True)
    assert cached_first(("zones.zone_for_point_and_any",), type(big), _best_zone_first, in_small_3857) == small
