"""A database that is down or was restarted (SPEC "Wire conventions": 503 when a backing service
is down, never a 500), and the connection pool after a PostgreSQL restart.

Tests run without a pool (config/settings/test.py), so the pool tests set one up on the test
database, as production's settings do, through the real ASGI application (which hands each
request's connection back to the pool, as a server does), and kill its connections the way a
restart does: `pg_terminate_backend`, which the server reports as AdminShutdown."""
from __future__ import annotations

import runpy
import time
import uuid

import httpx
import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings as django_settings
from django.db import OperationalError, ProgrammingError, connection
from django.db.utils import ConnectionHandler
from psycopg_pool import ConnectionPool

from common import views as common_views
from common.idempotency import IdempotencyMiddleware
from config.asgi import application
from escalation.api import views as escalation_views
from tests.factories import OpsUserFactory
from tests.wire import assert_error_body
from tracking import selectors as tracking_selectors
from tests.api import token_for

KEY = {"HTTP_IDEMPOTENCY_KEY": "check-1"}


def admin_shutdown() -> OperationalError:
    """What Django raises when the server ended the connection (psycopg's AdminShutdown,
    wrapped), built as Django's error wrapper builds it."""
    cause = psycopg.errors.AdminShutdown("terminating connection due to administrator command")
    exc = OperationalError(*cause.args)
    exc.__cause__ = cause
    return exc


def _raise(exc):
    def fail(*args, **kwargs):
        raise exc

    return fail


# -------------------------------------------------------------------------- the 503 mapping


@pytest.mark.parametrize(
    "exc",
    [admin_shutdown(), psycopg.errors.AdminShutdown("terminating connection"), psycopg.OperationalError("server closed")],
    ids=["Django's OperationalError", "psycopg's AdminShutdown", "psycopg's OperationalError"],
)
def test_a_database_error_in_a_drf_view_is_a_503(ops, monkeypatch, exc):
    monkeypatch.setattr(escalation_views.escalations, "escalation_check", _raise(exc))

    r = ops.post("/v2/admin/escalation/check")

    body = assert_error_body(r, 503, path="/v2/admin/escalation/check")
    assert body["message"] == "The database is unavailable."


def test_a_database_error_in_the_idempotency_middleware_is_a_503(ops, monkeypatch):
    monkeypatch.setattr(IdempotencyMiddleware, "_claim", _raise(admin_shutdown()))

    r = ops.post("/v2/admin/escalation/check", **KEY)

    body = assert_error_body(r, 503, path="/v2/admin/escalation/check")
    assert body["message"] == "The database is unavailable."


def test_a_database_error_in_a_plain_django_api_view_is_a_503_in_the_error_body(anon, db, monkeypatch):
    monkeypatch.setattr(common_views.metrics, "render", _raise(admin_shutdown()))

    r = anon.get("/metrics")

    assert_error_body(r, 503, path="/metrics")


def test_a_database_error_on_a_page_is_a_plain_503(client, db, monkeypatch):
    monkeypatch.setattr(tracking_selectors, "delivery_for_tracking_link", _raise(admin_shutdown()))

    r = client.get(f"/track/{uuid.uuid4()}?token=abc")

    assert r.status_code == 503
    assert b"The database is unavailable." in r.content


def test_other_database_errors_stay_500s(ops, monkeypatch):
    monkeypatch.setattr(escalation_views.escalations, "escalation_check", _raise(ProgrammingError("a bug")))

    r = ops.post("/v2/admin/escalation/check")

    assert_error_body(r, 500, path="/v2/admin/escalation/check")


# ------------------------------------------------------------------------------- the pool


def test_with_a_pool_each_connection_is_checked_as_it_is_handed_out(monkeypatch):
    # the production settings with a pool (the default: DB_POOL_MAX_SIZE=8)
    monkeypatch.setenv("DB_POOL_MAX_SIZE", "4")
    production = runpy.run_path(str(django_settings.BASE_DIR / "config" / "settings" / "base.py"))
    database = production["DATABASES"]["default"]
    assert database["OPTIONS"]["pool"]["max_size"] == 4 and database["CONN_MAX_AGE"] == 0
    assert "check" not in database["OPTIONS"]["pool"]  # Django passes it: twice would be a TypeError

    # the pool Django builds from them (not opened: no connection is made)
    probe = ConnectionHandler({"default": dict(database), "pool-probe": dict(database)})["pool-probe"]
    try:
        assert probe.pool._check is ConnectionPool.check_connection
    finally:
        probe.close_pool()


@pytest.fixture
def pooled():
    """`pooled(check=True)`: the default database through a psycopg pool from here on."""
    saved = {key: connection.settings_dict[key] for key in ("OPTIONS", "CONN_HEALTH_CHECKS", "CONN_MAX_AGE")}

    def configure(*, check: bool):
        connection.close()
        connection.settings_dict["OPTIONS"] = {**saved["OPTIONS"], "pool": {"min_size": 2, "max_size": 4, "timeout": 5}}
        connection.settings_dict["CONN_HEALTH_CHECKS"] = check
        connection.settings_dict["CONN_MAX_AGE"] = 0
        connection.pool.open(wait=True)

    yield configure
    connection.close()
    connection.close_pool()
    connection.settings_dict.update(saved)


def restart_database():
    """End every other connection to the test database, as a PostgreSQL restart does, and wait
    until they are gone. Ended again on every look: a pool that had just been handed back a
    dead connection opens its replacement in the background, and one that opened after the
    first round stayed (once in five whole-suite runs: "the connections did not end")."""
    params = {k: v for k, v in connection.get_connection_params().items() if k in ("dbname", "user", "password", "host", "port")}
    with psycopg.connect(**params, autocommit=True) as admin:
        for _ in range(100):
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            time.sleep(0.05)
            others = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()[0]
            if others == 0:
                return
    raise AssertionError("the connections did not end")


def asgi(method, path, token, **headers):
    async def go():
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.request(method, path, headers={"Authorization": f"Token {token}", **headers})

    return async_to_sync(go)()


@pytest.mark.django_db(transaction=True)
def test_after_a_restart_dead_pooled_connections_are_replaced_not_handed_out(pooled):
    token = token_for(OpsUserFactory())
    pooled(check=True)
    assert asgi("GET", "/v2/drivers", token).status_code == 200
    idle_before = connection.pool.get_stats()["pool_available"]
    assert idle_before >= 1  # the request's connection went back to the pool

    restart_database()

    # the first requests after the restart: the dead connections are found on checkout
    check = asgi("POST", "/v2/admin/escalation/check", token, **{"Idempotency-Key": "after-restart"})
    listing = asgi("GET", "/v2/drivers", token)
    assert (check.status_code, listing.status_code) == (200, 200), (check.content, listing.content)
    assert connection.pool.get_stats().get("connections_errors", 0) == 0


@pytest.mark.django_db(transaction=True)
def test_without_the_check_a_dead_pooled_connection_is_a_503_never_a_500(pooled):
    """What the check prevents (the issue's symptom), and that it is a 503 when it happens:
    from the idempotency middleware as from the view."""
    token = token_for(OpsUserFactory())
    pooled(check=False)
    assert asgi("GET", "/v2/drivers", token).status_code == 200

    # The first request after a restart gets a dead connection for certain (every pooled one
    # died); a second request may already get the replacement the pool made for the first one,
    # so each path gets its own restart.
    restart_database()
    check = asgi("POST", "/v2/admin/escalation/check", token, **{"Idempotency-Key": "after-restart"})
    restart_database()
    listing = asgi("GET", "/v2/drivers", token)
    for r in (check, listing):
        assert r.status_code == 503, r.content
        assert r.json()["message"] == "The database is unavailable."


# -------------------------------------------------------------------------- statement and lock timeouts


@pytest.mark.django_db(transaction=True)  # the lock is held by another connection, in a thread
def test_a_request_past_its_lock_wait_is_a_503_that_changes_nothing():
    """A transaction left holding a driver's row lock held every request for that driver without
    end (and took one of the process's four API turns each); with the web's lock_timeout it is
    cancelled, and the answer says so."""
    import threading

    from django.db import connections, transaction

    from availability.models import Driver
    from tests.api import client_for
    from tests.factories import online_driver

    driver = online_driver()
    locked, release = threading.Event(), threading.Event()

    def hold_the_row():
        try:
            with transaction.atomic():
                Driver.objects.select_for_update().get(pk=driver.pk)
                locked.set()
                release.wait(timeout=30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_row)
    holder.start()
    try:
        assert locked.wait(timeout=10)
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = 200")  # what DB_LOCK_TIMEOUT_MS sets per connection
        r = client_for(driver.user).post(
            f"/v2/drivers/{driver.pk}/availability/take-break", {"durationMinutes": 30}, format="json"
        )
    finally:
        release.set()
        holder.join(timeout=30)
        with connection.cursor() as cursor:
            cursor.execute("RESET lock_timeout")

    body = assert_error_body(r, 503, path=f"/v2/drivers/{driver.pk}/availability/take-break")
    assert body["message"] == "The database did not answer in time."
    driver.refresh_from_db()
    assert driver.availability == "available"


@pytest.mark.django_db(transaction=True)  # the cancelled statement aborts the transaction it is in
def test_a_statement_past_its_time_is_a_503_that_says_so(ops, monkeypatch):
    def slow(*args, **kwargs):
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_sleep(5)")

    monkeypatch.setattr(escalation_views.escalations, "escalation_check", slow)
    with connection.cursor() as cursor:
        cursor.execute("SET statement_timeout = 100")  # what DB_STATEMENT_TIMEOUT_MS sets per connection
    try:
        r = ops.post("/v2/admin/escalation/check")
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET statement_timeout")

    body = assert_error_body(r, 503, path="/v2/admin/escalation/check")
    assert body["message"] == "The database did not answer in time."


def test_a_statement_cancelled_by_hand_is_the_plain_503():
    from common.errors import database_unavailable_message

    cancelled = psycopg.errors.QueryCanceled("canceling statement due to user request")
    wrapped = OperationalError(*cancelled.args)
    wrapped.__cause__ = cancelled
    assert database_unavailable_message(wrapped) == "The database is unavailable."


def test_a_web_process_cancels_long_statements_and_lock_waits_and_other_processes_do_not(db):
    """config.asgi sets the web's defaults before the settings read them (DB_STATEMENT_TIMEOUT_MS,
    DB_LOCK_TIMEOUT_MS); a worker, the consumer or a migration keeps PostgreSQL's (none)."""
    import os
    import subprocess
    import sys

    from tests.processes import subprocess_database_url

    env = {k: v for k, v in os.environ.items() if not k.startswith("DB_")}
    env.update(DATABASE_URL=subprocess_database_url(), DJANGO_SETTINGS_MODULE="config.settings.base")

    def run(setup: str, shown=("statement_timeout", "lock_timeout"), **extra) -> str:
        show = (
            "from django.db import connection\n"
            "with connection.cursor() as c:\n"
            f"    print(*[c.execute('SHOW ' + name).fetchone()[0] for name in {list(shown)!r}])\n"
        )
        done = subprocess.run([sys.executable, "-c", setup + show], env={**env, **extra}, cwd=django_settings.BASE_DIR,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split("\n")[-2]

    assert run("import os, config.asgi\nassert 'DB_LOCK_TIMEOUT_MS' not in os.environ  # not for its children\n") == "30s 10s"
    assert run("import django; django.setup()\n") == "0 0"
    assert run("import config.asgi\n", DB_STATEMENT_TIMEOUT_MS="0", DB_LOCK_TIMEOUT_MS="2500") == "0 2500ms"
    assert run("import config.asgi\n", DB_LOCK_TIMEOUT_MS="2500", DB_BEHIND_PGBOUNCER="true") == "0 0"
    # options already in DATABASE_URL are kept
    with_options = subprocess_database_url() + "?options=-c%20search_path%3Dpublic%20-c%20work_mem%3D8MB"
    assert run("import config.asgi\n", ("statement_timeout", "lock_timeout", "work_mem"),
               DATABASE_URL=with_options) == "30s 10s 8MB"
    # and so is the environment's PGOPTIONS, which libpq alone would drop beside the timeouts
    assert run("import config.asgi\n", ("statement_timeout", "lock_timeout", "work_mem"),
               PGOPTIONS="-c work_mem=9MB") == "30s 10s 9MB"
    assert run("import django; django.setup()\n", ("statement_timeout", "work_mem"), PGOPTIONS="-c work_mem=9MB") == "0 9MB"
