"""The webhook fan-out's chain step (`notifications.services._fall_due_with_the_chain`) against
a backlog: how long it takes to give the new messages of a batch of events the due time of the
earlier pending messages of their delivery, when N messages already wait across E endpoints
(an endpoint that stopped answering keeps a day of its events pending). Everything is written
and timed in one transaction that is rolled back: the running server's sweep never sees it.
Uses the dev database (`make migrate` first).

    .venv/bin/python bench/webhook_fan_out.py --messages 1000000 --endpoints 50 --chain 10 --events 20 --alternative
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.base")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import django  # noqa: E402

django.setup()

from django.db import connection, transaction  # noqa: E402

from benchlib import machine_state  # noqa: E402
from notifications import services  # noqa: E402
from webhook_claim import EVENTS_CTE, TABLES, owner_with_endpoints  # noqa: E402

# The backlog: every endpoint has each delivery's `chain` events pending, the first backing off
# (due in an hour) and the rest following it, as `_chain_follows` leaves them.
_BACKLOG_SQL = EVENTS_CTE + """
INSERT INTO {message} (event_id, endpoint_id, delivery_id, status, attempt_count, next_attempt_at,
                       window_started_at, last_error, created_at)
SELECT n.seq, e.id, md5((n.i / %(chain)s)::text || 'bench')::uuid, 'pending',
       CASE WHEN n.i %% %(chain)s = 0 THEN 3 ELSE 0 END, now() + interval '1 hour', now(), '', now()
FROM numbered n CROSS JOIN {endpoint} e WHERE e.owner_id = %(owner)s
"""

# The new events of one fan-out batch: one for each of `count` deliveries of the backlog, a
# message per endpoint, due at once (as `webhooks_fan_out` writes them).
_NEW_SQL = EVENTS_CTE + """, ins AS (
    INSERT INTO {message} (event_id, endpoint_id, delivery_id, status, attempt_count, next_attempt_at,
                           window_started_at, last_error, created_at)
    SELECT n.seq, e.id, md5(((n.i * %(stride)s) + %(offset)s)::text || 'bench')::uuid, 'pending', 0, now(), now(), '', now()
    FROM numbered n CROSS JOIN {endpoint} e WHERE e.owner_id = %(owner)s
)
SELECT seq FROM numbered
"""

# The alternative timed with `--alternative` (bench/README.md): the form before 2026-12-06 (the
# twenty-third session), a join grouped per new message over every earlier pending one.
_GROUPED_SQL = """
UPDATE {message} m SET next_attempt_at = h.due
FROM (
    SELECT n.id, max(p.next_attempt_at) AS due
    FROM {message} n
    JOIN {message} p ON p.endpoint_id = n.endpoint_id AND p.delivery_id = n.delivery_id
                    AND p.status = 'pending' AND p.event_id < n.event_id
    WHERE n.event_id = ANY(%(events)s) AND n.status = 'pending'
    GROUP BY n.id
) h
WHERE m.id = h.id AND h.due > m.next_attempt_at
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="pending messages in the backlog (all endpoints)")
    parser.add_argument("--endpoints", type=int, default=50)
    parser.add_argument("--chain", type=int, default=10, help="pending events per delivery and endpoint")
    parser.add_argument("--events", type=int, default=20, help="new events per fan-out (each of another delivery)")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--alternative", action="store_true", help="also time the grouped join (the form before)")
    args = parser.parse_args()
    machine_state("before")
    tables = TABLES
    backlog_events = max(args.messages // args.endpoints, args.chain)
    deliveries = backlog_events // args.chain
    with transaction.atomic():
        owner = owner_with_endpoints("bench-fan-out", args.endpoints)
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(_BACKLOG_SQL.format(**tables), {"owner": owner.pk, "type": "delivery.assigned",
                                                           "count": backlog_events, "chain": args.chain})
            cursor.execute(f"ANALYZE {tables['message']}")
        print(f"backlog: {backlog_events * args.endpoints:,} pending messages, {args.endpoints} endpoints, "
              f"{deliveries:,} deliveries with chains of {args.chain}, due in an hour "
              f"(written in {time.perf_counter() - started:.1f} s)")
        forms = [("the chain step (services)", None)]
        if args.alternative:
            forms.append(("the grouped join (before)", _GROUPED_SQL.format(**tables)))
        stride = max(deliveries // max(args.events, 1), 1)
        for name, sql in forms:
            took, moved = [], 0
            for run in range(args.runs):
                with transaction.atomic(), connection.cursor() as cursor:  # (a savepoint, rolled back)
                    cursor.execute(_NEW_SQL.format(**tables), {"owner": owner.pk, "type": "delivery.eta_updated", "count": args.events,
                                                               "stride": stride, "offset": run % stride})
                    seqs = [row[0] for row in cursor.fetchall()]
                    t = time.perf_counter()
                    if sql is None:
                        services._fall_due_with_the_chain(seqs)
                    else:
                        cursor.execute(sql, {"events": seqs})
                    took.append((time.perf_counter() - t) * 1000)
                    cursor.execute(f"SELECT count(*) FROM {tables['message']} WHERE event_id = ANY(%s) "
                                   "AND next_attempt_at > now() + interval '30 minutes'", [seqs])
                    moved += cursor.fetchone()[0]
                    transaction.set_rollback(True)
            took.sort()
            print(f"{name}: {args.events} events × {args.endpoints} endpoints, median {statistics.median(took):.1f} ms, "
                  f"max {took[-1]:.1f} ms over {args.runs} runs; {moved:,} of {args.runs * args.events * args.endpoints:,} "
                  "new messages now due with their chain")
        transaction.set_rollback(True)
    machine_state("after")


if __name__ == "__main__":
    main()
