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
