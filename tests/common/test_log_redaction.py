"""Tracking links and socket URLs carry a credential in `?token=`: no log line keeps it, from
the web (Django's LOGGING) or from a Celery worker or beat, which log through handlers of
their own (the console SMS backend logs a customer's whole message, tracking link included)."""
import json
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


def test_the_request_a_django_log_line_carries_is_written_without_its_token():
    """Django's request and security logs carry the request as an extra; the JSON formatter
    writes it out (its text is the path with the query). Numbers and other extras stay."""
    code = (
        "import django; django.setup()\n"
        "import logging\n"
        "from django.test import RequestFactory\n"
        "request = RequestFactory().get('/track/7', {'token': 'SECRETFOUR'})\n"
        "logging.getLogger('django.request').error('Method Not Allowed: %s', request, extra={'status_code': 405, 'request': request})\n"
        "logging.getLogger('django.security.DisallowedHost').error('Invalid HTTP_HOST header', extra={'request': request})\n"
        "logging.getLogger('django.request').error('Not Found: %s', RequestFactory().get('/x?q=1'), extra={'status_code': 404})\n"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base", "LOG_FORMAT": "json"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    assert len(lines) == 3, out.stderr
    assert "SECRET" not in out.stderr, out.stderr
    assert "/track/7?token=[redacted]" in lines[0]["request"] and lines[0]["status_code"] == 405
    assert "token=[redacted]" in lines[1]["request"]
    assert lines[2]["message"] == "Not Found: <WSGIRequest: GET '/x?q=1'>" and lines[2]["status_code"] == 404
