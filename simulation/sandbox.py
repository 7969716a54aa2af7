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
import os
import random
import uuid
from contextlib import contextmanager
from urllib.parse import urlsplit

from django.apps import apps
from django.conf import settings
from django.core.management import call_command
from django.db import IntegrityError, ProgrammingError, connections
from django.db.utils import load_backend
from django.test.utils import override_settings

from common.exceptions import Conflict, InvalidInput
from common.redis import get_redis

CONTROL_ALIAS = "simulation_control"
CLAIM_KEY = "simulation:claim"
CLAIM_TTL_SECONDS = 300  # a crashed run's claim lapses after this


def _redis_db(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.netloc.rsplit("@", 1)[-1], (parts.path.strip("/") or "0")


def simulation_redis_url() -> str:
    url = settings.SIMULATION_REDIS_URL
    if _redis_db(url) == _redis_db(settings.REDIS_URL):
        raise InvalidInput({"SIMULATION_REDIS_URL": ["Must be another Redis database than REDIS_URL: the run flushes it."]})
    return url


class Claim:
    """The run's hold on its Redis database."""

    def __init__(self, url: str):
        self.client = get_redis(url)
        self.token = uuid.UUID(bytes=os.urandom(16)).hex

    def take(self) -> None:
        if not self.client.set(CLAIM_KEY, self.token, nx=True, ex=CLAIM_TTL_SECONDS):
            raise Conflict("Another simulation is running on SIMULATION_REDIS_URL; try again when it has finished.")
        # Keys left by a run that crashed (its claim lapsed): not ours to keep.
        for key in self.client.scan_iter(count=1000):
            if key != CLAIM_KEY:
                self.client.delete(key)

    def refresh(self) -> None:
        self.client.expire(CLAIM_KEY, CLAIM_TTL_SECONDS)

    def release(self) -> None:
        self.client.flushdb()  # everything of the run, the claim with it


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
            with override_settings(**_overrides(redis_url, settings_overrides or {})), seeded_uuids(seed):
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
