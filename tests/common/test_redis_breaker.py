"""A hung Redis is waited for once, not by every call (common.redis.RedisBreaker).

A Redis that accepts connections and never answers (a paused server, a partition, a failover
whose old address drops packets) used to cost every call its whole timeout: a location fix
through the fallback 2.5 s, a delivery create 15 s and more (its after-commit broadcast waited
for the channel layer's socket timeout, its task publish for kombu, which had none).
"""
from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
import redis
from prometheus_client import REGISTRY

from availability.models import Driver
from common import broadcast, redis as common_redis
from common.redis import RedisBreaker, RedisBreakerOpen, breaker, get_redis, redis_address
from config.celery import app as celery_app
from tests.api import client_for
from tests.common.test_celery_worker import sending_to_workers  # noqa: F401 - a fixture
from tests.factories import online_driver

pytestmark = pytest.mark.django_db


class HungRedis:
    """A TCP server that accepts every connection, reads nothing and never answers; counts the
    connections made to it."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.accepted.append(conn)

    @property
    def connections(self) -> int:
        return len(self.accepted)

    def close(self):
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def hung(settings):
    settings.REDIS_SOCKET_TIMEOUT = 0.2
    server = HungRedis()
    yield server
    server.close()
    common_redis._clients.pop(server.url, None)


def open_breaker(address: str) -> None:
    """The process's breaker open for `address`, as two timeouts a while apart would leave it."""
    breaker._open_until[address] = time.monotonic() + 60


def time_out(b: RedisBreaker, clock, *, times: int, apart: float) -> None:
    """`times` timeouts to "a:1", `apart` seconds apart."""
    for _ in range(times):
        b.timed_out("a:1")
        clock.now += apart


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# ------------------------------------------------------------------------------ the breaker
def test_two_timeouts_within_the_window_open_it_then_one_probe_closes_or_reopens_it(settings):
    settings.REDIS_BREAKER_SECONDS, settings.REDIS_BREAKER_TIMEOUTS, settings.REDIS_SOCKET_TIMEOUT = 2.0, 2, 0.5
    clock = Clock()
    b = RedisBreaker(clock=clock)

    b.timed_out("a:1")
    assert b.allow("a:1")  # one slow reply opens nothing
    clock.now += 2.5
    b.timed_out("a:1")
    assert b.allow("a:1")  # the first one is out of the window
    clock.now += 1.0
    b.timed_out("a:1")
    assert not b.allow("a:1") and b.allow("b:2")  # open, per server
    with pytest.raises(RedisBreakerOpen):
        b.check("a:1")
    assert issubclass(RedisBreakerOpen, redis.exceptions.ConnectionError)  # what callers degrade on
    clock.now += 1.0
    b.timed_out("a:1")  # a call sent before it opened, timing out now: not a new failure
    clock.now += 1.0
    assert not b.is_open("a:1")  # the spell is over; asking this takes no probe
    assert b.allow("a:1")  # open for 2 s from the opening, not extended: this call is the probe
    assert not b.allow("a:1") and b.is_open("a:1")  # the others wait for the probe
    b.timed_out("a:1")  # the probe timed out: open again at once
    assert not b.allow("a:1")
    clock.now += 2.0
    assert b.allow("a:1")  # the next probe
    b.succeeded("a:1")  # answered: closed
    assert b.allow("a:1") and b.allow("a:1")
    b.timed_out("a:1")
    assert b.allow("a:1")  # closed: two needed again


def test_timeouts_of_one_stall_count_once(settings):
    """A single slow reply times out every call in flight at once: one stall, not a hang."""
    settings.REDIS_BREAKER_SECONDS, settings.REDIS_BREAKER_TIMEOUTS, settings.REDIS_SOCKET_TIMEOUT = 2.0, 2, 0.5
    clock = Clock()
    b = RedisBreaker(clock=clock)
    time_out(b, clock, times=10, apart=0.01)
    assert b.allow("a:1")
    clock.now += 0.5  # the next call, sent after the stall, times out too
    b.timed_out("a:1")
    assert not b.allow("a:1")


def test_a_wait_for_a_free_pooled_connection_is_not_a_redis_timeout():
    """redis-py raises ConnectionError("No connection available.") from the pool's wait: load,
    not a silent Redis."""
    assert not common_redis.is_timeout(caused(redis.exceptions.ConnectionError("No connection available."), TimeoutError()))
    assert common_redis.is_timeout(redis.exceptions.TimeoutError("Timeout reading from socket"))
    assert common_redis.is_timeout(caused(RuntimeError("kombu's wrapper"), redis.exceptions.TimeoutError("Timeout reading")))


def caused(exc: BaseException, cause: BaseException) -> BaseException:
    """`exc` raised from `cause`."""
    exc.__cause__ = cause
    return exc


def test_zero_seconds_turns_it_off(settings):
    settings.REDIS_BREAKER_SECONDS = 0
    clock = Clock()
    b = RedisBreaker(clock=clock)
    time_out(b, clock, times=5, apart=1.0)
    assert b.allow("a:1")


# ------------------------------------------------------------------------------ clients
def test_the_client_waits_for_a_hung_redis_twice_then_fails_at_once_without_connecting(hung):
    client = get_redis(hung.url)
    for _ in range(2):
        with pytest.raises(redis.exceptions.TimeoutError):
            client.ping()
    made = hung.connections
    for _ in range(20):
        with pytest.raises(RedisBreakerOpen):
            client.ping()
    assert hung.connections == made
    assert get_redis().ping()  # the other server is not concerned


def test_after_the_open_spell_one_call_probes_and_an_answer_closes_it(settings):
    """With the breaker open for the test Redis (which answers), the first call after the spell
    goes through and closes it; during the spell none is made."""
    address = redis_address(settings.REDIS_URL)
    client = get_redis()
    client.ping()
    open_breaker(address)
    with pytest.raises(RedisBreakerOpen):
        client.ping()
    connections = client.connection_pool._created_connections
    with pytest.raises(RedisBreakerOpen):
        client.pipeline().get("x").execute()
    assert client.connection_pool._created_connections == connections  # nothing taken from the pool
    breaker._open_until[address] = 0.0  # the spell is over
    assert client.ping()  # the probe
    assert breaker.allow(address) and breaker.allow(address)  # closed by its answer


def test_fixes_during_a_hang_wait_once_then_go_to_postgres_without_touching_redis(hung, settings):
    driver = online_driver()
    token = client_for(driver.user)
    settings.REDIS_URL = hung.url
    for n in range(1, 5):
        response = token.post(f"/v2/drivers/{driver.pk}/location", {"lat": 12.9 + n / 100, "lon": 77.6}, format="json")
        assert response.status_code == 200 and response.json()["accepted"] is True
        assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == round(12.9 + n / 100, 5)
        if n == 1:
            made = hung.connections
            assert breaker.is_open(redis_address(hung.url))
    assert hung.connections == made  # the three later fixes never tried the hung Redis


@pytest.mark.django_db(transaction=True)  # the ASGI app's threads read the token
def test_the_fast_lane_hands_a_fix_to_the_database_path_at_once_while_the_breaker_is_open(hung, settings):
    from tests.availability.test_location_fastlane import post, recorded, token, url

    driver = online_driver()
    key = token(driver)
    settings.REDIS_URL = hung.url
    open_breaker(redis_address(hung.url))
    response = post(url(driver), {"lat": 12.95, "lon": 77.55, "recordedAt": recorded()}, token=key)
    assert response.status_code == 200 and response.json()["accepted"] is True
    assert round(Driver.objects.get(pk=driver.pk).location.y, 5) == 12.95  # the database path wrote it
    assert hung.connections == 0  # neither the fast lane nor the database path tried Redis


# ------------------------------------------------------------------------------ broadcasts and tasks
def test_a_broadcast_is_skipped_while_the_breaker_is_open_and_sent_after(listen, settings):
    listener = listen("ops")
    address = redis_address(settings.REDIS_URL)
    open_breaker(address)
    broadcast.send_now(["ops"], {"type": "skipped_event"})
    breaker.reset()
    broadcast.send_now(["ops"], {"type": "sent_event"})
    assert [e["type"] for e in listener.drain()] == ["sent_event"]


def test_a_caller_waits_for_a_hanging_send_one_second_and_the_send_goes_on(listen, monkeypatch):
    """A hung Redis held every request's and task's broadcast for the channel layer's 15 s socket
    timeout (an ops offer took 25 s with Redis paused): the caller stops waiting after
    SEND_WAIT_SECONDS; the send is not dropped."""
    listener = listen("ops")
    release = threading.Event()
    send_all = broadcast._send_all

    async def held(entries):
        await asyncio.get_running_loop().run_in_executor(None, release.wait)
        await send_all(entries)

    monkeypatch.setattr(broadcast, "_send_all", held)
    monkeypatch.setattr(broadcast, "SEND_WAIT_SECONDS", 0.05)
    caller = threading.Thread(target=broadcast.send_now, args=(["ops"], {"type": "late_event"}))
    caller.start()
    caller.join(timeout=10)  # a hang detector, not a measurement: it returns after 0.05 s
    try:
        assert not caller.is_alive()
        assert listener.drain() == []
    finally:
        release.set()
    assert [e["type"] for e in listener.drain(timeout=2)] == ["late_event"]


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("live_events_dropped_total", {"reason": reason}) or 0


@pytest.fixture(autouse=True)
def _late_sends_ended():
    """A late send left by a test ends before the next test sends (which would wait behind it)."""
    yield
    no_late_sends()


def no_late_sends() -> int:
    """Wait (5 s at most) for the late sends to end (their done-callbacks run on the loop) and
    forget this thread's last one: the count is per process and the chain per thread. Returns
    how many are still running."""
    deadline = time.monotonic() + 5
    while broadcast._late.count and time.monotonic() < deadline:
        time.sleep(0.01)
    broadcast._local.tail = broadcast._local.queued = None
    return broadcast._late.count


def held_sends(monkeypatch, holding=lambda entries: True) -> tuple[threading.Event, list]:
    """The sends `holding` picks wait for the returned event to be set (a slow Redis), and
    callers wait 0.05 s for their send; the list gets each send's event types."""
    assert no_late_sends() == 0
    release, sends = threading.Event(), []
    send_all = broadcast._send_all

    async def held(entries):
        sends.append([event["type"] for _, event in entries])
        if holding(entries):
            await asyncio.get_running_loop().run_in_executor(None, release.wait)
        await send_all(entries)

    monkeypatch.setattr(broadcast, "_send_all", held)
    monkeypatch.setattr(broadcast, "SEND_WAIT_SECONDS", 0.05)
    return release, sends


def test_a_thread_s_sends_behind_a_late_one_wait_in_one_batch_and_keep_their_order(listen, monkeypatch):
    """A send not waited for could be overtaken by the thread's next one (the fix consumer: an
    older position after a newer one on the customer's map); and the caller does not wait."""
    listener = listen("ops")
    release, sends = held_sends(monkeypatch, holding=lambda entries: entries[0][1]["type"] == "first_event")
    broadcast.send_now(["ops"], {"type": "first_event"})  # late: goes on without the caller
    try:
        monkeypatch.setattr(broadcast, "SEND_WAIT_SECONDS", 2)  # a caller that waited: 2 s each, then late
        for n in range(5):
            broadcast.send_now(["ops"], {"type": f"next_{n}"})
        assert listener.drain() == []  # they wait for the first
        assert broadcast._late.count == 2  # the late one and one batch behind it
    finally:
        release.set()
    assert [e["type"] for e in listener.drain(timeout=2)] == ["first_event"] + [f"next_{n}" for n in range(5)]
    assert sends == [["first_event"], [f"next_{n}" for n in range(5)]]


def test_events_past_the_limit_behind_a_late_send_are_skipped_and_counted(listen, monkeypatch):
    listener = listen("ops")
    release, _ = held_sends(monkeypatch, holding=lambda entries: entries[0][1]["type"] == "first_event")
    monkeypatch.setattr(broadcast, "MAX_QUEUED_EVENTS", 3)
    skipped_before = dropped("backlog")
    broadcast.send_now(["ops"], {"type": "first_event"})
    try:
        for n in range(4):
            broadcast.send_now(["ops"], {"type": f"next_{n}"})
        assert dropped("backlog") - skipped_before == 1
    finally:
        release.set()
    assert [e["type"] for e in listener.drain(timeout=2)] == ["first_event", "next_0", "next_1", "next_2"]


def test_at_the_limit_of_late_sends_events_still_join_the_batch_waiting_behind_a_late_one(listen, monkeypatch):
    """Joining a batch adds no send to the loop: at the limit, a thread's events were skipped
    that could have ridden along with the batch already waiting."""
    listener = listen("ops")
    release, sends = held_sends(monkeypatch, holding=lambda entries: entries[0][1]["type"] == "first_event")
    monkeypatch.setattr(broadcast, "MAX_LATE_SENDS", 2)
    skipped_before = dropped("backlog")
    broadcast.send_now(["ops"], {"type": "first_event"})  # late: one
    try:
        for n in range(3):  # the first starts the batch behind it (two: the limit), the rest join it
            broadcast.send_now(["ops"], {"type": f"next_{n}"})
        assert broadcast._late.count == 2
        assert dropped("backlog") == skipped_before
    finally:
        release.set()
    assert [e["type"] for e in listener.drain(timeout=2)] == ["first_event", "next_0", "next_1", "next_2"]
    assert sends == [["first_event"], ["next_0", "next_1", "next_2"]]


def test_past_the_limit_of_late_sends_a_send_is_skipped_and_counted(listen, monkeypatch):
    """While Redis is slow but answering (no timeout for the breaker), every request left one
    more send on the loop, without bound."""
    listener = listen("ops")
    release, _ = held_sends(monkeypatch)
    monkeypatch.setattr(broadcast, "MAX_LATE_SENDS", 2)
    skipped_before = dropped("backlog")
    callers = [threading.Thread(target=broadcast.send_now, args=(["ops"], {"type": f"late_{n}"})) for n in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(timeout=10)
    try:
        broadcast.send_now(["ops", "driver.x"], {"type": "skipped_event"})
        assert dropped("backlog") - skipped_before == 2  # one event, two groups
    finally:
        release.set()
    assert sorted(e["type"] for e in listener.drain(timeout=2)) == ["late_0", "late_1"]
    deadline = time.monotonic() + 5  # a hang detector: the late sends' callbacks run at once
    while broadcast._late.count and time.monotonic() < deadline:
        time.sleep(0.01)
    broadcast.send_now(["ops"], {"type": "sent_event"})
    assert [e["type"] for e in listener.drain()] == ["sent_event"]
    assert dropped("backlog") - skipped_before == 2


def test_a_broadcast_skipped_or_failed_is_counted(listen, settings, monkeypatch):
    address = redis_address(settings.REDIS_URL)
    unavailable_before, failed_before = dropped("redis_unavailable"), dropped("send_failed")
    open_breaker(address)
    broadcast.send_now(["ops", "driver.x"], {"type": "skipped_event"})
    breaker.reset()

    async def refused(self, batches):
        raise redis.ConnectionError("refused")

    from common.channels import CoalescingPubSubChannelLayer
    monkeypatch.setattr(CoalescingPubSubChannelLayer, "group_send_many", refused)
    broadcast.send_many([(["ops"], {"type": "a"}), (["ops", "driver.x"], {"type": "b"})])

    assert dropped("redis_unavailable") - unavailable_before == 2
    assert dropped("send_failed") - failed_before == 3


def test_a_task_is_not_published_while_the_breaker_is_open_for_the_broker(sending_to_workers, django_capture_on_commit_callbacks):  # noqa: F811
    address = redis_address(celery_app.conf.broker_url)
    open_breaker(address)
    with django_capture_on_commit_callbacks(execute=True):
        broadcast.enqueue_task_on_commit("offers.expire_overdue_offers")
    breaker.reset()
    assert get_redis().llen("timers") == 0
    with django_capture_on_commit_callbacks(execute=True):
        broadcast.enqueue_task_on_commit("offers.expire_overdue_offers", countdown=0)
    assert get_redis().llen("timers") == 1


def test_after_the_open_spell_one_publish_is_the_probe_and_its_answer_closes_the_breaker(sending_to_workers):  # noqa: F811
    """Publishes asked only `is_open`: when the spell ended every publish of the moment went out
    and waited for a Redis still hung; now one is the probe, as for the other clients."""
    address = redis_address(celery_app.conf.broker_url)
    open_breaker(address)
    breaker._open_until[address] = 0.0  # the spell is over
    assert breaker.allow(address)  # another caller took the probe
    assert broadcast.publish("offers.expire_overdue_offers", countdown=0) is False

    breaker.reset()
    open_breaker(address)
    breaker._open_until[address] = 0.0
    assert broadcast.publish("offers.expire_overdue_offers", countdown=0) is True  # the probe
    assert address not in breaker._open_until and breaker.allow(address)


def test_a_publish_to_a_hung_broker_gives_up_after_its_socket_timeout(hung, sending_to_workers):  # noqa: F811
    """kombu's Redis transport waits forever unless given a socket timeout
    (CELERY_BROKER_TRANSPORT_OPTIONS, above its consumers' 1 s BRPOP)."""
    options = celery_app.conf.broker_transport_options
    assert options["socket_timeout"] > 1 and options["socket_connect_timeout"] > 0
    outcome = []

    def publish():
        celery_app.conf.broker_transport_options = {**options, "socket_timeout": 0.3, "socket_connect_timeout": 0.3}
        try:
            with celery_app.connection_for_write(hung.url) as conn:
                celery_app.send_task("offers.expire_overdue_offers", connection=conn, retry=False)
        except Exception as exc:  # noqa: BLE001 - what the publish raised
            outcome.append(exc)
        finally:
            celery_app.conf.broker_transport_options = options

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the publish to a hung broker is still waiting"
    assert outcome and common_redis.is_timeout(outcome[0]), outcome


def test_a_publish_to_a_hung_broker_counts_each_attempt_and_opens_the_breaker(hung, sending_to_workers):  # noqa: F811
    """Each timed-out attempt of a publish (its retry policy's errback) counts: one publish of
    two attempts opens the breaker, so the request's next publishes are skipped, not waited for."""
    options, url = celery_app.conf.broker_transport_options, celery_app.conf.broker_url
    outcome = []

    def publish():
        celery_app.conf.broker_transport_options = {**options, "socket_timeout": 0.3, "socket_connect_timeout": 0.3}
        celery_app.conf.broker_url = hung.url
        try:
            with celery_app.connection_for_write() as conn:  # the app's retry policy applies
                outcome.append(broadcast.publish("offers.expire_overdue_offers", connection=conn))
        finally:
            celery_app.conf.broker_transport_options, celery_app.conf.broker_url = options, url

    thread = threading.Thread(target=publish, daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the publish to a hung broker is still waiting"
    assert outcome == [False] and breaker.is_open(redis_address(hung.url))


def test_options_in_the_url_win_as_with_from_url(settings):
    url = settings.REDIS_URL + ("&" if "?" in settings.REDIS_URL else "?") + "socket_timeout=3"
    try:
        client = get_redis(url)
        assert client.ping()
        assert client.connection_pool.connection_kwargs["socket_timeout"] == 3.0
    finally:
        common_redis._clients.pop(url, None)


def forked_child_says(check) -> bool:
    """Run `check()` in a forked child of this process; its answer."""
    pid = os.fork()
    if pid == 0:  # the child: no cleanup of the parent's state (os._exit)
        os._exit(0 if check() else 1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0


def test_a_forked_child_starts_with_no_late_sends(listen, monkeypatch):
    """The child has no loop to finish the parent's late send: its sends would have waited
    behind it for ever."""
    release, _ = held_sends(monkeypatch)
    broadcast.send_now(["ops"], {"type": "first_event"})
    try:
        assert broadcast._late.count == 1 and broadcast._local.tail is not None
        assert forked_child_says(lambda: broadcast._late.count == 0 and getattr(broadcast._local, "tail", None) is None)
    finally:
        release.set()
