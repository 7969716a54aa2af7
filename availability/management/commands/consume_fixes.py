"""`manage.py consume_fixes`: the location stream into PostgreSQL, in batches.

Reads `{fleet}:fixes` with the consumer group `pg` (several consumers may run at once; each
entry goes to one of them), writes each batch with one UPDATE … FROM (VALUES …) guarded by
recorded-at, and acknowledges the entries only after the transaction committed. An entry
read but not acknowledged (a consumer killed mid-batch) stays pending: on start, and every
`--claim-every` (5) seconds, a consumer claims entries idle longer than `--claim-idle-ms` (10 s)
from any consumer and writes them: a killed consumer's batch is in PostgreSQL 10–15 s later. Once a second one consumer (a Redis lock decides which) publishes
the ops position digest: every driver that moved, in one `driver_positions` message.

The process lowers its own priority (`--nice`, FIX_CONSUMER_NICE, default 10): its deadline
is PostgreSQL one second behind Redis, the web workers' is a request's milliseconds, and on a
box where both want the CPU the scheduler should make the consumer wait, not a request.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
import uuid
from datetime import datetime, timezone as dt_timezone

import redis
from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from availability import events, live
from common.broadcast import OPS_GROUP, send_now
from common.redis import RedisFailed, fleet_key, get_redis
from workflows.drivers import fixes_process

logger = logging.getLogger(__name__)

DIGEST_LOCK = fleet_key("moved:lock")
# A consumer the group forgets: idle this long with nothing pending (a live one reads every
# --block-ms, so it never is)
DEAD_CONSUMER_IDLE_MS = 3_600_000

# The oldest entry still pending in the group, else the last one delivered (everything before
# it acknowledged): the stream trimmed up to it. KEYS: the stream. ARGV: the group.
_TRIM_SCRIPT = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
local floor = nil
if pending[1] > 0 then
  floor = pending[2]
else
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, last = nil, nil
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1] elseif group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    if name == ARGV[1] then floor = last end
  end
end
if floor and floor ~= '0-0' then return redis.call('XTRIM', KEYS[1], 'MINID', '~', floor) end
return 0
"""

# The consumers idle past ARGV[3] ms with nothing pending, other than ARGV[2], removed from the
# group ARGV[1]; how many. One script: a consumer of the same name reading between a look and
# a removal would otherwise lose the entries it just took. KEYS: the stream.
_FORGET_SCRIPT = """
local removed = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local info = {}
  for i = 1, #consumer, 2 do info[consumer[i]] = consumer[i + 1] end
  if info['name'] ~= ARGV[2] and info['pending'] == 0 and info['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed = removed + 1
  end
end
return removed
"""


# What a fix's time may be (epoch seconds): a datetime PostgreSQL and Python both hold
_LATEST_TIME = datetime(9999, 1, 1, tzinfo=dt_timezone.utc).timestamp()


def _optional(fields, name: str) -> float | None:
    value = fields.get(name)
    if not value:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} is not finite")
    return number


def parse_fix(fields) -> live.Fix:
    """A stream entry as the fast lane's script wrote it; ValueError/KeyError for anything else
    (an entry another writer put there): its driver id a UUID (made canonical), the position
    on the globe, its time a finite moment after 1970."""
    lat, lon, t = float(fields["lat"]), float(fields["lon"]), float(fields["t"])
    if not (-90 <= lat <= 90 and -180 <= lon <= 180 and 0 < t < _LATEST_TIME):  # (NaN fails each)
        raise ValueError("position or time out of range")
    return live.Fix(
        driver_id=str(uuid.UUID(fields["d"])), lat=lat, lon=lon, recorded_at=t,
        accuracy_m=_optional(fields, "acc"), speed=_optional(fields, "speed"), heading=_optional(fields, "heading"),
    )


def parse_entries(entries) -> tuple[list[str], list[live.Fix]]:
    """The entries' ids (all of them: each is acknowledged) and their fixes; a malformed entry
    is logged and dropped, so that it cannot hold up or crash the batch it came in."""
    ids, fixes = [], []
    for entry_id, fields in entries:
        ids.append(entry_id)
        try:
            fixes.append(parse_fix(fields))
        except (KeyError, ValueError, TypeError, AttributeError):
            logger.error("dropping malformed fix %s: %r", entry_id, fields)
    return ids, fixes


class Command(BaseCommand):
    help = "Persist the location stream to PostgreSQL in batches and publish the ops position digest."

    def add_arguments(self, parser):
        parser.add_argument("--consumer", default=f"{socket.gethostname()}-{os.getpid()}")
        parser.add_argument("--batch", type=int, default=None, help="entries per batch (FIX_BATCH_SIZE)")
        parser.add_argument("--block-ms", type=int, default=200)
        # A live consumer touches Redis every --block-ms and writes a batch in well under a
        # second: entries idle 10 s belong to a dead one (a slow live one that loses a batch to
        # the claim only makes its fixes written twice, which the recorded-at guard makes moot)
        parser.add_argument("--claim-idle-ms", type=int, default=10_000)
        parser.add_argument("--claim-every", type=float, default=5.0)
        parser.add_argument("--digest-every", type=float, default=1.0)
        parser.add_argument("--once", action="store_true", help="drain what is there (pending included), then stop")
        parser.add_argument("--nice", type=int, default=None,
                            help="niceness to add to this process (FIX_CONSUMER_NICE; 0: none)")

    def handle(self, *args, consumer, batch, block_ms, claim_idle_ms, claim_every, digest_every, once, nice, **options):
        self.name, self.batch = consumer, batch or settings.FIX_BATCH_SIZE
        nice = settings.FIX_CONSUMER_NICE if nice is None else nice
        if nice > 0:
            # Below the web workers: a fix may wait here up to a second, a request must not.
            logger.info("consume_fixes: niceness now %d", os.nice(nice))
        self.stopping = False
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._run(claim_idle_ms=claim_idle_ms, claim_every=claim_every, digest_every=digest_every,
                      block_ms=block_ms, once=once)
        finally:
            for sig, handler in previous.items():  # called in-process (tests, scripts): leave it as found
                signal.signal(sig, handler)

    def _run(self, *, claim_idle_ms, claim_every, digest_every, block_ms, once):
        self.r = get_redis()
        self._ensure_group()
        own_pending, next_claim, next_digest, next_trim = True, 0.0, 0.0, 0.0
        written = 0
        while not self.stopping:
            now = time.monotonic()
            try:
                if now >= next_claim:
                    written += self._claim(claim_idle_ms)
                    next_claim = now + claim_every
                if now >= next_digest:
                    self._digest()
                    next_digest = now + digest_every
                if now >= next_trim:
                    self._trim()
                    next_trim = now + 5
                entries = self._read("0" if own_pending else ">", 0 if own_pending or once else block_ms)
                if not entries:
                    if own_pending:
                        own_pending = False
                        continue
                    if once:
                        break
                    continue
                written += self._write(entries)
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    if once:
                        raise
                    logger.warning("consume_fixes: Redis refused a command; retrying", exc_info=True)
                    time.sleep(1)
                    continue
                # The stream or its group is gone (Redis restarted empty, the key deleted): make
                # the group again, from the start of what the stream holds (PostgreSQL's guard
                # makes a fix written twice harmless).
                logger.warning("consume_fixes: the consumer group is gone; creating it again")
                try:
                    self._ensure_group()
                except RedisFailed:
                    if once:
                        raise
                    logger.warning("consume_fixes: could not create the group; retrying", exc_info=True)
                    time.sleep(1)
                own_pending = True
            except RedisFailed:
                if once:
                    raise
                logger.warning("consume_fixes: Redis unavailable; retrying", exc_info=True)
                time.sleep(1)
            except DatabaseError:
                if once:
                    raise
                logger.warning("consume_fixes: database unavailable; the batch stays pending", exc_info=True)
                close_old_connections()
                own_pending = True
                time.sleep(1)
        if once:
            self._digest()
        self.stdout.write(f"consume_fixes {self.name}: {written} fixes written")

    def _stop(self, *_):
        self.stopping = True

    def _ensure_group(self):
        try:
            self.r.xgroup_create(live.STREAM_KEY, live.STREAM_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _read(self, start: str, block_ms: int):
        kwargs = {"count": self.batch}
        if block_ms:
            kwargs["block"] = block_ms
        reply = self.r.xreadgroup(live.STREAM_GROUP, self.name, {live.STREAM_KEY: start}, **kwargs)
        return reply[0][1] if reply else []

    def _write(self, entries) -> int:
        ids, fixes = parse_entries(entries)
        written = len(fixes_process(fixes)) if fixes else 0
        if ids:
            self.r.xack(live.STREAM_KEY, live.STREAM_GROUP, *ids)
        return written

    def _claim(self, idle_ms: int) -> int:
        """Entries a dead consumer read and never acknowledged: written here. Then the group
        forgets consumers gone for an hour with nothing pending (each restart is a new name)."""
        written, cursor = 0, "0-0"
        while True:
            cursor, entries, *_ = self.r.xautoclaim(
                live.STREAM_KEY, live.STREAM_GROUP, self.name, min_idle_time=idle_ms, start_id=cursor, count=self.batch
            )
            entries = [e for e in entries if e and e[1] is not None]
            if entries:
                written += self._write(entries)
            if cursor == "0-0" or not entries:
                break
        self.r.eval(_FORGET_SCRIPT, 1, live.STREAM_KEY, live.STREAM_GROUP, self.name, DEAD_CONSUMER_IDLE_MS)
        return written

    def _trim(self):
        """Drop entries every consumer is done with (acknowledged): the stream stays short
        while consumers keep up; FIX_STREAM_MAXLEN caps it when they do not. One script, so
        that no consumer reads between the floor and the trim (a floor taken from the group's
        last-delivered id after another consumer's read would trim what it holds pending)."""
        self.r.eval(_TRIM_SCRIPT, 1, live.STREAM_KEY, live.STREAM_GROUP)

    def _digest(self):
        if not self.r.set(DIGEST_LOCK, self.name, nx=True, px=900):
            return  # another consumer published this second's digest
        moved = live.moved_drain()
        if moved:
            send_now([OPS_GROUP], events.driver_positions(moved, sent_at=timezone.now()))
