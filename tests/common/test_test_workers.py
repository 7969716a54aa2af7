"""`make test` runs the suite in pytest-xdist workers (Makefile, TEST_WORKERS): each worker's
tests must touch only its own PostgreSQL database and Redis databases and hear only its own
channel-layer messages (Redis pub/sub channels are shared by every Redis database)."""
import os

from django.conf import settings
from django.db import connection


def _worker() -> tuple[str, int]:
    name = os.environ.get("PYTEST_XDIST_WORKER", "")
    return name, int(name.removeprefix("gw") or 0)


def test_each_worker_has_its_own_test_database(db):
    name, _ = _worker()
    assert connection.settings_dict["NAME"].startswith("test_")
    if name:
        assert connection.settings_dict["NAME"].endswith(f"_{name}")


def test_each_worker_has_its_own_redis_databases_and_channel_prefixes():
    _, n = _worker()
    if os.environ.get("TEST_REDIS_URL") or os.environ.get("TEST_SIMULATION_REDIS_URL"):
        import pytest

        pytest.skip("a single-process run given its own Redis databases (config/settings/test.py)")
    redis_db = settings.REDIS_URL.rsplit("/", 1)[1]
    assert redis_db == str(15 - n)
    assert settings.SIMULATION_REDIS_URL.rsplit("/", 1)[1] == str(9 - n)
    assert settings.CELERY_BROKER_URL == settings.CELERY_RESULT_BACKEND == settings.REDIS_URL
    assert settings.CACHES["default"]["LOCATION"] == settings.REDIS_URL
    default, tracking = settings.CHANNEL_LAYERS["default"]["CONFIG"], settings.CHANNEL_LAYERS["tracking"]["CONFIG"]
    assert default["hosts"][0]["address"] == tracking["hosts"][0]["address"] == settings.REDIS_URL
    assert default["prefix"] == f"test-asgi-{n}"
    assert tracking["prefix"] == f"test-asgi-{n}.tracking"
    # never the development databases (0 for the app, 10 for the simulator)
    assert redis_db not in ("0", "10") and settings.SIMULATION_REDIS_URL.rsplit("/", 1)[1] not in ("0", "10")
