import pytest
from rest_framework.test import APIClient

from common.redis import breaker, get_redis
from tests.api import ChannelListener, client_for
from tests.factories import (
    DeliveryFactory,
    DriverFactory,
    IntegrationUserFactory,
    OpsUserFactory,
    SupportUserFactory,
)
from tests import fast_flush

fast_flush.install()  # the flush after each transactional test: DELETE, not TRUNCATE (tests/fast_flush.py)


@pytest.fixture(scope="session", autouse=True)
def post_migrate_rows(django_db_setup, django_db_blocker):
    """The content types and permissions of the new test database, for tests/fast_flush.py."""
    from django.db import connection

    with django_db_blocker.unblock():
        fast_flush.remember_post_migrate_rows(connection)


@pytest.fixture(autouse=True)
def clean_redis(settings):
    """Tests use their own Redis database (see config/settings/test.py); empty it per test."""
    assert not settings.REDIS_URL.endswith("/0"), "tests must not touch the development Redis database"
    breaker.reset()  # a test that made Redis time out leaves no open breaker to the next
    get_redis().flushdb()
    yield
    breaker.reset()


@pytest.fixture(autouse=True)
def no_join_block_left_over():
    """Eager tasks guard joins with a process-wide Celery flag that each saves and restores;
    two threads running eager tasks at once (the race tests) can leave it set, and a later
    test's `task.delay().get()` then raises "Never call result.get() within a task!" (seen:
    tests/workflows/test_batch_races.py before the reconcile test). No test starts in a task."""
    from celery._state import _set_task_join_will_block

    _set_task_join_will_block(False)


@pytest.fixture
def anon():
    return APIClient()


@pytest.fixture
def ops_user(db):
    return OpsUserFactory()


@pytest.fixture
def ops(ops_user):
    return client_for(ops_user)


@pytest.fixture
def integration_user(db):
    return IntegrationUserFactory()


@pytest.fixture
def integration(integration_user):
    return client_for(integration_user)


@pytest.fixture
def agent(db):
    """A support agent (group `support`, not staff)."""
    return SupportUserFactory(first_name="Sam", last_name="Agent")


@pytest.fixture
def driver(db):
    return DriverFactory()


@pytest.fixture
def driver_client(driver):
    return client_for(driver.user)


@pytest.fixture
def delivery(integration_user):
    return DeliveryFactory(created_by=integration_user)


@pytest.fixture
def listen():
    """`listen("ops", "driver.<id>")` → a listener; `.drain()` returns the events received."""
    listeners = []

    def make(*groups):
        listener = ChannelListener(list(groups))
        listeners.append(listener)
        return listener

    yield make
    for listener in listeners:
        listener.close()


@pytest.fixture
def core_layer(settings):
    """The default channel layer as channels_redis's core layer (Channels rebuilds its layers
    when CHANNEL_LAYERS changes)."""
    from config.settings.base import core_channel_layer

    layers = dict(settings.CHANNEL_LAYERS)
    layers["default"] = core_channel_layer(settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] + ".core")
    layers["default"]["CONFIG"]["hosts"][0]["address"] = settings.REDIS_URL
    settings.CHANNEL_LAYERS = layers
