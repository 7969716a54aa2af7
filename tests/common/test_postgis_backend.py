"""common.postgis: the geometry adapters are registered once per psycopg connection, and a
connection that has them still reads and writes geometries."""
from unittest import mock

import pytest
from django.contrib.gis.db.backends.postgis.base import DatabaseWrapper as PostGISDatabaseWrapper
from django.contrib.gis.geos import Point
from django.db import connection, connections

from common.postgis.base import DatabaseWrapper
from dispatch.models import Delivery
from tests.factories import DeliveryFactory

pytestmark = pytest.mark.django_db


def test_the_settings_use_this_backend():
    assert isinstance(connections["default"], DatabaseWrapper)


def test_a_connection_that_has_the_adapters_is_not_registered_again():
    connection.ensure_connection()
    pg = connection.connection
    register = mock.patch.object(PostGISDatabaseWrapper, "register_geometry_adapters", autospec=True,
                                 side_effect=PostGISDatabaseWrapper.register_geometry_adapters)
    with register as registered:
        connection.register_geometry_adapters(pg)  # marked when this connection was made
        connection.register_geometry_adapters(pg)
        assert registered.call_count == 0
        connection.register_geometry_adapters(pg, True)  # prepare_database's: registered
        assert registered.call_count == 1
        other = mock.Mock(spec=["adapters"])  # a connection never seen: registered, then marked
        with mock.patch.object(PostGISDatabaseWrapper, "_register_type", return_value=None):
            connection.register_geometry_adapters(other)
            connection.register_geometry_adapters(other)
        assert registered.call_count == 2

    d = DeliveryFactory(pickup_location=Point(77.5, 12.9, srid=4326))
    assert Delivery.objects.get(pk=d.pk).pickup_location.coords == (77.5, 12.9)
    assert Delivery.objects.filter(pickup_location__dwithin=(Point(77.5, 12.9, srid=4326), 10)).exists()


@pytest.mark.django_db(transaction=True)
def test_an_alias_pointed_at_another_database_reads_that_databases_geometry_types():
    """The simulation sandbox points `default` at its own database for a run and back after it:
    each database's geometry type has its own OID, and with server-side binding the parameter
    carries it. Read the other database's types under one alias, come back, write geometries."""
    from django.db.utils import load_backend

    from simulation.sandbox import _ensure_database, _sim_db_name

    other = _sim_db_name(connection.settings_dict["NAME"])
    _ensure_database(other)
    conf = {**connection.settings_dict, "NAME": other, "OPTIONS": {
        k: v for k, v in connection.settings_dict.get("OPTIONS", {}).items() if k != "pool"}}
    alias = "types_probe"
    for name in (other, connection.settings_dict["NAME"]):
        wrapper = load_backend(conf["ENGINE"]).DatabaseWrapper({**conf, "NAME": name}, alias)
        try:
            with wrapper.cursor() as cur:
                cur.execute("SELECT 'geometry'::regtype::oid")
                (oid,) = cur.fetchone()
                cur.execute("SELECT ST_AsText(%s)", [wrapper.ops.Adapter(Point(77.5, 12.9, srid=4326))])
                assert cur.fetchone()[0] == "POINT(77.5 12.9)"
            assert PostGISDatabaseWrapper._type_infos["geometry"][alias].oid == oid
        finally:
            wrapper.close()


def test_bulk_writes_over_the_server_bound_parameter_limit_are_split():
    """65,535 parameters a statement with server-side binding: ~8,200 audit rows of 8 columns
    would be one INSERT of ~65,600 parameters, which PostgreSQL refuses; they go in two."""
    from django.test.utils import CaptureQueriesContext
    from django.utils.timezone import now

    from audit.models import DeliveryAuditLog

    assert connection.settings_dict["OPTIONS"].get("server_side_binding")
    assert connection.features.max_query_params == 65535
    delivery = DeliveryFactory()
    columns = [f for f in DeliveryAuditLog._meta.concrete_fields if f.attname != "seq"]
    assert len(columns) == 8
    n = 65535 // len(columns) + 10
    at = now()
    rows = [DeliveryAuditLog(delivery=delivery, timestamp=at, event_type="created", details={})
            for _ in range(n)]
    with CaptureQueriesContext(connection) as ctx:
        DeliveryAuditLog.objects.bulk_create(rows)
    assert sum(q["sql"].startswith("INSERT") for q in ctx.captured_queries) == 2
    assert DeliveryAuditLog.objects.filter(delivery=delivery).count() == n


def test_a_statement_run_repeatedly_on_a_connection_is_prepared_once():
    """Server-side binding with DB_PREPARE_THRESHOLD (5): the sixth run of a statement on a
    connection uses a prepared statement, parsed and planned once by PostgreSQL."""
    delivery = DeliveryFactory()
    for _ in range(7):
        assert Delivery.objects.filter(pk=delivery.pk).values_list("status", flat=True).get()
    with connection.cursor() as cur:
        cur.execute("SELECT statement FROM pg_prepared_statements WHERE statement LIKE %s",
                    ['%FROM "dispatch_delivery"%'])
        statements = [r[0] for r in cur.fetchall()]
    assert len(statements) == 1 and '"dispatch_delivery"."id" = $1' in statements[0]


@pytest.mark.parametrize("behind_pgbouncer, expected", [
    ("false", {"server_side_binding": True, "prepare_threshold": 5}),
    ("true", {"server_side_binding": None, "prepare_threshold": None}),
])
def test_pgbouncer_mode_binds_client_side_without_prepared_statements(behind_pgbouncer, expected):
    import json
    import os
    import subprocess
    import sys

    code = ("import json, django; from django.conf import settings; django.setup(); "
            "o = settings.DATABASES['default']['OPTIONS']; "
            "print(json.dumps({k: o.get(k) for k in ('server_side_binding', 'prepare_threshold')}))")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base", "DB_BEHIND_PGBOUNCER": behind_pgbouncer}
    env.pop("DB_PREPARE_THRESHOLD", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_bulk_update_batches_count_the_pk_beside_every_field():
    """bulk_update sends `WHEN pk = %s THEN %s` per field and object, and the pk in the WHERE:
    2F + 1 parameters an object (F + 2 as counted for an insert would overflow)."""
    from audit.models import DeliveryAuditLog

    pk = Delivery._meta.pk
    fields = [Delivery._meta.get_field(n) for n in ("status", "store_name", "seller_order_id")]
    objs = [None] * 100_000
    assert connection.ops.bulk_batch_size([pk, pk, *fields], objs) == 65535 // 7
    columns = [f for f in DeliveryAuditLog._meta.concrete_fields if f.attname != "seq"]
    assert connection.ops.bulk_batch_size(columns, objs) == 65535 // 8
    assert connection.ops.bulk_batch_size(columns, objs[:10]) == 10


def test_bulk_update_over_the_limit_goes_in_statements_that_fit():
    from django.test.utils import CaptureQueriesContext

    deliveries = DeliveryFactory.create_batch(3)
    for d in deliveries:
        d.store_name = "Renamed"
    with mock.patch.object(type(connection.features), "max_query_params", new_callable=mock.PropertyMock,
                           return_value=8):  # 3 parameters an object with one field: 2 a statement
        with CaptureQueriesContext(connection) as ctx:
            Delivery.objects.bulk_update(deliveries, ["store_name"])
    assert sum(q["sql"].startswith("UPDATE") for q in ctx.captured_queries) == 2
    assert set(Delivery.objects.filter(pk__in=[d.pk for d in deliveries]).values_list("store_name", flat=True)) == {"Renamed"}
