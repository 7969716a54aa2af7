"""Celery's Redis transport (common/celery_transport.py): one redis-py client per connection
pool for the channel's commands (kombu built one per publish), the messages unchanged."""
import threading
import uuid

import pytest
import redis
from kombu.transport import redis as kombu_redis

from common.broadcast import _registered_task
from common.celery_transport import Channel, Transport
from common.redis import get_redis
from config.celery import app
from tests.common.test_celery_worker import sending_to_workers  # noqa: F401 (fixture)


@pytest.fixture
def connection():
    conn = app.connection_for_write()
    yield conn
    conn.release()


@pytest.fixture
def queue():
    name = f"test-transport-{uuid.uuid4().hex}"
    yield name
    get_redis().delete(name)


def test_the_redis_broker_goes_through_our_transport(connection):
    assert isinstance(connection.transport, Transport)
    assert isinstance(connection.default_channel, Channel) and issubclass(Channel, kombu_redis.Channel)


def test_a_channel_runs_its_commands_on_one_client_per_pool(connection):
    channel = connection.default_channel
    first = channel._create_client()
    assert channel._create_client() is first
    assert first.connection_pool is channel.pool
    assert channel._create_client(asynchronous=True) is not first  # the worker's BRPOP client: kombu's own

    channel._after_fork()  # a forked worker child drops the parent's pools
    again = channel._create_client()
    assert again is not first and again.connection_pool is channel.pool


def test_publishes_from_many_threads_all_arrive(connection, queue, sending_to_workers):  # noqa: F811
    task = _registered_task("tracking.refresh_eta")
    producer = app.amqp.Producer(connection)  # one producer, one channel: every thread on its client
    errors = []

    def publish(n):
        try:
            for i in range(50):
                task.apply_async(args=(f"{n}-{i}", "2026-12-04T10:00:00Z"), queue=queue, producer=producer)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert get_redis().llen(queue) == 400


def test_publishes_build_no_client_per_message(connection, queue, sending_to_workers):  # noqa: F811
    """kombu's own channel builds a redis-py client for every publish (20 here); ours one."""
    task = _registered_task("tracking.refresh_eta")
    producer = app.amqp.Producer(connection)
    channel = producer.channel
    built = []
    client_class = channel.Client

    def counting_client(*args, **kwargs):
        built.append(kwargs)
        return client_class(*args, **kwargs)

    channel._command_client = None  # nothing cached yet: the first publish builds the one client
    channel.Client = counting_client
    for i in range(20):
        task.apply_async(args=(f"count-{i}", "2026-12-04T10:00:00Z"), queue=queue, producer=producer)
    assert get_redis().llen(queue) == 20
    assert len(built) == 1


def test_an_ack_that_fails_frees_its_prefetch_slot_and_is_removed_with_the_next(connection, queue, monkeypatch):
    """kombu's QoS kept the slot of an ack whose removal from Redis failed (Redis hung or
    restarting): a worker with prefetch 2 stopped consuming for good after two."""
    channel = connection.default_channel
    channel.basic_qos(prefetch_count=1)
    qos = channel.qos
    for n in range(2):
        connection.Producer(channel).publish({"n": n}, routing_key=queue)
    channel.queue_declare(queue)
    unacked = get_redis().hlen

    first = channel.basic_get(queue, no_ack=False)
    assert not qos.can_consume() and unacked(qos.unacked_key) >= 1
    acquire = qos.pipe_or_acquire

    def hung(*args, **kwargs):
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(qos, "pipe_or_acquire", hung)
    with pytest.raises(redis.exceptions.TimeoutError):
        first.ack()
    assert qos.can_consume()  # the slot is free though Redis still lists the message as unacked
    assert get_redis().hexists(qos.unacked_key, first.delivery_tag)

    monkeypatch.setattr(qos, "pipe_or_acquire", acquire)  # Redis is back
    second = channel.basic_get(queue, no_ack=False)
    second.ack()
    assert qos.can_consume()
    assert not get_redis().hexists(qos.unacked_key, first.delivery_tag)
    assert not get_redis().hexists(qos.unacked_key, second.delivery_tag)


def test_an_ack_that_failed_is_removed_by_the_next_ack_on_the_channel_of_a_reconnect(connection, queue, monkeypatch):
    """A failed ack comes with a broken connection as a rule: its removal was kept by the old
    channel's QoS, which the reconnect drops, and the message ran again an hour later."""
    channel = connection.default_channel
    channel.basic_qos(prefetch_count=1)
    connection.Producer(channel).publish({"n": 0}, routing_key=queue)
    channel.queue_declare(queue)
    first = channel.basic_get(queue, no_ack=False)

    def hung(*args, **kwargs):
        raise redis.exceptions.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(channel.qos, "pipe_or_acquire", hung)
    with pytest.raises(redis.exceptions.ConnectionError):
        first.ack()
    assert get_redis().hexists(channel.qos.unacked_key, first.delivery_tag)

    with app.connection_for_write() as reconnected:  # a new connection, a new channel and QoS
        other = reconnected.default_channel
        assert other.qos is not channel.qos
        reconnected.Producer(other).publish({"n": 1}, routing_key=queue)
        second = other.basic_get(queue, no_ack=False)
        second.ack()
        assert not get_redis().hexists(other.qos.unacked_key, first.delivery_tag)
        assert not get_redis().hexists(other.qos.unacked_key, second.delivery_tag)


def test_a_forked_child_does_not_retry_the_parent_s_failed_acks(monkeypatch):
    from common import celery_transport
    from tests.common.test_redis_breaker import forked_child_says

    monkeypatch.setattr(celery_transport, "_unremoved", [("parent-tag", 0.0)])
    assert forked_child_says(lambda: celery_transport._unremoved == [])
    assert celery_transport._unremoved == [("parent-tag", 0.0)]
