"""For tests that start real server processes (uvicorn, celery) against the test database."""
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from urllib.parse import quote

import httpx

from django.db import connection


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_database_url() -> str:
    """DATABASE_URL of the test database, for a child process (never the dev database)."""
    db = connection.settings_dict
    assert db["NAME"].startswith("test_"), db["NAME"]  # never point a child process at the dev database
    user = quote(db["USER"] or "", safe="")
    password = quote(db["PASSWORD"] or "", safe="")
    host = db["HOST"] or "127.0.0.1"
    port = db["PORT"] or "5432"
    return f"postgis://{user}:{password}@{host}:{port}/{quote(db['NAME'], safe='')}"


def stop(proc, log) -> None:
    """End a child process (terminate, then kill) and close its log."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    log.close()


@contextmanager
def uvicorn(port: int, env: dict, log_path, *, log_level: str = "warning", ready_path: str = "/health/live",
            timeout: float = 40):
    """uvicorn serving config.asgi on 127.0.0.1:`port` with `env`, its output in `log_path`;
    yields the base URL once `ready_path` answers, and stops it afterwards."""
    from django.conf import settings

    log = open(log_path, "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "config.asgi:application", "--host", "127.0.0.1", "--port", str(port),
         "--no-access-log", "--lifespan", "off", "--log-level", log_level,
         "--http", "common.httpprotocol:HttpToolsProtocol", "--ws", "common.wsprotocol:WebSocketProtocol", "--ws-max-size", "65536"],  # as deployed
        cwd=settings.BASE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"uvicorn exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(base + ready_path, timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"uvicorn did not start:\n{log_path.read_text()}")
            time.sleep(0.2)  # polling a starting process, not waiting on a page
        yield base
    finally:
        stop(proc, log)


@contextmanager
def served(tmp_path, **extra_env):
    """uvicorn as deployed (its protocols), on a free port, against this test's database and
    Redis, logging at INFO to `tmp_path/uvicorn.log`: yields (port, log path)."""
    from django.conf import settings

    port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.test",
        "DATABASE_URL": subprocess_database_url(),
        "TEST_REDIS_URL": settings.REDIS_URL,
        "PYTHONUNBUFFERED": "1",
        **extra_env,
    }
    with uvicorn(port, env, tmp_path / "uvicorn.log", log_level="info"):
        yield port, tmp_path / "uvicorn.log"
