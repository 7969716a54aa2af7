"""A web process (config.asgi) loads the apps' Celery task modules at start-up: loaded lazily,
the first request that enqueued a task imported ~170 modules (0.4 s), and a fresh worker's
first burst of requests queued behind the import lock (bench/README.md, offer flow)."""
import json
import os
import subprocess
import sys


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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"finalized": True, "missing": []}
