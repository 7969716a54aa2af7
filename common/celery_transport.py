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

Selected by `CELERY_BROKER_TRANSPORT` for `redis://` brokers (config/settings/base.py); not for
`rediss://`, where kombu turns TLS on by the transport's name."""
from __future__ import annotations

from kombu.transport import redis as kombu_redis


class Channel(kombu_redis.Channel):
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
