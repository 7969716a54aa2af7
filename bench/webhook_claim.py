"""The webhook sweep's claim (`notifications.services.webhooks_claim_due`) against a backlog:
how long one claim of 20 takes when N messages are due across E endpoints, each delivery's
events chained (only the first of a chain is sendable). Everything is written and claimed in
one transaction that is rolled back: the running server's sweep never sees it. Uses the dev
database (`make migrate` first).

    .venv/bin/python bench/webhook_claim.py --messages 100000 --endpoints 50 --chain 5 --claims 20 --alternative
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

from django.contrib.auth import get_user_model  # noqa: E402
from django.db import connection, transaction  # noqa: E402
from django.utils import timezone  # noqa: E402

from benchlib import machine_state  # noqa: E402
from notifications import services  # noqa: E402
from notifications.models import OutboxEvent, WebhookEndpoint, WebhookMessage  # noqa: E402

# `%(count)s` outbox events of type `%(type)s` for `%(owner)s`, already fanned out, numbered
# from 0 (`numbered`): what a bench's backlog starts from (webhook_fan_out.py too).
EVENTS_CTE = """
WITH ev AS (
    INSERT INTO {outbox} (event_id, type, owner_id, payload, created_at, fanned_out_at)
    SELECT gen_random_uuid(), %(type)s, %(owner)s, '{{}}', now(), now()
    FROM generate_series(1, %(count)s)
    RETURNING seq
), numbered AS (
    SELECT seq, row_number() OVER (ORDER BY seq) - 1 AS i FROM ev
)"""
TABLES = {"outbox": OutboxEvent._meta.db_table, "endpoint": WebhookEndpoint._meta.db_table,
          "message": WebhookMessage._meta.db_table}


def owner_with_endpoints(name: str, count: int):
    """A user of the bench's own with `count` endpoints (on a host that does not exist)."""
    owner = get_user_model().objects.create(username=f"{name}-{time.time_ns()}")
    WebhookEndpoint.objects.bulk_create(
        WebhookEndpoint(owner=owner, url=f"http://bench.invalid/{j}", events=["*"], secret="x",
                        created_at=timezone.now(), updated_at=timezone.now())
        for j in range(count))
    return owner


_BACKLOG_SQL = EVENTS_CTE + """, eps AS (
    SELECT id, row_number() OVER (ORDER BY id) - 1 AS j FROM {endpoint} WHERE owner_id = %(owner)s
)
INSERT INTO {message} (event_id, endpoint_id, delivery_id, status, attempt_count, next_attempt_at,
                       window_started_at, last_error, created_at)
SELECT n.seq, e.id, md5((n.i / %(chain)s)::text || 'bench')::uuid, 'pending', 0,
       CASE WHEN e.j < %(backing_off)s THEN now() + interval '1 hour' ELSE now() - interval '1 minute' END,
       now(), '', now()
FROM numbered n JOIN eps e ON e.j = (n.i / %(chain)s) %% %(endpoints)s
"""


# The alternatives, timed with `--alternative` (bench/README.md). The claim in services walks each
# active endpoint's due messages in the order they fell due (`webhook_message_turn_idx`); before
# 2026-12-06 (twentieth session) it ranked every due message of every endpoint (the first here).
# The second walks each endpoint's pending messages in event order, on an index made for the run
# (in the run's transaction, rolled back with it): a failing endpoint's not-yet-due backlog is
# walked on every claim.
_RANKED_SQL = """
UPDATE {message} SET leased_until = %(lease)s
WHERE id IN (
    SELECT l.id FROM {message} l
    WHERE l.id IN (
        SELECT ranked.id FROM (
            SELECT m.id, m.event_id,
                   row_number() OVER (PARTITION BY m.endpoint_id ORDER BY m.event_id) AS turn
            FROM {message} m
            JOIN {endpoint} e ON e.id = m.endpoint_id AND e.active
            WHERE {sendable}
        ) ranked
        WHERE ranked.turn <= %(per_endpoint)s
    )
      AND l.status = 'pending' AND (l.leased_until IS NULL OR l.leased_until < %(now)s)
    ORDER BY l.event_id
    LIMIT %(limit)s
    FOR UPDATE OF l SKIP LOCKED
)
RETURNING id
"""
_EVENT_ORDER_INDEX = ("CREATE INDEX bench_claim_event_order_idx ON {message} (endpoint_id, event_id) "
                      "INCLUDE (next_attempt_at, leased_until) WHERE status = 'pending'")
_EVENT_ORDER_SQL = services._CLAIM_SQL.replace("ORDER BY m.next_attempt_at, m.event_id\n", "ORDER BY m.event_id\n")
assert _EVENT_ORDER_SQL != services._CLAIM_SQL
ALTERNATIVES = [("the ranked claim (before 2026-12-06)", None, _RANKED_SQL),
                ("walking each endpoint in event order", _EVENT_ORDER_INDEX, _EVENT_ORDER_SQL)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--endpoints", type=int, default=50)
    parser.add_argument("--chain", type=int, default=5, help="events per delivery (each waits for the one before)")
    parser.add_argument("--claims", type=int, default=20)
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--backing-off", type=int, default=0,
                        help="this many of the endpoints are failing: their messages wait an hour (not due)")
    parser.add_argument("--alternative", action="store_true", help="also time the alternatives (the claim before, event order)")
    args = parser.parse_args()
    print(machine_state("before"))
    tables = TABLES
    with transaction.atomic():
        owner = owner_with_endpoints("bench-claim", args.endpoints)
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute(_BACKLOG_SQL.format(**tables), {
                "owner": owner.pk, "type": "delivery.assigned", "backing_off": args.backing_off, "count": args.messages,
                "chain": args.chain, "endpoints": args.endpoints})
            cursor.execute(f"ANALYZE {tables['message']}")
        print(f"backlog: {args.messages:,} messages, {args.endpoints} endpoints ({args.backing_off} backing off: not due),"
              f" chains of {args.chain}"
              f" (written in {time.perf_counter() - started:.1f} s)")
        now = timezone.now()
        took, claimed = [], 0
        for _ in range(args.claims):
            t = time.perf_counter()
            claimed += len(services.webhooks_claim_due(now=now, limit=args.batch))
            took.append((time.perf_counter() - t) * 1000)
        took.sort()
        print(f"claim of {args.batch}: median {statistics.median(took):.1f} ms, max {took[-1]:.1f} ms over "
              f"{args.claims} claims ({claimed} messages leased)")
        if args.alternative:
            from datetime import timedelta
            for name, index, sql in ALTERNATIVES:
                with transaction.atomic(), connection.cursor() as cursor:  # (a savepoint: each index alone)
                    cursor.execute("UPDATE {message} SET leased_until = NULL WHERE leased_until IS NOT NULL".format(**tables))
                    cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")  # (pending FK checks forbid CREATE INDEX)
                    if index:
                        cursor.execute(index.format(**tables))
                    cursor.execute(f"ANALYZE {tables['message']}")
                    took_a, claimed_a = [], 0
                    for _ in range(args.claims):
                        t = time.perf_counter()
                        cursor.execute(sql.format(sendable=services.SENDABLE_SQL.format(**tables), **tables), {
                            "now": now, "lease": now + timedelta(seconds=services.LEASE_SECONDS), "limit": args.batch,
                            "per_endpoint": services.CLAIM_PER_ENDPOINT})
                        claimed_a += len(cursor.fetchall())
                        took_a.append((time.perf_counter() - t) * 1000)
                    if index:
                        cursor.execute(f"DROP INDEX {index.split()[2]}")
                took_a.sort()
                print(f"{name}: median {statistics.median(took_a):.1f} ms, max {took_a[-1]:.1f} ms ({claimed_a} leased)")
        due = args.messages * (args.endpoints - args.backing_off) // args.endpoints
        drain = due / args.batch * statistics.median(took) / 1000
        print(f"draining the {due:,} due {args.batch} at a time would spend ~{drain:,.0f} s in claims alone")
        transaction.set_rollback(True)
    print(machine_state("after"))


if __name__ == "__main__":
    main()
