"""`manage.py healthcheck worker|beat|fixes`: exit 0 when this host's process of that kind is
alive, 1 (with the reason on stderr) when not. For container healthchecks and process
supervisors (docker-compose.yml, docs/operations.md); the web process has `/health/live`.

- worker: this host's Celery worker (`celery@<hostname>`, or --name) heartbeated within
  WORKER_TIMEOUT seconds (common/heartbeat.py);
- beat: beat sent a periodic job within --within seconds (default 60; the shortest job runs
  every few seconds);
- fixes: a `consume_fixes` consumer of this host (`<hostname>-<pid>`, its default name) is in
  the stream's group and, unless nothing is waiting, read within --within seconds (default 30;
  it polls every 200 ms).
"""
from __future__ import annotations

import socket

from django.core.management.base import BaseCommand, CommandError

from availability import live
from common import heartbeat
from common.redis import get_redis


class Command(BaseCommand):
    help = "Exit 0 when this host's worker, beat or fixes consumer is alive (container healthchecks)."

    def add_arguments(self, parser):
        parser.add_argument("process", choices=["worker", "beat", "fixes"])
        parser.add_argument("--name", default=None, help="worker node name or fixes consumer prefix (default: from the hostname)")
        parser.add_argument("--within", type=float, default=None, help="seconds (default: 30 for worker and fixes, 60 for beat)")

    def handle(self, *args, process, name, within, **options):
        try:
            problem = getattr(self, f"_{process}")(name, within)
        except heartbeat.REDIS_ERRORS as exc:
            problem = f"redis unavailable: {exc}"
        if problem:
            raise CommandError(f"{process}: {problem}", returncode=1)
        self.stdout.write(f"{process}: ok")

    def _worker(self, name, within):
        name = name or f"celery@{socket.gethostname()}"
        within = heartbeat.WORKER_TIMEOUT if within is None else within
        age = heartbeat.worker_heartbeat_age(name)
        if age is None:
            return f"no heartbeat from {name}"
        if age > within:
            return f"{name} last heartbeat {age:.0f} s ago"
        return None

    def _beat(self, name, within):
        within = 60.0 if within is None else within
        age = heartbeat.beat_send_age()
        if age is None or age > within:
            return f"no periodic job sent for {within:g} s"
        return None

    def _fixes(self, name, within):
        prefix = name or f"{socket.gethostname()}-"
        within = 30.0 if within is None else within
        r = get_redis()
        try:
            groups = {g["name"]: g for g in r.xinfo_groups(live.STREAM_KEY)}
        except heartbeat.REDIS_ERRORS as exc:
            if "no such key" not in str(exc).lower():
                raise
            groups = {}
        group = groups.get(live.STREAM_GROUP)
        if group is None:
            return "the location stream has no consumer group yet"
        idle = [c["idle"] / 1000 for c in r.xinfo_consumers(live.STREAM_KEY, live.STREAM_GROUP) if str(c["name"]).startswith(prefix)]
        if not idle:
            return f"no consumer {prefix}* in the group"
        # Before Redis 7.2 a read of a quiet stream does not reset `idle`: nothing waiting is fine.
        waiting = group.get("lag")
        if min(idle) > within and waiting != 0:
            return f"consumers {prefix}* idle for {min(idle):.0f} s with {waiting} entries waiting"
        return None
