"""The cluster's PgBouncer (`deploy/cluster/pgbouncer.ini`, `make cluster`): its web pool gives
every server connection the web's statement and lock timeouts, which a web process behind
PgBouncer cannot send itself (startup options are refused there; docs/operations.md).

Runs the real pgbouncer (installed by scripts/setup.sh) with the repository's ini on a free
port, in front of the test database (as the `dispatch` role that set-up creates)."""
from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from django.db import connection

from tests.processes import free_port, stop

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "cluster"


@pytest.fixture
def pgbouncer(db):
    """The repository's pgbouncer.ini in front of the test database (its `[databases]` lines
    pointed there, never at the dev database), on a free port; yields the port."""
    test_db = connection.settings_dict
    assert test_db["NAME"].startswith("test_"), test_db["NAME"]
    port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-test-"))
    ini = (CLUSTER / "pgbouncer.ini").read_text()
    ini, replaced = re.subn(r"(?m)^listen_port = \d+$", f"listen_port = {port}", ini)
    assert replaced == 1
    target = f"host={test_db['HOST'] or '127.0.0.1'} port={test_db['PORT'] or 5432} dbname={test_db['NAME']}"
    ini, replaced = re.subn(r"(?m)^(dispatch|dispatch_web) = host=127\.0\.0\.1 port=5432 dbname=dispatch\b",
                            rf"\1 = {target}", ini)
    assert replaced == 2
    (workdir / "pgbouncer.ini").write_text(ini)
    shutil.copy(CLUSTER / "userlist.txt", workdir / "userlist.txt")
    # PgBouncer refuses to run as root: as the postgres user then, who must read the files.
    os.chmod(workdir, 0o755)
    for path in workdir.iterdir():
        os.chmod(path, 0o644)
    command = [shutil.which("pgbouncer", path="/usr/sbin:/usr/bin") or "pgbouncer",
               *(["-u", "postgres"] if os.geteuid() == 0 else []), "pgbouncer.ini"]
    log = open(workdir / "pgbouncer.log", "w+b")
    process = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None, (workdir / "pgbouncer.log").read_text()
                assert time.monotonic() < deadline, "pgbouncer did not listen within 10 s"
                time.sleep(0.05)
        yield port
    finally:
        stop(process, log)
        shutil.rmtree(workdir, ignore_errors=True)


def _connect(port: int, dbname: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(host="127.0.0.1", port=port, user="dispatch", password="dispatch", dbname=dbname,
                           prepare_threshold=None, connect_timeout=10, **kwargs)


def _timeouts(port: int, dbname: str, clients: int = 3) -> list[dict[str, str]]:
    """The timeouts each of `clients` transactions open at once sees (so each holds a server
    connection of its own), with the server connection's backend pid."""
    conns = [_connect(port, dbname) for _ in range(clients)]
    try:
        seen = []
        for conn in conns:  # each stays in its transaction until all have read
            pid = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            rows = conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN ('statement_timeout', 'lock_timeout')"
            ).fetchall()
            seen.append({"pid": pid, **dict(rows)})
        return seen
    finally:
        for conn in conns:
            conn.close()


def test_the_web_pool_has_the_web_s_timeouts_and_the_other_processes_pool_has_none(pgbouncer):
    web_defaults = _web_defaults()
    web = _timeouts(pgbouncer, "dispatch_web")
    assert len({seen.pop("pid") for seen in web}) == 3  # three server connections, each set up so
    assert web == [{"statement_timeout": web_defaults["DB_STATEMENT_TIMEOUT_MS"],
                     "lock_timeout": web_defaults["DB_LOCK_TIMEOUT_MS"]}] * 3
    others = _timeouts(pgbouncer, "dispatch")
    assert [{k: v for k, v in seen.items() if k != "pid"} for seen in others] == [
        {"statement_timeout": "0", "lock_timeout": "0"}] * 3


def test_both_pools_together_stay_within_the_server_connections_of_one(pgbouncer):
    """Pool sizes apply to each pool: two pools would let PostgreSQL see twice as many
    connections without the per-user cap."""
    with _connect(pgbouncer, "pgbouncer", autocommit=True) as admin:
        config = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert int(config["max_user_connections"]) == int(config["default_pool_size"]) + int(config["reserve_pool_size"]) == 25


def _web_defaults() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", "import json, config.asgi as a; print(json.dumps(a._WEB_DEFAULTS))"],
                         cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base"},
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_web_process_behind_pgbouncer_runs_its_statements_under_the_timeouts(pgbouncer):
    """config.asgi with the cluster's web settings (its URL names the web pool): its
    transactions run under the web's timeouts."""
    code = (
        "import json, config.asgi\n"
        "from django.db import connection, transaction\n"
        "seen = set()\n"
        "for _ in range(5):\n"
        "    with transaction.atomic(), connection.cursor() as cur:\n"
        "        cur.execute(\"SELECT string_agg(setting, ' ' ORDER BY name DESC) FROM pg_settings\"\n"
        "                    \" WHERE name IN ('statement_timeout', 'lock_timeout')\")\n"
        "        seen.add(cur.fetchone())\n"
        "print(json.dumps(sorted(seen)))\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base", "DB_BEHIND_PGBOUNCER": "true",
           "DATABASE_URL": f"postgis://dispatch:dispatch@127.0.0.1:{pgbouncer}/dispatch_web"}  # as cluster.sh
    for name in ("DB_STATEMENT_TIMEOUT_MS", "DB_LOCK_TIMEOUT_MS"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    web_defaults = _web_defaults()
    expected = f"{web_defaults['DB_STATEMENT_TIMEOUT_MS']} {web_defaults['DB_LOCK_TIMEOUT_MS']}"
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[expected]]


def test_the_cluster_connects_the_web_instances_and_only_them_through_the_web_pool():
    conf = configparser.RawConfigParser()
    conf.read(CLUSTER / "supervisord.conf")
    programs = {s.removeprefix("program:"): conf[s] for s in conf.sections() if s.startswith("program:")}
    web = {name for name, program in programs.items() if "uvicorn config.asgi" in program["command"]}
    assert web == {"web1", "web2"}
    for name, program in programs.items():
        environment = program.get("environment", "")
        if name in web:
            assert environment == 'DATABASE_URL="%(ENV_CLUSTER_WEB_DATABASE_URL)s"'
        else:
            assert "DATABASE_URL" not in environment, name
    script = (ROOT / "scripts" / "cluster.sh").read_text()
    assert 'WEB_DATABASE_URL="postgis://dispatch:dispatch@127.0.0.1:$PGBOUNCER_PORT/dispatch_web"' in script
    assert 'export CLUSTER_WEB_DATABASE_URL="$WEB_DATABASE_URL"' in script
