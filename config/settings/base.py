"""Settings for every environment; values come from the environment with working defaults."""
import socket
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import environ
from django.core.exceptions import ImproperlyConfigured
from redis.connection import parse_url as redis_parse_url

from config.periodic import TIMER_TASKS, TIMERS_QUEUE, WEBHOOKS_QUEUE

BASE_DIR = Path(__file__).resolve().parent.parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

SECRET_KEY = env("SECRET_KEY", default="dev-insecure-change-me-0123456789abcdefghijklmnopqrstuvwxyz")
# Earlier keys, comma-separated, still accepted after a rotation (sessions, signed values, the
# sealed Idempotency-Key responses of common/idempotency.py).
SECRET_KEY_FALLBACKS = env.list("SECRET_KEY_FALLBACKS", default=[])
DEBUG = env.bool("DEBUG", default=False)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
# Served over HTTPS (TLS ended at the load balancer, which sets X-Forwarded-Proto and is in
# FORWARDED_ALLOW_IPS): the session and CSRF cookies only over HTTPS, and HSTS on every
# response. Off by default: `make run` and the tests serve plain HTTP on loopback.
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.gis",
    "rest_framework",
    "rest_framework_gis",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI and ReDoc served from our static files (no CDN)
    "import_export",
    "channels",
    "django_celery_beat",
    "common",
    "availability",
    "dispatch",
    "offers",
    "escalation",
    "audit",
    "zones",
    "tracking",
    "leaflet",
    "analytics",
    "notifications",
    "simulation",
]

MIDDLEWARE = [
    "common.middleware.RequestIdMiddleware",
    "common.middleware.MetricsMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "common.middleware.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "common.middleware.OpsTimeZoneMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "common.middleware.PageCspMiddleware",
    "common.middleware.RequestGuardMiddleware",
    "common.middleware.AdminListGuardMiddleware",
    "common.middleware.ApiErrorMiddleware",
    "common.idempotency.IdempotencyMiddleware",
]
# Token-authenticated API requests under ASGI skip the session stack (no session, CSRF,
# messages or auth middleware: DRF authenticates the token itself) and every middleware here
# is async-native, so such a request makes one thread hop, into the DRF view (config/asgi.py).
API_MIDDLEWARE = [
    "common.middleware.RequestIdMiddleware",
    "common.middleware.MetricsMiddleware",
    "common.middleware.ApiHeadersMiddleware",
    "common.middleware.RequestGuardMiddleware",
    "common.middleware.ApiErrorMiddleware",
    "common.idempotency.IdempotencyMiddleware",
]

# Token-authenticated API requests a web process runs at once (config/asgi.py, LeanApiHandler);
# the rest wait their turn, first come first served. 0: no limit.
API_REQUEST_CONCURRENCY = env.int("API_REQUEST_CONCURRENCY", default=4)
# The web processes' HTTP protocol (common/httpprotocol.py): a request's line and headers over
# this many bytes are a 431; a head not complete this long after a connection opened (or a later
# request began) closes the connection. 0: no limit.
HTTP_MAX_HEAD_BYTES = env.int("HTTP_MAX_HEAD_BYTES", default=64 * 1024)
HTTP_HEAD_TIMEOUT_SECONDS = env.float("HTTP_HEAD_TIMEOUT_SECONDS", default=30.0)

ROOT_URLCONF = "config.urls"
APPEND_SLASH = False
AUTH_USER_MODEL = "common.User"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "config.wsgi.application"
ASGI_APPLICATION = "config.asgi.application"

DATABASES = {
    "default": env.db_url(
        "DATABASE_URL", default="postgis://dispatch:dispatch@127.0.0.1:5432/dispatch"
    )
}
# Django's PostGIS backend, its geometry adapters registered once per pooled connection
DATABASES["default"]["ENGINE"] = "common.postgis"
# Under ASGI every request runs in its own thread, so persistent per-thread connections pile
# up; Django's built-in psycopg pool bounds them per process instead (CONN_MAX_AGE must be 0).
DB_POOL_MAX_SIZE = env.int("DB_POOL_MAX_SIZE", default=8)
if DB_POOL_MAX_SIZE > 0:
    DATABASES["default"]["CONN_MAX_AGE"] = 0
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 1,
        "max_size": DB_POOL_MAX_SIZE,
        "timeout": env.float("DB_POOL_TIMEOUT", default=10.0),
    }
    # Check each pooled connection as it is handed out (psycopg_pool's `check`, one empty
    # round trip): after a PostgreSQL restart the idle ones are dead, and are replaced instead
    # of failing the request. Django passes `check=ConnectionPool.check_connection` itself
    # when CONN_HEALTH_CHECKS is set ("check" in the pool options would be passed twice).
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("DB_CONN_MAX_AGE", default=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# Parameters bound by the server and, after DB_PREPARE_THRESHOLD runs of the same statement on a
# connection, prepared statements: PostgreSQL parses and plans a pooled connection's repeated
# statements once (Django's default is client-side binding, every statement parsed and planned
# again: a third to a half of the database's CPU of an offer flow, bench/README.md). Behind PgBouncer in
# transaction mode a server connection changes between transactions: no server-side cursors,
# no prepared statements, parameters bound client-side as Django does by default.
_prepare_threshold = env.str("DB_PREPARE_THRESHOLD", default="5").strip().lower()
_prepare_threshold = None if _prepare_threshold in ("", "none", "off") else int(_prepare_threshold)
if env.bool("DB_BEHIND_PGBOUNCER", default=False):
    DATABASES["default"]["DISABLE_SERVER_SIDE_CURSORS"] = True
    DATABASES["default"].setdefault("OPTIONS", {})["prepare_threshold"] = None
else:
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        server_side_binding=True,
        prepare_threshold=_prepare_threshold,
    )
# The longest PostgreSQL runs one statement of this process, and waits for one lock, before
# cancelling it (milliseconds; 0: no limit, PostgreSQL's default). A request cancelled so gets a
# 503 (common.errors) and the transaction it was in rolls back. Off for every process unless set; web processes
# default to 30 s and 10 s (config/asgi.py): a stuck query or a transaction left holding a row
# lock held its requests without end, and four such took all of a process's token requests'
# turns (API_REQUEST_CONCURRENCY). Sent as the connection's startup options, which PgBouncer
# refuses: behind it the pool sets them (the cluster's `dispatch_web`, docs/operations.md).
DB_STATEMENT_TIMEOUT_MS = env.int("DB_STATEMENT_TIMEOUT_MS", default=0)
DB_LOCK_TIMEOUT_MS = env.int("DB_LOCK_TIMEOUT_MS", default=0)
_session_options = " ".join(
    f"-c {name}={ms}"
    for name, ms in (("statement_timeout", DB_STATEMENT_TIMEOUT_MS), ("lock_timeout", DB_LOCK_TIMEOUT_MS))
    if ms > 0
)
if _session_options and not env.bool("DB_BEHIND_PGBOUNCER", default=False):
    _options = DATABASES["default"].setdefault("OPTIONS", {})
    # The URL's own options first; else the environment's PGOPTIONS, which libpq would drop
    # once any options are given.
    _given = _options.get("options") or env.str("PGOPTIONS", default="")
    _options["options"] = f"{_given} {_session_options}" if _given.strip() else _session_options
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
# The console's exports need the model's view permission, as its list does (django-import-export
# checks none by default: a staff login in no group downloaded every delivery).
IMPORT_EXPORT_EXPORT_PERMISSION_CODE = "view"

# The largest request body the API reads (bytes); a larger one is a 413 (common.middleware).
API_MAX_BODY_BYTES = env.int("API_MAX_BODY_BYTES", default=1024 * 1024)
# Before a 413 the rest of the upload is read and dropped, up to this many bytes in this many
# seconds, so the client sees the 413 rather than a reset connection.
API_BODY_DRAIN_BYTES = env.int("API_BODY_DRAIN_BYTES", default=32 * 1024 * 1024)
# The pages (admin, /support/, /track/): a declared body over this is a 413 before it is read
# (common.middleware.EarlyBodyLimit); room for the admin's imports. 0: no limit.
PAGE_MAX_BODY_BYTES = env.int("PAGE_MAX_BODY_BYTES", default=20 * 1024 * 1024)
API_BODY_DRAIN_SECONDS = env.float("API_BODY_DRAIN_SECONDS", default=10.0)

# Web processes collect their youngest generation of objects every this many allocations
# (CPython's default 700): config/asgi.py, docs/operations.md.
GC_YOUNG_THRESHOLD = env.int("GC_YOUNG_THRESHOLD", default=50_000)

REDIS_URL = env("REDIS_URL", default="redis://127.0.0.1:6379/0")
# /metrics: with a token, `Authorization: Bearer <token>` is required; without, loopback only.
METRICS_TOKEN = env("METRICS_TOKEN", default="")
# Seconds a Redis call may take before we treat Redis as down and fall back.
REDIS_SOCKET_TIMEOUT = env.float("REDIS_SOCKET_TIMEOUT", default=0.5)
# A Redis that times out REDIS_BREAKER_TIMEOUTS times within REDIS_BREAKER_SECONDS is not
# waited for again by this process for REDIS_BREAKER_SECONDS: calls fail at once and fall back
# (common.redis.RedisBreaker; 0 seconds: never).
REDIS_BREAKER_SECONDS = env.float("REDIS_BREAKER_SECONDS", default=2.0)
REDIS_BREAKER_TIMEOUTS = env.int("REDIS_BREAKER_TIMEOUTS", default=2)
# Hash tag of the live fleet keys (common.redis.fleet_key): one slot per fleet under Redis Cluster.
REDIS_FLEET_TAG = env("REDIS_FLEET_TAG", default="fleet")
# The location fast lane (availability/api/fastlane.py) and its stream (docs/architecture.md).
LOCATION_FAST_LANE = env.bool("LOCATION_FAST_LANE", default=True)
FAST_LANE_REDIS_CONNECTIONS = env.int("FAST_LANE_REDIS_CONNECTIONS", default=64)
FIX_STREAM_MAXLEN = env.int("FIX_STREAM_MAXLEN", default=1_000_000)
FIX_BATCH_SIZE = env.int("FIX_BATCH_SIZE", default=1000)
# Niceness the stream consumer adds to its own process (manage.py consume_fixes): it has a
# second to write a fix, the web workers milliseconds to answer one, so under CPU contention
# the scheduler runs them first (0: as the shell started it).
FIX_CONSUMER_NICE = env.int("FIX_CONSUMER_NICE", default=10)

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cache",
        "OPTIONS": {
            "socket_timeout": REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": REDIS_SOCKET_TIMEOUT,
        },
    }
}

# The default layer (ops, support, driver and login groups): Redis pub/sub, as the customers'
# tracking layer below. channels_redis's core layer (CHANNELS_LAYER=core) queues each message
# in Redis for each socket and a web process pays a round trip and ~3–4 ms of CPU per message
# it receives: under 16 offer flows a process fell behind, ops events arrived 6–12 s late and
# most had not arrived when the run ended (bench/README.md, thirtieth session). Pub/sub pushes each message to the
# processes whose sockets joined the group. Core still bounds a slow process's backlog
# (capacity, expiry) where pub/sub queues it in memory.
CHANNELS_LAYER = env("CHANNELS_LAYER", default="pubsub")
if CHANNELS_LAYER not in ("pubsub", "core"):
    raise ImproperlyConfigured(f"CHANNELS_LAYER must be pubsub or core, not {CHANNELS_LAYER!r}.")


# The channel layers' names in Redis. Pub/sub channels are shared by every database of a Redis
# server: a deployment on database N (not 0) gets its own names by default (`asgi.dbN`), so two
# deployments (or a bench) on one server's databases no longer hear each other's events.
# (Upgrading a deployment on database N from before this: set CHANNELS_PREFIX=asgi, or restart
# every web process and worker at once; old and new processes do not hear each other.)


def _default_channels_prefix(url: str) -> str:
    try:
        db = int(redis_parse_url(url).get("db") or 0)
    except ValueError:  # (a scheme redis-py's URL parser does not know: sentinel, …)
        db = 0
    return "asgi" if db == 0 else f"asgi.db{db}"


CHANNELS_PREFIX = env("CHANNELS_PREFIX", default=None) or _default_channels_prefix(REDIS_URL)


def core_channel_layer(prefix: str) -> dict:
    """channels_redis's core layer (common.channels.PooledRedisChannelLayer) under `prefix`."""
    return {
        "BACKEND": "common.channels.PooledRedisChannelLayer",
        "CONFIG": {
            # (reads wait a margin above its 5 s blocking BZPOPMIN: redis-py's default 5 s
            # socket timeout could end an idle socket's receive first and kill the consumer)
            "hosts": [{"address": REDIS_URL, "socket_timeout": env.float("CHANNELS_REDIS_SOCKET_TIMEOUT", default=15.0)}],
            "prefix": prefix,
            "capacity": 1000,
            # A process's sockets share one Redis list ("specific.<process>!"): give it room
            # for a burst while its receive loop catches up.
            "channel_capacity": {"specific.*": env.int("CHANNELS_PROCESS_CAPACITY", default=20000)},
            "expiry": 30,
        },
    }



def pubsub_hosts(url: str) -> list[dict]:
    """The pub/sub layers' Redis. Their connections probe an idle peer (TCP keep-alive after
    10 s idle, every 5 s, 3 missed): a connection whose Redis vanished without a word (a
    failover's old address, a partition) fails within ~25 s and is made again, and its
    sockets are closed (1012) to reload (common.channels._Shard). Without it a web process
    listened on a dead connection for the kernel's two hours, its sockets open and silent.
    One that stays open and says nothing (a Redis stuck, half-open behind a proxy) is found
    by the layer's PING (`_Shard.ping_seconds`, `answer_seconds`). A connect waits 5 s at most
    (the kernel's own wait is minutes), and each write and each reply of a connect's
    handshake 5 s (redis-py's default, spelled out: a reconnect Redis does not answer gives up
    and is tried again a second later; the receive loop's reads set their own wait)."""
    host = {"address": url, "socket_connect_timeout": 5.0, "socket_timeout": 5.0}
    if url.split("://", 1)[0] in ("redis", "rediss"):  # (TCP: a Unix socket has no keep-alive)
        host["socket_keepalive"] = True
        host["socket_keepalive_options"] = {getattr(socket, name): value for name, value in
                                            (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
                                            if hasattr(socket, name)}
    return [host]


CHANNEL_LAYERS = {
    "default": core_channel_layer(CHANNELS_PREFIX) if CHANNELS_LAYER == "core" else {
        "BACKEND": "common.channels.CoalescingPubSubChannelLayer",
        # (capacity: a socket's queue in the web process; past it the socket is closed, 1013)
        "CONFIG": {"hosts": pubsub_hosts(REDIS_URL), "prefix": CHANNELS_PREFIX, "capacity": 1000},
    },
    # Customer tracking (groups "delivery.<id>", common.broadcast.TRACKING_LAYER): Redis
    # pub/sub. A message is pushed to the processes whose sockets joined the group and put on
    # the socket's queue in memory: no per-message round trip or poll, which is what let the
    # core layer serve 5,000 tracking sockets (bench/README.md). At most once, like every
    # live event here: a customer who misses one gets the next fix a few seconds later.
    "tracking": {
        "BACKEND": "common.channels.CoalescingPubSubChannelLayer",
        "CONFIG": {
            "hosts": pubsub_hosts(REDIS_URL),
            "prefix": CHANNELS_PREFIX + ".tracking",
        },
    },
}

# The channel layer's Redis pool per event loop (common/channels.py): callers wait for a
# free connection rather than fail during a socket storm.
CHANNELS_REDIS_MAX_CONNECTIONS = env.int("CHANNELS_REDIS_MAX_CONNECTIONS", default=200)
CHANNELS_REDIS_POOL_TIMEOUT = env.float("CHANNELS_REDIS_POOL_TIMEOUT", default=10.0)
# Idle connections a pool keeps after a burst; beyond this, those idle for IDLE_SECONDS close.
CHANNELS_REDIS_MAX_IDLE = env.int("CHANNELS_REDIS_MAX_IDLE", default=16)
CHANNELS_REDIS_IDLE_SECONDS = env.float("CHANNELS_REDIS_IDLE_SECONDS", default=5.0)

# Celery
CELERY_BROKER_URL = env("CELERY_BROKER_URL", default=REDIS_URL)
# kombu's Redis transport with one client per pool (common/celery_transport.py); other brokers
# (amqp://, sentinel://) keep kombu's transport for their scheme.
if CELERY_BROKER_URL.split("://", 1)[0] == "redis":  # not rediss: kombu turns TLS on by its scheme name
    CELERY_BROKER_TRANSPORT = "common.celery_transport:Transport"
# kombu waits for a Redis broker with no timeout by default: a request that enqueued a task while
# the broker hung waited as long as the hang. Above the consumers' 1 s BRPOP, and under the
# Redis breaker's 2 s window (REDIS_BREAKER_SECONDS), so that the two attempts of one publish
# open it (at 2 s they fell just outside it, and the next publish waited its two timeouts too).
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "socket_timeout": env.float("CELERY_BROKER_SOCKET_TIMEOUT", default=1.5),
    "socket_connect_timeout": env.float("CELERY_BROKER_SOCKET_TIMEOUT", default=1.5),
}
# One retry of a failed publish (Celery's default is three): with the broker hung, a request
# waits two or three socket timeouts for it (the retry reconnects, and a new channel PINGs)
# unless the breaker opens first: each timed-out attempt counts (config/celery.py's errback).
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.2}
CELERY_RESULT_BACKEND = env("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_SOFT_TIME_LIMIT = env.int("CELERY_TASK_SOFT_TIME_LIMIT", default=50)
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=60)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_EXPIRES = 3600
# Every task is fire-and-forget (none of ours reads a result): sending one then costs no result
# subscription (the Redis result backend SUBSCRIBEs per task sent unless results are ignored),
# and the backend is one object for all threads (under ASGI each request runs on a thread of its
# own, and a per-thread backend was built anew for most requests that enqueue a task).
# A caller that wants a result asks for it: apply_async(..., ignore_result=False).
CELERY_TASK_IGNORE_RESULT = True
CELERY_RESULT_BACKEND_THREAD_SAFE = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# High-volume work (the ETA refreshes after status changes: at most one run a second for the
# whole fleet, or one task per change while Redis is down) has its own queue, `eta`; work due at
# a moment (offer expiry, the safety nets) has `timers` (config/periodic.py). Every worker takes
# the three: `celery worker -Q timers,celery,eta`.
# The webhook sweep (notifications.deliver_webhooks) calls the sellers' endpoints: a hanging one
# holds its process up to the sweep's budget (WEBHOOK_SEND_BUDGET_SECONDS), so it has a queue,
# `webhooks`, and a worker of its own that no other worker takes (`-Q webhooks --concurrency 2`:
# one sweep sends, WEBHOOK_SENDING_SWEEPS, another fans out meanwhile). On the general worker it
# held one of two processes 30 s at a time, and the ETA refreshes and customer messages waited.
# simulation.run takes over its worker process's database connection for minutes: a worker of
# its own (`-Q simulation --concurrency 1`, docs/dispatch.md "The simulator").
CELERY_TASK_ROUTES = {
    **{task: {"queue": TIMERS_QUEUE} for task in TIMER_TASKS},
    "tracking.refresh_eta": {"queue": "eta"}, "tracking.refresh_due_etas": {"queue": "eta"},
    "notifications.deliver_webhooks": {"queue": WEBHOOKS_QUEUE},
    "simulation.run": {"queue": "simulation"},
}
CELERY_TIMEZONE = "UTC"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
# The customer's pages under /track/ speak the delivery's customerLanguage (else the browser's
# Accept-Language) when it is one of these; the API, the console and the messages' own
# templates do not use them (locale/: the .po and its compiled .mo, both committed).
LANGUAGES = [("en", "English"), ("es", "Español")]
LOCALE_PATHS = [BASE_DIR / "locale"]
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
MEDIA_ROOT = env("MEDIA_ROOT", default=str(BASE_DIR / "media"))
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

LOGIN_URL = "/admin/login/"
# After a login with no (or an unsafe) `next`: `/`, which sends staff to the console and everyone
# else to the API docs (Django's default, /accounts/profile/, is no page here).
LOGIN_REDIRECT_URL = "/"

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # Token first so that unauthenticated requests get 401 with a challenge.
        "availability.api.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "common.negotiation.ContentNegotiation",
    "DEFAULT_PARSER_CLASSES": ["common.parsers.JSONParser"],
    # Errors not of one field, under `details` (SPEC: JSON keys are camelCase)
    "NON_FIELD_ERRORS_KEY": "nonFieldErrors",
    "DEFAULT_THROTTLE_CLASSES": [
        "common.throttling.AnonRateThrottle",
        "common.throttling.UserRateThrottle",
    ],
    # An anonymous caller is counted by its address as the server saw it (uvicorn takes it from
    # X-Forwarded-For only when the peer is in FORWARDED_ALLOW_IPS: a proxy of ours), never by
    # the raw header: with DRF's default (None) any client sent a new X-Forwarded-For each time
    # and was never throttled (password guessing on /v2/auth/token), or spent another's allowance.
    "NUM_PROXIES": 0,
    "DEFAULT_THROTTLE_RATES": {
        "anon": env("THROTTLE_ANON_RATE", default="300/min"),
        "user": env("THROTTLE_USER_RATE", default="20000/min"),
        # the customer's endpoints (delivery status, rating) by tracking link, and per address
        "customer": env("THROTTLE_CUSTOMER_RATE", default="1200/min"),
        "customer_address": env("THROTTLE_CUSTOMER_ADDRESS_RATE", default="20000/min"),
        # links that matched no delivery, per address (made-up links: each a database lookup)
        "customer_miss": env("THROTTLE_CUSTOMER_MISS_RATE", default="300/min"),
    },
    "EXCEPTION_HANDLER": "common.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "common.schema.AutoSchema",
    "DEFAULT_PAGINATION_CLASS": None,
    "COERCE_DECIMAL_TO_STRING": False,
    "DATETIME_FORMAT": "iso-8601",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Dispatch platform API",
    "DESCRIPTION": (
        "Last-mile delivery dispatch: drivers, deliveries, timed offers, availability, "
        "escalation, audit. Errors share one body: statusCode, timestamp, path, message, "
        "error, details. POSTs accept an Idempotency-Key header."
    ),
    "VERSION": "2.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/v2",
    "ENUM_NAME_OVERRIDES": {
        "DriverAvailabilityEnum": "availability.models.DriverAvailability",
        "SettableAvailabilityEnum": "availability.models.SETTABLE_AVAILABILITY_CHOICES",
        "DeliveryStatusEnum": "dispatch.models.DeliveryStatus",
        "VehicleTypeEnum": "availability.models.VehicleType",
        "OnBreakStatusEnum": ["on_break"],
        "ProofKindEnum": "dispatch.models.ProofKind",
    },
    "DISABLE_ERRORS_AND_WARNINGS": False,
    # Swagger UI and ReDoc from drf-spectacular-sidecar's pinned builds in our static files.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # The schema says what the server does with empty query values (common.schema).
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "common.schema.query_parameters_as_served"],
}

# Domain settings (SPEC "Settings")
TRACKING_BASE_URL = env("TRACKING_BASE_URL", default="http://127.0.0.1:8000/track")
OFFER_DEFAULT_EXPIRES_SECONDS = env.int("OFFER_DEFAULT_EXPIRES_SECONDS", default=30)
DISPATCH_RADIUS_KM = env.float("DISPATCH_RADIUS_KM", default=5.0)
DISPATCH_WIDE_RADIUS_KM = env.float("DISPATCH_WIDE_RADIUS_KM", default=10.0)
# The retry job skips a delivery whose last attempt is more recent than this (a run of the job
# a moment ago, a worker catching up on a backlog): two runs close together do not both attempt
# it. Short: a delivery that failed otherwise (an expiry) just before a run waits one more period.
DISPATCH_RETRY_MIN_GAP_SECONDS = env.int("DISPATCH_RETRY_MIN_GAP_SECONDS", default=3)
ESCALATION_LEVEL1_SECONDS = env.int("ESCALATION_LEVEL1_SECONDS", default=300)
ESCALATION_LEVEL2_SECONDS = env.int("ESCALATION_LEVEL2_SECONDS", default=900)
ESCALATION_LEVEL3_SECONDS = env.int("ESCALATION_LEVEL3_SECONDS", default=1800)
DRIVER_STALE_AFTER_SECONDS = env.int("DRIVER_STALE_AFTER_SECONDS", default=600)
# The stale-driver job leaves a driver whose state changed less than this ago (resumed a moment
# ago: the app's first fix is on its way).
DRIVER_STALE_GRACE_SECONDS = env.int("DRIVER_STALE_GRACE_SECONDS", default=30)
IDEMPOTENCY_TTL_SECONDS = env.int("IDEMPOTENCY_TTL_SECONDS", default=24 * 3600)
# A token from POST /v2/auth/token expires after this (0: never). Onboarding tokens never do.
API_LOGIN_TOKEN_TTL_SECONDS = env.int("API_LOGIN_TOKEN_TTL_SECONDS", default=30 * 24 * 3600)
# Open ops/driver/support sockets re-check their login this often (jittered down to 80%), for
# changes no model signal reports (bulk updates, SQL); 0 = only on signals and token expiry.
SOCKET_LOGIN_RECHECK_SECONDS = env.int("SOCKET_LOGIN_RECHECK_SECONDS", default=300)
# At most this many sockets of one kind per login (per customer link on /ws/track/) in each web
# process; one more closes with 4429. 0 (the default): no cap, since load tests and socket storms
# hold thousands on one token; a deployment sets e.g. 20 (docs/operations.md).
SOCKET_MAX_PER_CREDENTIAL = env.int("SOCKET_MAX_PER_CREDENTIAL", default=0)
DEMO_OPS_PASSWORD = env("DEMO_OPS_PASSWORD", default="ops")

# Prometheus: set PROMETHEUS_MULTIPROC_DIR when running several processes.
PROMETHEUS_MULTIPROC_DIR = env("PROMETHEUS_MULTIPROC_DIR", default="")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "django.channels.server": {"level": "WARNING"},
    },
}

# Debian 12 ships GDAL 3.6; the warning is about untrusted spatial reference input, which we
# never pass to GDAL (points and polygons come in as numbers / GeoJSON and go to PostGIS).
SILENCED_SYSTEM_CHECKS = ["gis.W001"]

# Pricing (documented in docs/dispatch.md). Money is Decimal; these are strings on purpose.
DRIVER_BASE_PAY = env("DRIVER_BASE_PAY", default="30.00")
DRIVER_PAY_PER_KM = env("DRIVER_PAY_PER_KM", default="8.00")
# No payout above this, whatever the distance (a zone may set its own per-km rate and cap).
DRIVER_PAY_CAP = env("DRIVER_PAY_CAP", default="300.00")
# The fee of a delivery created without one (and of a quote): base + per km of the leg, capped.
DELIVERY_FEE_PER_KM = env("DELIVERY_FEE_PER_KM", default="0.00")
DELIVERY_FEE_CAP = env("DELIVERY_FEE_CAP", default="500.00")
# Serviceability at intake and in quotes (docs/dispatch.md): a pickup outside every zone is
# refused while any zone exists (false: allowed), and so is a leg longer than the limit (a zone
# may set its own).
# Off by default: the SPEC accepts a delivery anywhere (its contract tests create them at random
# spots on the globe, with legs of thousands of km). A city turns them on; a zone's own
# max_delivery_distance_km applies whatever the global limit (0 = none).
SERVICEABILITY_REQUIRE_ZONE = env.bool("SERVICEABILITY_REQUIRE_ZONE", default=False)
MAX_DELIVERY_DISTANCE_KM = env.float("MAX_DELIVERY_DISTANCE_KM", default=0.0)
QUOTE_TTL_SECONDS = env.int("QUOTE_TTL_SECONDS", default=300)
# An unused quote is deleted this long after it expired (the hourly purge); a used one stays
# with its delivery.
QUOTE_RETENTION_SECONDS = env.int("QUOTE_RETENTION_SECONDS", default=86400)
# Proof of delivery (docs/dispatch.md): the policy of a delivery created without proofRequired
# in a zone that sets none (none, code).
DEFAULT_PROOF_POLICY = env("DEFAULT_PROOF_POLICY", default="none")
# The drop-off geofence (docs/dispatch.md, "Geofence"): delivery-completed more than this many
# metres from the drop-off, by the driver's latest fix (none, or older than
# DRIVER_STALE_AFTER_SECONDS, counts as unknown), is a 409 unless the driver gives an
# overrideReason (then flagged on the delivery and audited). 0 switches the check off.
# Off by default, as serviceability above: the SPEC completes a delivery wherever the driver is
# (its flows put the driver's fix at the pickup and complete 2 km away). A city turns it on
# (200 is the figure issue 15 gives); the tests run with it on (config/settings/test.py).
DROPOFF_GEOFENCE_METERS = env.int("DROPOFF_GEOFENCE_METERS", default=0)
# Photo and signature proofs (docs/dispatch.md, "Proof of delivery"): the largest file taken
# (bytes; more is a 413), the most pixels an image may have (decompression bombs are refused
# before they are decoded), the policies whose deliveries need a photo to fail (comma list, e.g.
# "photo,code_or_photo"; empty: none), how long after a failure its driver may still add
# evidence (seconds; 0: not after), how long a signed proof URL works, and whether the customer
# status carries proof URLs (off: it says only which proofs exist and when).
PROOF_MAX_BYTES = env.int("PROOF_MAX_BYTES", default=5 * 1024 * 1024)
PROOF_MAX_PIXELS = env.int("PROOF_MAX_PIXELS", default=12_000_000)
# The long side (pixels) a stored proof is scaled down to when larger: proofs are evidence photos,
# not originals, and a smaller image is cheaper to re-encode, store and serve.
PROOF_MAX_DIMENSION = env.int("PROOF_MAX_DIMENSION", default=2560)
# How many proof images one process decodes and re-encodes at once (the others wait their turn,
# up to 30 s, then a 503): a burst of large uploads cannot take every core of the box.
PROOF_DECODE_CONCURRENCY = env.int("PROOF_DECODE_CONCURRENCY", default=2)
# Proof uploads a web process runs at once, in a lane of their own instead of the API's turns
# (API_REQUEST_CONCURRENCY; config/asgi.py): uploads waiting to be decoded held every turn, and
# one driver's burst of large photos stalled every other API call. The rest wait on the loop.
PROOF_UPLOAD_CONCURRENCY = env.int("PROOF_UPLOAD_CONCURRENCY", default=4)
# Proofs one delivery may have (any driver's); one more is a 409.
PROOF_MAX_PER_DELIVERY = env.int("PROOF_MAX_PER_DELIVERY", default=20)
PROOF_FAILURE_PHOTO_POLICIES = env.list("PROOF_FAILURE_PHOTO_POLICIES", default=[])
PROOF_FAILURE_EVIDENCE_SECONDS = env.int("PROOF_FAILURE_EVIDENCE_SECONDS", default=900)
PROOF_URL_TTL_SECONDS = env.int("PROOF_URL_TTL_SECONDS", default=300)
PROOF_URLS_FOR_CUSTOMERS = env.bool("PROOF_URLS_FOR_CUSTOMERS", default=False)
# Where proof files are stored (the "proofs" storage below): local files under PROOF_MEDIA_ROOT
# by default, never served directly (only through the signed /proofs/<token> view), or an
# S3-compatible bucket through django-storages (PROOF_STORAGE=s3; boto3 must then be installed).
PROOF_STORAGE = env("PROOF_STORAGE", default="local")
# Django reads at most this much of a request body into memory; uploads of PROOF_MAX_BYTES (plus
# their multipart framing) must fit, also when an Idempotency-Key makes the body be hashed. API
# bodies stay capped by API_MAX_BODY_BYTES (common.middleware), the proof upload's by PROOF_MAX_BYTES.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(2_621_440, PROOF_MAX_BYTES + 64 * 1024)
PROOF_MEDIA_ROOT = env("PROOF_MEDIA_ROOT", default=str(BASE_DIR / "media" / "proofs"))
if PROOF_STORAGE == "s3":
    # django-storages' S3 backend (AWS S3, MinIO, Ceph, R2, …): a private bucket; the app reads
    # the file and serves it itself, so bucket URLs are never handed out.
    STORAGES["proofs"] = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env("PROOF_S3_BUCKET", default=""),
            "endpoint_url": env("PROOF_S3_ENDPOINT_URL", default=None),
            "region_name": env("PROOF_S3_REGION", default=None),
            "access_key": env("PROOF_S3_ACCESS_KEY_ID", default=None),
            "secret_key": env("PROOF_S3_SECRET_ACCESS_KEY", default=None),
            "location": env("PROOF_S3_PREFIX", default="proofs"),
            "default_acl": "private",
            "file_overwrite": False,
        },
    }
else:
    STORAGES["proofs"] = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"location": PROOF_MEDIA_ROOT},
    }
# Dispatch policies (docs/dispatch.md, "Dispatch policies"): the default for a zone that sets
# none, and each policy's knobs (zones/policies.py).
DISPATCH_POLICY = env("DISPATCH_POLICY", default="sequential")
DISPATCH_BATCH_SIZE = env.int("DISPATCH_BATCH_SIZE", default=3)
DISPATCH_BROADCAST_MAX = env.int("DISPATCH_BROADCAST_MAX", default=25)
DISPATCH_MATCHING_WINDOW_SECONDS = env.int("DISPATCH_MATCHING_WINDOW_SECONDS", default=5)
# batched_matching's cost of a driver for a delivery (workflows/matching.py), in seconds added to
# the estimated pickup time: PENALTY × (1 − acceptance rate), and the flat penalty of a driver
# whose preference for the zone is not PREFERRED; and the most deliveries one round matches
# (the oldest; the rest wait for the next round).
DISPATCH_MATCHING_ACCEPTANCE_PENALTY_SECONDS = env.float("DISPATCH_MATCHING_ACCEPTANCE_PENALTY_SECONDS", default=120.0)
DISPATCH_MATCHING_NOT_PREFERRED_PENALTY_SECONDS = env.float("DISPATCH_MATCHING_NOT_PREFERRED_PENALTY_SECONDS", default=60.0)
DISPATCH_MATCHING_MAX_DELIVERIES = env.int("DISPATCH_MATCHING_MAX_DELIVERIES", default=200)
# Order stacking: off unless a zone or this turns it on; a second delivery from a pickup within
# the radius of the first's, adding at most the detour to the first's drop-off, up to the
# vehicle's capacity.
STACKING_ENABLED = env.bool("STACKING_ENABLED", default=False)
STACKING_PICKUP_RADIUS_METERS = env.int("STACKING_PICKUP_RADIUS_METERS", default=300)
STACKING_MAX_DETOUR_MINUTES = env.int("STACKING_MAX_DETOUR_MINUTES", default=10)
VEHICLE_CAPACITY = {
    "bicycle": 2, "motorbike": 2, "scooter": 2, "walking": 1, "car": 3, "van": 3, "default": 1,
    **env.dict("VEHICLE_CAPACITY", cast={"value": int}, default={}),
}
# Where offers are pushed besides the driver's socket (dotted path to a PushBackend).
PUSH_BACKEND = env("PUSH_BACKEND", default="offers.push.LoggingPushBackend")
# Delivery economics (docs/analytics.md): platform revenue and cost per delivery.
DEFAULT_DELIVERY_FEE = env("DEFAULT_DELIVERY_FEE", default="49.00")
SELLER_COMMISSION = env("SELLER_COMMISSION", default="10.00")
PAYMENT_FEE_RATE = env("PAYMENT_FEE_RATE", default="0.029")
INFRA_POSTGRES_COST = env("INFRA_POSTGRES_COST", default="0.02")
INFRA_REDIS_COST = env("INFRA_REDIS_COST", default="0.01")
INFRA_API_CALLS_COST = env("INFRA_API_CALLS_COST", default="0.03")

# Customer tracking and ETA (docs/tracking.md).
# Routing backend: "great_circle" (no I/O), "osrm" (OSRM_URL), or a dotted path to a class.
ROUTING_BACKEND = env("ROUTING_BACKEND", default="great_circle")
OSRM_URL = env("OSRM_URL", default="http://127.0.0.1:5000")
OSRM_TIMEOUT_SECONDS = env.float("OSRM_TIMEOUT_SECONDS", default=1.0)
OSRM_COOLDOWN_SECONDS = env.float("OSRM_COOLDOWN_SECONDS", default=30.0)
ETA_MIN_INTERVAL_SECONDS = env.float("ETA_MIN_INTERVAL_SECONDS", default=15.0)
ETA_MIN_MOVE_METERS = env.float("ETA_MIN_MOVE_METERS", default=250.0)
# The ETA refresh after a status change runs this long after the first change that kicked it,
# with every change marked meanwhile (one Celery message a second at most, whatever the fleet).
ETA_REFRESH_BATCH_SECONDS = env.float("ETA_REFRESH_BATCH_SECONDS", default=1.0)
ETA_CHANGE_THRESHOLD_SECONDS = env.float("ETA_CHANGE_THRESHOLD_SECONDS", default=30.0)
ETA_CONFIDENCE_THRESHOLD = env.float("ETA_CONFIDENCE_THRESHOLD", default=0.05)
# The tracking page's map: Leaflet from a CDN and a tile server; empty → no map (text only).
# Leaflet is served from our static files (django-leaflet bundles a pinned release with its
# licence): the customer's page, which carries a token, loads no third-party code.
TRACKING_LEAFLET_URL = env("TRACKING_LEAFLET_URL", default="/static/leaflet")
TRACKING_TILE_URL = env("TRACKING_TILE_URL", default="https://tile.openstreetmap.org/{z}/{x}/{y}.png")
# Tokens travel in query strings (tracking links, socket URLs): redact them from log lines,
# including uvicorn's "WebSocket /ws/...?token=..." line, which --no-access-log does not cover.
# Structured logs: one JSON object a line (LOG_FORMAT=plain for a terminal), each with the
# request id that X-Request-ID returns; tokens in URLs redacted.
LOGGING["formatters"]["json"] = {
    "()": "pythonjsonlogger.json.JsonFormatter",
    "fmt": "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s",
    "rename_fields": {"asctime": "time", "levelname": "level", "name": "logger"},
}
LOGGING["formatters"]["plain"]["format"] = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
LOGGING["handlers"]["console"]["formatter"] = env("LOG_FORMAT", default="json")
LOGGING["filters"] = {
    "redact_tokens": {"()": "common.logfilters.RedactTokensFilter"},
    "request_id": {"()": "common.logfilters.RequestIdFilter"},
    "celery_task": {"()": "common.logfilters.CeleryTaskFilter"},
    "gis_input_warning": {"()": "common.logfilters.GisInputWarningFilter"},
}
LOGGING["handlers"]["console"]["filters"] = ["redact_tokens", "request_id", "celery_task"]
# Proxies whose X-Request-ID is taken as given (others get a fresh id).
REQUEST_ID_TRUSTED_PROXIES = env.list("REQUEST_ID_TRUSTED_PROXIES", default=["127.0.0.1", "::1"])
LOGGING["loggers"]["uvicorn.error"] = {"filters": ["redact_tokens"]}
# uvicorn's own lines (the server's start and stop, the HTTP protocol's refusals,
# common/httpprotocol.py) through the same handler as everything else: its command line
# configures plain-text handlers of its own on "uvicorn", which this replaces once Django is set up
# (its levels, from `--log-level`, are kept).
LOGGING["loggers"]["uvicorn"] = {"handlers": ["console"], "propagate": False}
LOGGING["loggers"]["uvicorn.access"] = {"handlers": ["console"], "propagate": False}
LOGGING["loggers"]["django.contrib.gis"] = {"filters": ["gis_input_warning"]}

# Escalation and support (docs/escalation.md).
# Ops alert e-mails (comma-separated; empty: no e-mail, the /ws/ops/ event still goes out).
OPS_ALERT_EMAILS = env.list("OPS_ALERT_EMAILS", default=[])
# Where support tickets live (dotted path to a TicketBackend); the default keeps them here.
SUPPORT_TICKET_BACKEND = env("SUPPORT_TICKET_BACKEND", default="escalation.backends.LocalTicketBackend")
# A ticket page open in /support/ re-reads its sections this often while its socket is live:
# /ws/support/ carries the ticket and escalation events, not its delivery's offers, rejects and
# expiries (an audit: an offer and its reject never showed until a reload). 0: never.
SUPPORT_TICKET_REFRESH_SECONDS = env.int("SUPPORT_TICKET_REFRESH_SECONDS", default=10)
# Absolute links in alert e-mails.
SITE_URL = env("SITE_URL", default="http://127.0.0.1:8000")
EMAIL_BACKEND = env("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = env("EMAIL_HOST", default="localhost")
EMAIL_PORT = env.int("EMAIL_PORT", default=25)
EMAIL_HOST_USER = env("EMAIL_HOST_USER", default="")
EMAIL_HOST_PASSWORD = env("EMAIL_HOST_PASSWORD", default="")
EMAIL_USE_TLS = env.bool("EMAIL_USE_TLS", default=False)
EMAIL_TIMEOUT = env.int("EMAIL_TIMEOUT", default=10)
DEFAULT_FROM_EMAIL = env("DEFAULT_FROM_EMAIL", default="dispatch@localhost")
SPECTACULAR_SETTINGS["ENUM_NAME_OVERRIDES"].update({
    "SupportTicketStatusEnum": "escalation.models.TicketStatus",
    "SupportTicketTypeEnum": "escalation.models.TicketType",
    "SupportTicketPriorityEnum": "escalation.models.TicketPriority",
    "EscalationStatusEnum": "escalation.models.EscalationStatus",
    "FailureReasonEnum": "escalation.models.FailureReason",
})


# The ops console (docs/console.md). Times in the admin, the support views and
# the dashboard are shown in OPS_TIME_ZONE (the zone is printed beside them); the API stays UTC.
OPS_TIME_ZONE = env("OPS_TIME_ZONE", default="Asia/Kolkata")
# The currency money is shown in on the console (ISO 4217; amounts are stored without one).
OPS_CURRENCY = env("OPS_CURRENCY", default="INR")
# Map tiles are the one outside resource (STYLE "Nothing from a CDN"): a tile URL template, or
# empty for none. Every map (live ops map, zone editor, delivery page) still shows zones,
# drivers and deliveries on a plain background when no tile loads.
OPS_MAP_TILE_URL = env("OPS_MAP_TILE_URL", default="https://tile.openstreetmap.org/{z}/{x}/{y}.png")
OPS_MAP_TILE_ATTRIBUTION = env(
    "OPS_MAP_TILE_ATTRIBUTION", default='&copy; <a href="https://www.openstreetmap.org/copyright">OpenStreetMap</a> contributors'
)
OPS_MAP_CENTER = (env.float("OPS_MAP_CENTER_LAT", default=12.9716), env.float("OPS_MAP_CENTER_LON", default=77.5946))
# django-leaflet (the admin's geometry widgets): its bundled Leaflet and Leaflet.draw, our tiles.
LEAFLET_CONFIG = {
    "DEFAULT_CENTER": OPS_MAP_CENTER,
    "DEFAULT_ZOOM": 11,
    "MIN_ZOOM": 2,
    "MAX_ZOOM": 19,
    "TILES": [("Map", OPS_MAP_TILE_URL, {"attribution": OPS_MAP_TILE_ATTRIBUTION, "maxZoom": 19})] if OPS_MAP_TILE_URL else [],
    "RESET_VIEW": False,
}

# Telling the people outside (docs/notifications.md): signed webhooks to merchants from a
# transactional outbox, and ops alerts by chat.
# Loopback, private and link-local webhook targets are refused (SSRF), checked at send time
# against the resolved address; true only for development and tests.
WEBHOOK_ALLOW_PRIVATE_TARGETS = env.bool("WEBHOOK_ALLOW_PRIVATE_TARGETS", default=False)
WEBHOOK_TIMEOUT_SECONDS = env.float("WEBHOOK_TIMEOUT_SECONDS", default=10.0)
# Retries with exponential backoff and jitter from BASE up to MAX_DELAY between attempts, for
# the retry window (24 h); an endpoint failing that long is disabled and ops are alerted.
WEBHOOK_RETRY_BASE_SECONDS = env.float("WEBHOOK_RETRY_BASE_SECONDS", default=10.0)
WEBHOOK_RETRY_MAX_DELAY_SECONDS = env.float("WEBHOOK_RETRY_MAX_DELAY_SECONDS", default=2 * 3600.0)
WEBHOOK_RETRY_WINDOW_SECONDS = env.int("WEBHOOK_RETRY_WINDOW_SECONDS", default=24 * 3600)
WEBHOOK_DISABLE_AFTER_SECONDS = env.int("WEBHOOK_DISABLE_AFTER_SECONDS", default=24 * 3600)
# After a rotation the old secret signs too for this long.
WEBHOOK_SECRET_OVERLAP_SECONDS = env.int("WEBHOOK_SECRET_OVERLAP_SECONDS", default=24 * 3600)
# At most one delivery.eta_updated per delivery in this interval.
WEBHOOK_ETA_MIN_INTERVAL_SECONDS = env.float("WEBHOOK_ETA_MIN_INTERVAL_SECONDS", default=60.0)
# One send task stops taking new messages after this long (below the task time limit).
WEBHOOK_SEND_BUDGET_SECONDS = env.float("WEBHOOK_SEND_BUDGET_SECONDS", default=30.0)
# Endpoints a sweep sends to at once (a thread each; one endpoint's messages go in turn): with
# one sweep sending (WEBHOOK_SENDING_SWEEPS), this many receivers hanging hold up the others.
WEBHOOK_SEND_CONCURRENCY = env.int("WEBHOOK_SEND_CONCURRENCY", default=32)
# Webhook endpoints an account may have (each event is a message per endpoint); 0: no limit.
WEBHOOK_MAX_ENDPOINTS_PER_OWNER = env.int("WEBHOOK_MAX_ENDPOINTS_PER_OWNER", default=100)
# Sweeps that send at once across all workers (a Redis lock each); another sweep only fans out.
WEBHOOK_SENDING_SWEEPS = env.int("WEBHOOK_SENDING_SWEEPS", default=1)
WEBHOOK_RETENTION_DAYS = env.int("WEBHOOK_RETENTION_DAYS", default=14)
# A Slack-compatible incoming webhook for ops alerts (escalations, disabled endpoints); empty: none.
OPS_ALERT_CHAT_WEBHOOK_URL = env("OPS_ALERT_CHAT_WEBHOOK_URL", default="")
# Customer messages (docs/notifications.md): SMS through CUSTOMER_SMS_BACKEND (the console
# backend logs; notifications.sms.TwilioSmsBackend sends through Twilio's REST API), e-mail
# through EMAIL_BACKEND (SMTP, or django-anymail's for a provider).
PHONE_DEFAULT_REGION = env("PHONE_DEFAULT_REGION", default="IN")
CUSTOMER_MESSAGES_ENABLED = env.bool("CUSTOMER_MESSAGES_ENABLED", default=True)
CUSTOMER_SMS_BACKEND = env("CUSTOMER_SMS_BACKEND", default="notifications.sms.ConsoleSmsBackend")
CUSTOMER_EMAIL_FROM = env("CUSTOMER_EMAIL_FROM", default=DEFAULT_FROM_EMAIL)
CUSTOMER_ARRIVING_METERS = env.float("CUSTOMER_ARRIVING_METERS", default=500.0)
CUSTOMER_MESSAGE_MAX_ATTEMPTS = env.int("CUSTOMER_MESSAGE_MAX_ATTEMPTS", default=5)
TWILIO_API_BASE = env("TWILIO_API_BASE", default="https://api.twilio.com")
TWILIO_ACCOUNT_SID = env("TWILIO_ACCOUNT_SID", default="")
TWILIO_AUTH_TOKEN = env("TWILIO_AUTH_TOKEN", default="")
TWILIO_FROM_NUMBER = env("TWILIO_FROM_NUMBER", default="")
# This server's public base URL as Twilio calls it (https://dispatch.example.com): the number's
# incoming-message webhook is <it>/hooks/twilio/inbound (STOP, START), and each SMS asks for its
# status at <it>/hooks/twilio/status. Empty: requests are checked against the URL they came to,
# and SMS ask for no status.
TWILIO_WEBHOOK_BASE_URL = env("TWILIO_WEBHOOK_BASE_URL", default="")
# A number's texts back told to ops and the driver (socket, push) per hour; past it they are only
# kept (the console lists them): a number texting in a loop does not flood every ops screen.
CUSTOMER_REPLIES_TOLD_PER_HOUR = env.int("CUSTOMER_REPLIES_TOLD_PER_HOUR", default=20)
# Driver push through FCM's HTTP v1 API: PUSH_BACKEND=notifications.push.FcmPushBackend with a
# Google service account's JSON key file (FCM_PROJECT_ID defaults to the file's project_id).
FCM_SERVICE_ACCOUNT_FILE = env("FCM_SERVICE_ACCOUNT_FILE", default="")
FCM_PROJECT_ID = env("FCM_PROJECT_ID", default="")
FCM_API_BASE = env("FCM_API_BASE", default="https://fcm.googleapis.com")

# The dispatch simulator (`manage.py simulate`, docs/dispatch.md "The simulator"): the Redis
# database a run uses in place of REDIS_URL (never REDIS_URL's own: the run flushes it when done).
def _redis_db_url(url: str, db: int) -> str:
    """`url` with database `db` (path and `?db=` alike): `redis://host:6379` (no path) became
    `redis://10`, a host named 10."""
    parts = urlsplit(url)
    query = urlencode([(k, v) for k, v in parse_qsl(parts.query) if k != "db"])
    if parts.scheme == "unix":
        return f"unix://{parts.netloc}{parts.path}?" + urlencode([*parse_qsl(query), ("db", str(db))])
    return urlunsplit(parts._replace(path=f"/{db}", query=query))


SIMULATION_REDIS_URL = env("SIMULATION_REDIS_URL", default=_redis_db_url(REDIS_URL, 10))
# The longest a simulation run started from the admin may take in its Celery worker (seconds).
SIMULATION_TASK_TIME_LIMIT = env.int("SIMULATION_TASK_TIME_LIMIT", default=3 * 3600)
