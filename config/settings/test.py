"""Test settings: the same real services, with a separate Redis database and prefixes."""
import os
from urllib.parse import urlsplit, urlunsplit


# Under pytest-xdist (`make test` runs two workers) each worker `gwN` has its own Redis
# databases (15 - N for the tests, 9 - N for the simulator) and pytest-django gives it its own
# test database (test_<name>_gwN). Up to four workers fit between the dev databases (0, 10).
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
assert _WORKER < 4, "at most four test workers: their Redis databases would reach the dev ones"


def _test_redis_url() -> str:
    explicit = os.environ.get("TEST_REDIS_URL")
    if explicit:
        return explicit
    parts = urlsplit(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    return urlunsplit((parts.scheme, parts.netloc, f"/{15 - _WORKER}", "", ""))


os.environ["REDIS_URL"] = _test_redis_url()
# The test runner renames and recreates the database; plain connections keep that simple.
os.environ.setdefault("DB_POOL_MAX_SIZE", "0")

from .base import *  # noqa: E402,F401,F403
from .base import CHANNEL_LAYERS, REST_FRAMEWORK, _redis_db_url, env  # noqa: E402

# Per worker: the layers are Redis pub/sub, whose channels every Redis database shares.
CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = f"test-asgi-{_WORKER}"
CHANNEL_LAYERS["tracking"]["CONFIG"]["prefix"] = f"test-asgi-{_WORKER}.tracking"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=True)
# The consumer runs inside the test process: it must not renice the test run.
FIX_CONSUMER_NICE = 0
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {"anon": "100000/min", "user": "100000/min"}

# A second single-process run (TEST_WORKERS=0) beside `make test` can isolate itself:
# TEST_DB_NAME=test_dispatch_2 TEST_REDIS_URL=redis://127.0.0.1:6379/11
# TEST_SIMULATION_REDIS_URL=redis://127.0.0.1:6379/5 (not with xdist: every worker would share them).
if env("TEST_DB_NAME", default=""):
    DATABASES["default"]["TEST"] = {"NAME": env("TEST_DB_NAME")}  # noqa: F405

# No collectstatic before tests: serve from the app finders and keep WhiteNoise quiet about
# the not-yet-collected STATIC_ROOT.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(exist_ok=True)  # noqa: F405

# The drop-off geofence on, at the figure a city would set (off by default: base.py): every
# test that completes a delivery puts its driver at the door (tests.factories.driver_at_dropoff),
# so each completion path, and its statement count, is exercised with the check.
DROPOFF_GEOFENCE_METERS = env.int("DROPOFF_GEOFENCE_METERS", default=200)

# The webhook tests' receivers listen on 127.0.0.1 (the SSRF tests switch this off).
WEBHOOK_ALLOW_PRIVATE_TARGETS = True

# The simulator's own Redis database in tests (another than the tests' REDIS_URL: a run flushes it).
SIMULATION_REDIS_URL = env("TEST_SIMULATION_REDIS_URL", default=_redis_db_url(REDIS_URL, 9 - _WORKER))  # noqa: F405
