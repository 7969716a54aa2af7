"""A web process (config.asgi) loads the apps' Celery task modules at start-up: loaded lazily,
the first request that enqueued a task imported ~170 modules (0.4 s), and a fresh worker's
first burst of requests queued behind the import lock (bench/README.md, offer flow)."""
import json
import os
import subprocess
import sys


def _last_line_of(code: str) -> str:
    """What a fresh interpreter running `code` printed last (it must succeed)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_the_asgi_entry_point_registers_every_task_before_the_first_request():
    code = (
        "import json, os, sys; os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings.base';"
        "import config.asgi;"
        "from config import celery_app;"
        "finalized = celery_app.finalized;"
        "registered = set(celery_app.tasks);"  # before anything below imports a tasks module
        "from config.periodic import PERIODIC_TASKS;"
        "from notifications.outbox import DELIVER_TASK;"
        "names = sorted({task for task, _, _ in PERIODIC_TASKS.values()} | {DELIVER_TASK});"
        "print(json.dumps({'finalized': finalized, 'missing': [n for n in names if n not in registered]}))"
    )
    assert json.loads(_last_line_of(code)) == {"finalized": True, "missing": []}


def test_a_process_that_loads_them_lazily_registers_them_for_threads_asking_at_once():
    """Elsewhere (a management command, a bench's set-up threads) the first enqueue imports
    them: six threads asking at once each get the task, not NotRegistered (5 of 6 did: the
    location bench's set-up logged ~60 lost `dispatch.driver_freed` enqueues)."""
    code = (
        "import os, threading; os.environ['DJANGO_SETTINGS_MODULE'] = 'config.settings.base';"
        "import django; django.setup();"
        "from common.broadcast import task_registered;"
        "barrier, seen = threading.Barrier(6), [];"
        "ask = lambda: (barrier.wait(), seen.append(task_registered('dispatch.driver_freed')));"
        "threads = [threading.Thread(target=ask) for _ in range(6)];"
        "[t.start() for t in threads]; [t.join() for t in threads];"
        "print(sum(seen))"
    )
    assert _last_line_of(code) == "6"
