"""Tracking links and socket URLs carry a credential in `?token=`: no log line keeps it, from
the web (Django's LOGGING), a Celery worker or beat (which log through Django's LOGGING too,
config/celery.py; the console SMS backend logs a customer's whole message, tracking link
included) or uvicorn. And every line is one JSON object (LOG_FORMAT=json), whoever writes it."""
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
    # what `celery worker` and `celery beat` do at start
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


def _json_lines_of(code: str) -> list[dict]:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings.base", "LOG_FORMAT": "json"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert lines and all(line.startswith("{") for line in lines), out.stderr  # every line one JSON object
    return [json.loads(line) for line in lines]


def test_a_worker_s_and_beat_s_lines_are_json_like_the_web_s():
    """Celery replaced Django's handlers with its plain `[time: LEVEL/Process] message` lines."""
    lines = _json_lines_of(
        "import django; django.setup()\n"
        "from config.celery import app\napp.log.setup(loglevel='INFO', redirect_stdouts=False)\n"
        "import logging\nfrom celery.utils.log import get_task_logger\n"
        "get_task_logger('notifications.tasks').info('link %s', 'http://h/track/2?token=SECRETTWO')\n"
        "logging.getLogger('celery.beat').info('beat: Starting...')\n"
        "logging.getLogger('x').debug('not at INFO')\n"
        "@app.task(name='demo.say')\ndef say():\n    get_task_logger('demo').info('inside')\n"
        "say.apply(task_id='T-1')\n"
        "print('a stray print')\n"
        "logging.getLogger('celery.app.trace').info('Task %(name)s[%(id)s] succeeded', {'name': 'demo.say', 'id': 'T-2'},"
        " extra={'data': {'id': 'T-2', 'name': 'demo.say', 'args': \"('+15550001234',)\", 'kwargs': '{}',"
        " 'return_value': 'SECRETVALUE', 'runtime': 0.5}})\n"
    )
    (stray,) = [line for line in lines if line["message"] == "a stray print"]  # stdout, redirected as Celery does
    assert (stray["logger"], stray["level"]) == ("celery.redirected", "WARNING")
    (trace,) = [line for line in lines if line["message"] == "Task demo.say[T-2] succeeded"]
    assert trace["data"] == {"id": "T-2", "name": "demo.say", "runtime": 0.5}  # no arguments, no return value
    said = [line for line in lines if line["logger"] == "demo"]
    assert [(line["level"], line["logger"], line["message"]) for line in lines
            if line["logger"] not in ("celery.app.trace", "celery.redirected")] == [
        ("INFO", "notifications.tasks", "link http://h/track/2?token=[redacted]"),
        ("INFO", "celery.beat", "beat: Starting..."),
        ("INFO", "demo", "inside"),
    ]
    assert "task_id" not in lines[0] and (said[0]["task_name"], said[0]["task_id"]) == ("demo.say", "T-1")


def test_uvicorn_s_own_lines_are_json_once_django_is_set_up():
    """uvicorn's command line installs plain-text handlers on "uvicorn" before it loads the
    application; the protocol's refusals (common/httpprotocol.py) came out in that format."""
    lines = _json_lines_of(
        "import logging, logging.config\nfrom uvicorn.config import LOGGING_CONFIG\n"
        "logging.config.dictConfig(LOGGING_CONFIG)\n"
        "import django; django.setup()\n"
        "logging.getLogger('uvicorn.error').warning('HTTP request refused: its head is over %d bytes.', 65536,"
        " extra={'color_message': '\\x1b[1mcoloured\\x1b[0m'})\n"
        "logging.getLogger('uvicorn.access').info('%s - \"%s %s HTTP/%s\" %d', '127.0.0.1:1', 'GET', '/track/1?token=SECRET', '1.1', 200)\n"
    )
    assert [(line["level"], line["logger"]) for line in lines] == [("WARNING", "uvicorn.error"), ("INFO", "uvicorn.access")]
    assert lines[0]["message"] == "HTTP request refused: its head is over 65536 bytes." and "color_message" not in lines[0]
    assert "SECRET" not in lines[1]["message"] and "token=[redacted]" in lines[1]["message"]
