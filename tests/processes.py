"""For tests that start real server processes (uvicorn, celery) against the test database."""
import socket
from urllib.parse import quote

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
