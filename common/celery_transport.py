"""Celery's Redis broker transport (kombu's), with one redis-py client per connection pool for
the channel's own commands instead of a new one per command.

kombu's Redis channel runs every publish, queue size and purge through
`Channel.conn_or_acquire`, which builds a new `redis.Redis` on the channel's pool each time
(`_create_client`), and redis-py 8 fills ~170 response callbacks into every new client: about
a fifth of the CPU of a task publish (bench/task_enqueue.py), paid on the request's thread for
every task it enqueues. A client is only a handle on its pool, which is thread-safe and hands each
command a connection of its own, so one per pool serves them all; a new pool (after a fork,
kombu's `_after_fork` drops the old one) gets a new client. The asynchronous clients the
worker consumes with (BRPOP, pub/sub) are kombu's own, unchanged.

And an ack that fails still frees its prefetch slot (`QoS`).

Selected by `CELERY_BROKER_TRANSPORT` for `redis://` brokers (config/settings/base.py); not for
`rediss://`, where kombu turns TLS on by the transport's name."""
from __future__ import annotations

import os
import threading
from time import monotonic

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual

# Acks whose removal failed are retried with the next acks: at most this many, for at most this
# long (well inside kombu's 1 h visibility timeout, after which the message is restored and
# delivered again under the same tag: removing that one's index entry would lose it on a crash).
UNREMOVED_MAX = 1000
UNREMOVED_SECONDS = 600

# The process's acks whose removal failed: (delivery tag, when its ack failed). Kept across
# channels: a failed ack comes with a broken connection as a rule, and the next acks are on the
# channel of the reconnect (kombu does not restore these on close: they are no longer delivered).
_unremoved: list[tuple[str, float]] = []
_unremoved_lock = threading.Lock()


def _forget_in_child() -> None:
    global _unremoved_lock
    _unremoved.clear()  # the parent's acks are the parent's
    _unremoved_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)


class QoS(kombu_redis.QoS):
    """kombu's Redis QoS frees a message's prefetch slot only after the message is removed from
    Redis's unacked index: when that removal fails (the broker's socket timeout while Redis
    hangs, a connection reset while it restarts; Celery logs "Couldn't ack") the slot stays
    taken for good, and a worker (prefetch 1 × 2 processes) stopped consuming after two such
    acks until restarted, every timer with it (seen with Redis paused 8 s under make run). Here
    the slot is freed whatever happens, and the removal is retried with the process's next acks,
    on this channel or the one of a reconnect (for UNREMOVED_SECONDS); a message not removed
    by then stays in the unacked index, which kombu restores after its visibility timeout (a
    late duplicate run, as after a worker crash)."""

    def ack(self, delivery_tag):
        now = monotonic()
        with _unremoved_lock:
            retry = [(tag, at) for tag, at in _unremoved if now - at < UNREMOVED_SECONDS]
            _unremoved.clear()
        try:
            with self.pipe_or_acquire() as pipe:
                for tag, _ in retry:
                    self._remove_from_indices(tag, pipe)
                self._remove_from_indices(delivery_tag, pipe)
                pipe.execute()
        except Exception:
            with _unremoved_lock:
                _unremoved[:0] = [*retry, (delivery_tag, now)]
                del _unremoved[:-UNREMOVED_MAX]
            raise
        finally:
            virtual.QoS.ack(self, delivery_tag)

    def reject(self, delivery_tag, requeue=False):
        if not requeue:
            return self.ack(delivery_tag)
        try:
            self.restore_by_tag(delivery_tag, leftmost=True)
        finally:
            virtual.QoS.ack(self, delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _command_client: tuple | None = None  # (pool, client)

    def _create_client(self, asynchronous=False):
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        cached = self._command_client
        if cached is None or cached[0] is not pool:
            cached = self._command_client = (pool, super()._create_client())
        return cached[1]


class Transport(kombu_redis.Transport):
    Channel = Channel
