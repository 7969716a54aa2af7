"""Where a simulation runs: a database and a Redis database of its own, created for the run
and removed after it, so nothing it writes reaches the platform's data (docs/dispatch.md,
"The simulator").

- PostgreSQL: the database `<DATABASES.default.NAME>_sim` (created once; it holds PostGIS in
  `public` and nothing else between runs) and in it a schema of the run's own, `run_<pid>`,
  migrated, first on the search path: the `default` connection for the run
  (synchronous_commit off: throwaway data). The schema is dropped afterwards (a schema, not a
  database: DROP DATABASE waits for a checkpoint). The platform's own database stays
  reachable as CONTROL_ALIAS (the run's progress is written there).
- Redis: SIMULATION_REDIS_URL (a database other than REDIS_URL) takes the place of REDIS_URL
  for the GEO index, live positions, the cache and the channel layers. A run claims it with a
  key that lives while the run refreshes it (a second run at the same time is refused) and
  flushes it afterwards.
- Identifiers: the models' uuid4 defaults draw from the run's seeded stream, so two runs with
  the same seed create the same rows (PostgreSQL's order of equal keys, ties in the ranking).

The run takes over the process's `default` connection and settings: it is made for a
management command or a Celery worker process of its own (the `simulation` queue), not for a
thread next to requests.
"""
from __future__ import annotations

import copy
import logging
import os
import random
import socket
import threading
import uuid
from contextlib import contextmanager

from django.apps import apps
from django.conf import settings
from django.core.management import call_command
from django.db import IntegrityError, ProgrammingError, connections
from django.db.utils import load_backend
from django.test.utils import override_settings
from redis.connection import parse_url

from common import metrics
from common.exceptions import Conflict, InvalidInput
from common.redis import RedisFailed, get_redis

logger = logging.getLogger(__name__)

CONTROL_ALIAS = "simulation_control"
CLAIM_KEY = "simulation:claim"
CLAIM_TTL_SECONDS = 300  # a crashed run's claim lapses after this
CLAIM_HEARTBEAT_SECONDS = 30


def _redis_target(url: str) -> tuple:
    """(where, port, db) a Redis URL reaches: its host's addresses (`localhost` and 127.0.0.1
    are one server), or a unix socket's path; the database from the path or `?db=`."""
    found = parse_url(url)
    db = int(found.get("db") or 0)
    if "path" in found:
        return frozenset({os.path.realpath(found["path"])}), None, db
    host, port = found.get("host") or "localhost", int(found.get("port") or 6379)
    try:
        addresses = frozenset(info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP))
    except OSError:
        addresses = frozenset({host})
    return addresses, port, db


def _platform_redis_urls() -> list[str]:
    """Every Redis database the platform itself uses: REDIS_URL, Celery's broker and results,
    the caches, the channel layers."""
    urls = [settings.REDIS_URL, settings.CELERY_BROKER_URL, settings.CELERY_RESULT_BACKEND]
    for cache in settings.CACHES.values():
        if "redis" in cache.get("BACKEND", "").lower():
            location = cache.get("LOCATION")
            urls += location if isinstance(location, (list, tuple)) else [location]
    for layer in settings.CHANNEL_LAYERS.values():
        for host in layer.get("CONFIG", {}).get("hosts", []):
            if isinstance(host, dict):
                host = host.get("address")
            if isinstance(host, (list, tuple)) and len(host) == 2:  # channels_redis' ("host", port): database 0
                host = f"redis://{host[0]}:{host[1]}/0"
            urls.append(host)
    return [u for u in urls if isinstance(u, str) and u.split("://", 1)[0] in ("redis", "rediss", "unix")]


def simulation_redis_url() -> str:
    """SIMULATION_REDIS_URL, refused when it is a database the platform uses (the run deletes
    every key there): compared by server and database, not by the URLs' text (with REDIS_URL
    at redis://127.0.0.1:6379/12, redis://localhost:6379/12 passed, and a run wiped it)."""
    url = settings.SIMULATION_REDIS_URL
    try:
        where, port, db = _redis_target(url)
    except ValueError as e:
        raise InvalidInput({"SIMULATION_REDIS_URL": [f"Not a Redis URL: {e}"]}) from None
    for platform in _platform_redis_urls():
        try:
            other_where, other_port, other_db = _redis_target(platform)
        except ValueError:
            continue
        if (port, db) == (other_port, other_db) and where & other_where:
            raise InvalidInput({"SIMULATION_REDIS_URL": [
                "Must be another Redis database than the platform's (REDIS_URL, Celery's, the caches', the "
                "channel layers'): the run deletes every key in it."]})
    return url


# The claim's value is its run's token: only the run that holds it refreshes it or flushes the
# database (a run whose claim had lapsed flushed the database another run had claimed since).
_REFRESH_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('FLUSHDB') return 1 end
return 0
"""


class Claim:
    """The run's hold on its Redis database: refreshed every CLAIM_HEARTBEAT_SECONDS by a
    thread while the run lasts (set-up and long simulated minutes included: a 5,000-driver
    set-up used half the time-to-live before the first tick)."""

    def __init__(self, url: str):
        self.client = get_redis(url)
        self.token = uuid.UUID(bytes=os.urandom(16)).hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self.lost = False

    def take(self) -> None:
        try:
            taken = self.client.set(CLAIM_KEY, self.token, nx=True, ex=CLAIM_TTL_SECONDS)
        except RedisFailed as e:  # (a traceback before)
            raise InvalidInput({"SIMULATION_REDIS_URL": [f"Cannot be reached: {e}"]}) from None
        if not taken:
            raise Conflict("Another simulation is running on SIMULATION_REDIS_URL; try again when it has finished.")
        # Keys left by a run that crashed (its claim lapsed): not ours to keep.
        for key in self.client.scan_iter(count=1000):
            if key != CLAIM_KEY:
                self.client.delete(key)
        self._heartbeat = threading.Thread(target=self._beat, name="simulation-claim", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(CLAIM_HEARTBEAT_SECONDS) and not self.lost:
            try:
                self.refresh()
            except Exception:  # (Redis away a moment: the next beat tries again, well within the TTL)
                logger.warning("simulation: the claim could not be refreshed", exc_info=True)

    def refresh(self) -> None:
        """Keep the claim; Conflict if it is no longer this run's (it lapsed and another run took it)."""
        if not self.client.eval(_REFRESH_SCRIPT, 1, CLAIM_KEY, self.token, CLAIM_TTL_SECONDS):
            self.lost = True
            raise Conflict("This simulation's hold on SIMULATION_REDIS_URL lapsed and another run took it.")

    def release(self) -> None:
        """Everything of the run, the claim with it; nothing when the claim is another run's."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=5)
        if not self.client.eval(_RELEASE_SCRIPT, 1, CLAIM_KEY, self.token):
            logger.warning("simulation: the claim was no longer this run's; its Redis database is left as it is")


def _sim_db_name(base: str) -> str:
    return f"{base}_sim"[:63]


def _admin_execute(sql: str) -> None:
    """A statement outside any database's transaction (CREATE DATABASE)."""
    with connections["default"]._nodb_cursor() as cur:
        cur.execute(sql)


def _database_exists(name: str) -> bool:
    with connections["default"]._nodb_cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
        return cur.fetchone() is not None


def _ensure_database(name: str) -> None:
    """The simulation database: created once, holding nothing but PostGIS in `public` (each
    run's tables live in a schema of their own, dropped after the run). Not dropped itself:
    DROP DATABASE waits for a checkpoint, tens of seconds on a busy server."""
    if not _database_exists(name):
        try:
            _admin_execute(f'CREATE DATABASE "{name}"')
        except (ProgrammingError, IntegrityError):
            # another process created it meanwhile: "already exists" if it had committed before
            # ours began, a unique violation on pg_database if both inserted the name (ours
            # waited for its commit, then failed: two runs started at once on a new machine)
            pass
    conf = {**copy.deepcopy(connections["default"].settings_dict), "NAME": name}
    conf.get("OPTIONS", {}).pop("pool", None)
    conn = load_backend(conf["ENGINE"]).DatabaseWrapper(conf, "simulation_setup")
    try:
        with conn.cursor() as cur:
            # One process at a time (released when the connection closes): two runs started at
            # once on a new database both tried CREATE EXTENSION, and IF NOT EXISTS does not
            # settle that race (the second failed on pg_extension_name_index).
            cur.execute("SELECT pg_advisory_lock(hashtext('simulation database setup'))")
            cur.execute("CREATE EXTENSION IF NOT EXISTS postgis SCHEMA public")
            # btree_gist too (offers' exclusion constraint): created by a run's migration it
            # landed in that run's schema, and the run's DROP SCHEMA … CASCADE took it, and with
            # it the constraint of every other run going on at once (two processes side by side).
            cur.execute("CREATE EXTENSION IF NOT EXISTS btree_gist SCHEMA public")
            cur.execute("SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                        "WHERE e.extname = 'btree_gist'")
            if cur.fetchone()[0] != "public":  # (left in a run's schema by an earlier version)
                cur.execute("ALTER EXTENSION btree_gist SET SCHEMA public")
            # The run's schema comes first on the search path, `public` after it: a table of
            # the platform's in `public` would answer for one the run lacks. Refuse such a database.
            cur.execute(
                "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'spatial_ref_sys'"
            )
            if cur.fetchone()[0]:
                raise Conflict(f"Database {name} has tables in its public schema: it is not a simulation database.")
    finally:
        conn.close()


def _switch_default(name: str, options: str | None) -> None:
    """`default` now connects to database `name` with these libpq `options` (None: none)."""
    conn = connections["default"]
    conn.close()
    if getattr(conn, "pool", None) is not None:
        conn.close_pool()  # the pool is bound to the database it was made for
    for settings_dict in (settings.DATABASES["default"], conn.settings_dict):
        settings_dict["NAME"] = name
        opts = settings_dict.setdefault("OPTIONS", {})
        if options is None:
            opts.pop("options", None)
        else:
            opts["options"] = options


@contextmanager
def seeded_uuids(seed: int):
    """The uuid4 defaults of every model field draw from a stream seeded by `seed`."""
    rng = random.Random(f"{seed}:uuids")

    def uuid4():
        return uuid.UUID(int=rng.getrandbits(128), version=4)

    patched = []
    for model in apps.get_models():
        for f in model._meta.concrete_fields:
            if f.default is uuid.uuid4:
                patched.append(f)
                f.default = uuid4
                f.__dict__.pop("_get_default", None)  # Field caches its default callable
    try:
        yield
    finally:
        for f in patched:
            f.default = uuid.uuid4
            f.__dict__.pop("_get_default", None)


@contextmanager
def control_connection():
    """CONTROL_ALIAS: the platform's database while `default` points at the run's. A
    connection of this thread only, made from `default`'s settings (not a configured alias)."""
    conf = copy.deepcopy(connections["default"].settings_dict)
    conf.get("OPTIONS", {}).pop("pool", None)
    conf["CONN_MAX_AGE"] = None  # the whole run on one connection
    connection = load_backend(conf["ENGINE"]).DatabaseWrapper(conf, CONTROL_ALIAS)
    connections[CONTROL_ALIAS] = connection
    try:
        yield CONTROL_ALIAS
    finally:
        connection.close()
        del connections[CONTROL_ALIAS]


def _overrides(redis_url: str, extra: dict) -> dict:
    layers = copy.deepcopy(settings.CHANNEL_LAYERS)
    for layer in layers.values():
        hosts = layer.get("CONFIG", {}).get("hosts", [])
        layer["CONFIG"]["hosts"] = [
            {**h, "address": redis_url} if isinstance(h, dict) else redis_url for h in hosts
        ]
    caches = copy.deepcopy(settings.CACHES)
    for cache in caches.values():
        if "redis" in cache.get("BACKEND", "").lower():
            cache["LOCATION"] = redis_url
    return {"REDIS_URL": redis_url, "CHANNEL_LAYERS": layers, "CACHES": caches, **extra}


@contextmanager
def sandbox(*, seed: int, settings_overrides: dict | None = None):
    """Run the body against a new migrated database and the simulation Redis database; both
    are removed afterwards, whatever happens. Yields the Claim (refresh it now and then)."""
    redis_url = simulation_redis_url()
    claim = Claim(redis_url)
    claim.take()
    base = settings.DATABASES["default"]["NAME"]
    base_options = settings.DATABASES["default"].get("OPTIONS", {}).get("options")
    name, schema = _sim_db_name(base), f"run_{os.getpid()}"
    try:
        connections["default"].close()
        _ensure_database(name)
        # The run's tables in its own schema (PostGIS from `public`); throwaway data, so commits
        # need not wait for the WAL flush.
        _switch_default(name, f"-c search_path={schema},public -c synchronous_commit=off")
        try:
            with connections["default"].cursor() as cur:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # left by a crashed run of this pid
                cur.execute(f'CREATE SCHEMA "{schema}"')
            with override_settings(**_overrides(redis_url, settings_overrides or {})), seeded_uuids(seed), \
                    metrics.simulating():
                call_command("migrate", verbosity=0, interactive=False)
                yield claim
        finally:
            try:
                connections["default"].close()
                with connections["default"].cursor() as cur:
                    cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                _switch_default(base, base_options)
    finally:
        claim.release()
