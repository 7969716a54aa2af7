"""The cluster's PgBouncer (`deploy/cluster/pgbouncer.ini`, `make cluster`): its web pool gives
every server connection the web's statement and lock timeouts, which a web process behind
PgBouncer cannot send itself (startup options are refused there; docs/operations.md).

Runs the real pgbouncer (installed by scripts/setup.sh) with the repository's ini on a free
port, in front of the `dispatch` role and database that set-up creates."""
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

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "deploy" / "cluster"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pgbouncer():
    """The repository's pgbouncer.ini, only its port changed; yields the port."""
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="pgbouncer-test-"))
    ini = (CLUSTER / "pgbouncer.ini").read_text()
    ini, replaced = re.subn(r"(?m)^listen_port = \d+$", f"listen_port = {port}", ini)
    assert replaced == 1
    (workdir / "pgbouncer.ini").write_text(ini)
    shutil.copy(CLUSTER / "userlist.txt", workdir / "userlist.txt")
    # PgBouncer refuses to run as root: as the postgres user then, who must read the files.
    os.chmod(workdir, 0o755)
    for path in workdir.iterdir():
        os.chmod(path, 0o644)
    command = ["/usr/sbin/pgbouncer", *(["-u", "postgres"] if os.geteuid() == 0 else []), "pgbouncer.ini"]
    process = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert process.poll() is None, process.stdout.read().decode()
                assert time.monotonic() < deadline, "pgbouncer did not listen within 10 s"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


def _timeouts(port: int, dbname: str) -> dict[str, str]:
    with psycopg.connect(host="127.0.0.1", port=port, user="dispatch", password="dispatch", dbname=dbname,
                         prepare_threshold=None, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('statement_timeout', 'lock_timeout')"
        ).fetchall()
    return dict(rows)


def test_the_web_pool_has_the_web_s_timeouts_and_the_other_processes_pool_has_none(pgbouncer):
    web_defaults = _web_defaults()
    expected = {"statement_timeout": web_defaults["DB_STATEMENT_TIMEOUT_MS"],
                "lock_timeout": web_defaults["DB_LOCK_TIMEOUT_MS"]}
    assert _timeouts(pgbouncer, "dispatch_web") == expected
    assert _timeouts(pgbouncer, "dispatch") == {"statement_timeout": "0", "lock_timeout": "0"}


def _web_defaults() -> dict[str, str]:
    out = subprocess.run([sys.executable, "-c", "import json, config.asgi as a; print(json.dumps(a._WEB_DEFAULTS))"],
                         cwd=ROOT, env={**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base"},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_web_process_behind_pgbouncer_runs_its_statements_under_the_timeouts(pgbouncer):
    """config.asgi with the cluster's web settings: every transaction, whichever server
    connection it gets, runs under the web's timeouts."""
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
           "DATABASE_URL": f"postgis://dispatch:dispatch@127.0.0.1:{pgbouncer}/dispatch_web"}
    for name in ("DB_STATEMENT_TIMEOUT_MS", "DB_LOCK_TIMEOUT_MS"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
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
