"""Prometheus metrics. Under several processes set PROMETHEUS_MULTIPROC_DIR (see docs)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from contextvars import ContextVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

HTTP_REQUESTS = Counter(
    "http_requests_total", "HTTP requests by method, route and status.", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency by method and route.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Token-authenticated API requests that waited for a turn (config/asgi.py), by lane: `api`
# (API_REQUEST_CONCURRENCY) or `upload` (proof photos, PROOF_UPLOAD_CONCURRENCY, seconds each):
# how long, and those whose client left first (never run).
API_REQUEST_WAIT = Histogram(
    "api_request_queue_wait_seconds",
    "Time a token-authenticated API request waited for its turn to run (requests that waited), by lane",
    ["lane"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
API_REQUESTS_ABANDONED = Counter(
    "api_requests_abandoned_total", "Token-authenticated API requests whose client left while they waited for a turn, by lane",
    ["lane"],
)
for _lane in ("api", "upload"):  # (exported from the start, at 0, as they were before the label)
    API_REQUEST_WAIT.labels(_lane)
    API_REQUESTS_ABANDONED.labels(_lane)

# Live socket events not sent (common/broadcast.py), one per event and group: Redis known to
# be unavailable (the breaker open), too many sends already running late (`MAX_LATE_SENDS`), or
# the channel layer failing the send. Live events are best-effort; this says how much was lost.
LIVE_EVENTS_DROPPED = Counter(
    "live_events_dropped_total", "Live socket events not sent to a group, by reason", ["reason"]
)
# Each reason is exported from the start, at 0: a labelled counter nothing has incremented
# yet is not exported at all, and `rate(live_events_dropped_total[5m])` saw no data, not 0.
# (socket_behind: dropped in a web process for a socket that fell behind, then closed 1013)
LIVE_EVENTS_DROPPED_REASONS = ("redis_unavailable", "backlog", "send_failed", "socket_behind")
for _reason in LIVE_EVENTS_DROPPED_REASONS:
    LIVE_EVENTS_DROPPED.labels(_reason)
# A web process's channel-layer pub/sub connection to Redis dropped and came back
# (common.channels._Shard): what was published meanwhile never reached its sockets, which were
# then closed (1012) to reconnect and read their state afresh.
PUBSUB_RECONNECTS = Counter(
    "channel_layer_pubsub_reconnects_total",
    "Pub/sub connections to Redis that came back after a drop (their sockets closed 1012 to reload)",
)

# Requests and socket handshakes refused for a Host that ALLOWED_HOSTS does not name
# (common.middleware.AllowedHostGuard; its log lines are capped, this counts them all): a
# steady rate is a proxy or DNS name missing from ALLOWED_HOSTS, not only scanners.
HTTP_INVALID_HOST = Counter(
    "http_invalid_host_total", "HTTP requests and socket handshakes refused for a Host not in ALLOWED_HOSTS"
)

# The seed's metrics (Monitoring and Metrics). Gauges are computed from PostgreSQL at scrape
# time (dispatch/metrics.py), so they are right whatever number of processes serve.
OFFER_CREATION_LATENCY = Histogram(
    "offer_creation_latency_seconds", "Time taken to create an offer", buckets=(0.1, 0.5, 1, 2, 5)
)
ASSIGNMENT_LATENCY = Histogram(
    "assignment_latency_seconds",
    "Time from a delivery becoming ready to its assignment",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)

# A simulation runs the platform's workflows in a process of its own (simulation.sandbox), on
# a simulated city: what they observe is not the platform's. A run started from the admin put
# its assignments and offers into the live histograms (its worker writes PROMETHEUS_MULTIPROC_DIR
# like every process): at peak, 5,000 simulated assignments of ~600 s each.
_simulating: ContextVar[bool] = ContextVar("metrics_simulating", default=False)


@contextmanager
def simulating():
    """While it lasts, `observe` records nothing in this context (a simulation runs here)."""
    token = _simulating.set(True)
    try:
        yield
    finally:
        _simulating.reset(token)


def observe(histogram: Histogram, value: float) -> None:
    """A domain observation (the seed's histograms), unless a simulation is running here."""
    if not _simulating.get():
        histogram.observe(value)


# The labelled children, looked up once per (method, route, status): `labels()` takes a lock
# and builds the key on every call, a few per cent of a fast-lane POST. Routes are the URL
# patterns, so this stays as small as the metric's own set of children.
_http_children: dict[tuple[str, str, int], tuple] = {}


def observe_http(method: str, route: str, status: int, seconds: float) -> None:
    children = _http_children.get((method, route, status))
    if children is None:
        children = _http_children[(method, route, status)] = (
            HTTP_REQUESTS.labels(method, route, str(status)), HTTP_LATENCY.labels(method, route)
        )
    children[0].inc()
    children[1].observe(seconds)


_scrape_collectors = []


def register_scrape_collector(collector) -> None:
    """Collectors computed from the database at scrape time (gauges correct across processes)."""
    _scrape_collectors.append(collector)


def render() -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY as registry  # noqa: N811
    output = generate_latest(registry)
    if _scrape_collectors:
        extra = CollectorRegistry()
        for c in _scrape_collectors:
            extra.register(c)
        output += generate_latest(extra)
    return output, CONTENT_TYPE_LATEST
