"""The quick step's statement names the delivery's columns: prepared over `RETURNING d.*`, its
result had the columns of the moment PostgreSQL prepared it, and a migration adding a column
from another process failed every later run on the connections that prepared it ("cached plan
must not change result type") until they restarted. (`notifications.payloads`'s `d.*` over
`jsonb_populate_record` does not fail so: tried the same way.)"""
import psycopg
import pytest
from django.db import connection

from common.actors import Actor
from tests.factories import DeliveryFactory, online_driver
from workflows import deliveries as flows

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def prepare_at_once():
    connection.ensure_connection()
    pg = connection.connection
    before, pg.prepare_threshold = pg.prepare_threshold, 0
    assert before is not None  # the settings prepare statements
    yield
    pg.prepare_threshold = before


@pytest.fixture
def migrate_elsewhere():
    """Adds a column to the delivery table from another connection, as a migration would."""
    db = connection.settings_dict
    conninfo = dict(host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
                    password=db["PASSWORD"] or None, dbname=db["NAME"], autocommit=True)
    with psycopg.connect(**conninfo) as other:
        yield lambda: other.execute("ALTER TABLE dispatch_delivery ADD COLUMN migration_probe integer")
        other.execute("ALTER TABLE dispatch_delivery DROP COLUMN IF EXISTS migration_probe")


def _assigned():
    delivery, driver = DeliveryFactory(), online_driver()
    flows.assignment_create(delivery_id=delivery.pk, driver_id=driver.pk, actor=Actor.system())
    return delivery, driver


def test_the_quick_step_survives_a_column_added_after_it_was_prepared(prepare_at_once, migrate_elsewhere):
    (first, first_driver), (second, second_driver) = _assigned(), _assigned()
    flows.delivery_advance(delivery_id=first.pk, driver_id=first_driver.pk, step="pickup-started",
                           actor=Actor.for_user(first_driver.user))
    migrate_elsewhere()
    flows.delivery_advance(delivery_id=second.pk, driver_id=second_driver.pk, step="pickup-started",
                           actor=Actor.for_user(second_driver.user))
    second.refresh_from_db()
    assert second.pickup_started_at is not None

