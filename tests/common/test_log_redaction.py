"""Tracking links and socket URLs carry a credential in `?token=`: no log line keeps it, from
the web (Django's LOGGING) or from a Celery worker or beat, which log through handlers of
their own (the console SMS backend logs a customer's whole message, tracking link included)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_LOG_LINES = """
import logging
from celery.utils.log import get_task_logger
logging.getLogger("notifications.sms").info("Track it live: http://h/track/1?token=SECRETONE")
get_task_logger("notifications.tasks").info("link %s", "http://h/track/2?token=SECRETTWO&x=1")
logging.getLogger("uvicorn.error").info('"WebSocket /ws/track/3/?token=SECRETTHREE" [accepted]')
"""


def _stderr_of(setup: str) -> str:
    code = "import django; django.setup()\n" + setup + _LOG_LINES
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base", "LOG_FORMAT": "plain"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stderr


def _assert_redacted(logged: str) -> None:
    assert "Track it live" in logged and "/track/2?token=" in logged and "/ws/track/3/" in logged, logged
    assert "SECRET" not in logged, logged
    assert logged.count("token=[redacted]") == 3, logged


def test_a_worker_s_and_beat_s_log_lines_keep_no_token():
    # what `celery worker` and `celery beat` do at start: Celery's own handlers replace Django's
    _assert_redacted(_stderr_of("from config.celery import app\napp.log.setup(loglevel='INFO', redirect_stdouts=False)\n"))


def test_the_web_s_log_lines_keep_no_token():
    _assert_redacted(_stderr_of(""))
