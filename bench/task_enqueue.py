"""What a request's commit pays to have background work done: a Celery publish per item (the
ETA refresh as `tracking.refresh_eta` was enqueued), through kombu's Redis transport and through
ours (`common.celery_transport`: one redis-py client per pool instead of one per message),
against marking the item due in Redis and kicking one task
(`common.broadcast.enqueue_due_on_commit`'s pipeline: HSET + SET NX).

CPU time of this process per enqueue (time.process_time), alternating rounds so both see the
same machine load; the median of the rounds. The Celery messages go to a queue of the bench's
own and the Redis keys are the bench's own, all deleted afterwards (no worker sees them).

    .venv/bin/python bench/task_enqueue.py --rounds 6 --per-round 500
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from benchlib import machine_state  # noqa: E402
from common.broadcast import KICK_TTL_MS, _registered_task  # noqa: E402
from config.celery import app  # noqa: E402
from common.redis import get_redis  # noqa: E402
from tracking.services import ETA_REFRESH_TASK  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--per-round", type=int, default=500)
    args = p.parse_args()

    tag = uuid.uuid4().hex[:8]
    queue, due_key, kick = f"bench-enqueue-{tag}", f"bench:{tag}:due", f"bench:{tag}:kick"
    task, redis = _registered_task(ETA_REFRESH_TASK), get_redis()
    at = "2026-12-04T10:00:00Z"

    kombus = app.connection_for_write(transport="kombu.transport.redis:Transport")
    ours = app.connection_for_write()
    assert type(ours.transport).__module__ == "common.celery_transport", "the broker is not redis://"
    kombu_producer, our_producer = app.amqp.Producer(kombus), app.amqp.Producer(ours)

    def celery_kombus_transport():
        task.apply_async(args=(str(uuid.uuid4()), at), queue=queue, producer=kombu_producer)

    def celery_our_transport():
        task.apply_async(args=(str(uuid.uuid4()), at), queue=queue, producer=our_producer)

    def due_and_kick():
        pipe = redis.pipeline(transaction=False)
        pipe.hset(due_key, str(uuid.uuid4()), at)
        pipe.set(kick, "1", nx=True, px=KICK_TTL_MS)
        pipe.execute()

    ways = {
        "Celery publish, kombu's transport": celery_kombus_transport,
        "Celery publish, ours": celery_our_transport,
        "due mark + kick (one pipeline)": due_and_kick,
    }
    machine_state("machine before")
    cpu_us = {name: [] for name in ways}
    try:
        for f in ways.values():  # connections and the Celery producer set up outside the rounds
            f()
        for _ in range(args.rounds):
            for name, f in ways.items():
                start = time.process_time()
                for _ in range(args.per_round):
                    f()
                cpu_us[name].append((time.process_time() - start) / args.per_round * 1e6)
    finally:
        redis.delete(queue, due_key, kick)
        kombus.release()
        ours.release()
    print(f"\nCPU of this process per enqueue, {args.rounds} alternating rounds of {args.per_round}:")
    for name, values in cpu_us.items():
        print(f"  {name:34s} median {statistics.median(values):6.0f} µs   rounds: "
              + ", ".join(f"{v:.0f}" for v in values))
    machine_state("machine after")


if __name__ == "__main__":
    main()
