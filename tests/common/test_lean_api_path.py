"""Token-authenticated API requests take the lean middleware stack under ASGI (config/asgi.py):
the same answer as the full stack, without its per-middleware thread hops."""
import asyncio
import threading
import time

import httpx
import pytest
from prometheus_client import REGISTRY
from asgiref.sync import SyncToAsync, async_to_sync
from django.core import signals

from config.asgi import ApiSplit, LeanApiHandler, application, django_asgi_app
from tests.factories import DriverFactory
from tests.api import token_for
from tests.wire import http_scope

pytestmark = pytest.mark.django_db(transaction=True)

HEADERS = ("content-type", "x-content-type-options", "x-frame-options", "referrer-policy", "cross-origin-opener-policy")


def get(app, path, headers):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.get(path, headers=headers)

    return async_to_sync(go)()


@pytest.fixture
def hops(monkeypatch):
    """How many times a request crossed from the event loop into a thread."""
    counted = []
    original = SyncToAsync.__call__

    async def counting(self, *args, **kwargs):
        counted.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    monkeypatch.setattr(SyncToAsync, "__call__", counting)
    return counted


def test_a_token_request_gets_the_same_answer_from_the_lean_stack():
    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}
    lean, full = get(application, path, auth), get(django_asgi_app, path, auth)
    assert (lean.status_code, lean.json()) == (full.status_code, full.json()) == (200, full.json())
    assert {h: lean.headers.get(h) for h in HEADERS} == {h: full.headers.get(h) for h in HEADERS}
    bad = get(application, path, {"Authorization": "Token nope"})
    assert bad.status_code == 401 and bad.json()["error"] == "Unauthorized"


def test_behind_https_the_lean_stack_sends_hsts_and_only_over_https(settings):
    """SECURE_HSTS_SECONDS from the environment (`manage.py check --deploy`): the lean stack
    gives it as Django's SecurityMiddleware does on the full stack (which reads the setting once,
    when it is built), on a request that came over HTTPS only."""
    settings.SECURE_HSTS_SECONDS, settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = 31536000, True
    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}

    async def over(scheme, app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=f"{scheme}://testserver") as client:
            return (await client.get(path, headers=auth)).headers.get("strict-transport-security")

    assert async_to_sync(over)("https", application) == "max-age=31536000; includeSubDomains"
    assert async_to_sync(over)("http", application) is None


def test_a_lean_request_runs_on_one_thread_start_to_end_where_the_full_stack_hops_per_step(hops):
    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}
    threads = []

    def record(**kwargs):
        threads.append(threading.get_ident())

    signals.request_started.connect(record, weak=False, dispatch_uid="test-one-hop-start")
    signals.request_finished.connect(record, weak=False, dispatch_uid="test-one-hop-end")
    try:
        response = get(application, path, auth)
    finally:
        signals.request_started.disconnect(dispatch_uid="test-one-hop-start")
        signals.request_finished.disconnect(dispatch_uid="test-one-hop-end")
    assert response.status_code == 200
    # request_started, the view and request_finished on one thread, entered once, not via sync_to_async
    assert hops == [] and len(threads) == 2 and len(set(threads)) == 1 and threads[0] != threading.get_ident()
    get(django_asgi_app, path, auth)
    full = [h for h in hops if "signal" not in h.lower() and "close_old_connections" not in h]
    # Django's handler: the DRF view, its render and its close, each a hop of its own, plus the middlewares'.
    assert {"View.as_view.<locals>.view", "SimpleTemplateResponse.render", "HttpResponseBase.close"} <= set(full)
    assert len(full) >= 6, full


def test_only_token_requests_to_the_api_take_the_lean_stack():
    seen = []

    def app(name):
        async def call(scope, receive, send):
            seen.append(name)
        return call

    split = ApiSplit(app("full"), app("lean"))
    for path, headers in [
        ("/v2/drivers", [(b"authorization", b"Token abc")]),
        ("/v2/drivers", [(b"authorization", b"token abc")]),
        ("/v2/drivers", [(b"cookie", b"sessionid=x")]),
        ("/admin/", [(b"authorization", b"Token abc")]),
        ("/v2/drivers", [(b"authorization", b"Basic abc")]),
    ]:
        async_to_sync(split)({"type": "http", "path": path, "headers": headers}, None, None)
    assert seen == ["lean", "lean", "full", "full", "full"]



@pytest.fixture
def request_threads():
    """The thread each request's sync code ran on (request_started is its first call there)."""
    seen = []

    def record(**kwargs):
        seen.append(threading.get_ident())

    signals.request_started.connect(record, weak=False, dispatch_uid="test-request-threads")
    yield seen
    signals.request_started.disconnect(dispatch_uid="test-request-threads")


def get_together(app, requests):
    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await asyncio.gather(*(client.get(path, headers=headers) for path, headers in requests))

    return async_to_sync(go)()


def test_token_requests_one_after_another_reuse_one_request_thread_and_leave_no_connection_open(request_threads):
    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}
    handler = LeanApiHandler()
    for _ in range(3):
        response = get(handler, path, auth)
        assert response.status_code == 200 and response.json()["id"] == str(driver.pk)
    assert len(request_threads) == 3 and len(set(request_threads)) == 1  # one thread, not one per request
    assert len(handler._idle) == 1

    def connection_closed():
        from django.db import connection

        return connection.connection is None

    # What Django does after each request on its thread (request_finished) still happens.
    assert handler._idle[0].submit(connection_closed).result()


def test_token_requests_in_flight_together_each_run_on_a_thread_of_their_own(request_threads, settings):
    settings.API_REQUEST_CONCURRENCY = 0
    a, b = DriverFactory(), DriverFactory()
    both_started = threading.Barrier(2, timeout=30)

    def wait_for_the_other(**kwargs):
        both_started.wait()  # two requests on one thread would never both get here

    signals.request_started.connect(wait_for_the_other, weak=False, dispatch_uid="test-both-started")
    try:
        handler = LeanApiHandler()
        responses = get_together(handler, [
            (f"/v2/drivers/{d.pk}", {"Authorization": f"Token {token_for(d.user)}"}) for d in (a, b)
        ])
    finally:
        signals.request_started.disconnect(dispatch_uid="test-both-started")
    assert [r.status_code for r in responses] == [200, 200]
    assert [r.json()["id"] for r in responses] == [str(a.pk), str(b.pk)]
    assert len(set(request_threads)) == 2
    assert len(handler._idle) == 2  # both handed back for the next requests


def test_at_most_idle_executors_are_kept(monkeypatch, settings):
    settings.API_REQUEST_CONCURRENCY = 0
    driver = DriverFactory()
    monkeypatch.setattr(LeanApiHandler, "IDLE_EXECUTORS", 1)
    handler = LeanApiHandler()
    auth = {"Authorization": f"Token {token_for(driver.user)}"}
    all_started = threading.Barrier(3, timeout=30)
    signals.request_started.connect(lambda **kw: all_started.wait(), weak=False, dispatch_uid="test-all-started")
    try:
        responses = get_together(handler, [(f"/v2/drivers/{driver.pk}", auth)] * 3)  # three executors at once
    finally:
        signals.request_started.disconnect(dispatch_uid="test-all-started")
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert len(handler._idle) == 1  # the other two were shut down


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.002)


@pytest.mark.parametrize("limit", [1, 2])
def test_at_most_api_request_concurrency_requests_run_at_once_the_others_wait_their_turn_in_order(settings, limit):
    settings.API_REQUEST_CONCURRENCY = limit
    waited_before = REGISTRY.get_sample_value("api_request_queue_wait_seconds_count", {"lane": "api"}) or 0
    drivers = DriverFactory.create_batch(limit + 2)
    handler = LeanApiHandler()
    started, running, most = [], [0], [0]
    lock = threading.Lock()
    all_in = threading.Barrier(limit, timeout=30)

    def on_start(scope, **kwargs):
        with lock:
            started.append(scope["path"].rsplit("/", 1)[1])
            running[0] += 1
            most[0] = max(most[0], running[0])
            first_ones = len(started) <= limit
        if first_ones:
            all_in.wait()  # the first `limit` are all running at once, and stay until the others queue up
            slots = next(iter(handler._slots.values()), {}).get("api")
            assert slots is not None, "no limit on requests at once"
            wait_until(lambda: len(slots._waiters or ()) == 2, "the other two requests wait for a slot")
            assert len(started) == limit  # ... and neither has started

    def on_finish(**kwargs):
        with lock:
            running[0] -= 1

    signals.request_started.connect(on_start, weak=False, dispatch_uid="test-limit-start")
    signals.request_finished.connect(on_finish, weak=False, dispatch_uid="test-limit-finish")
    try:
        responses = get_together(handler, [
            (f"/v2/drivers/{d.pk}", {"Authorization": f"Token {token_for(d.user)}"}) for d in drivers
        ])
    finally:
        signals.request_started.disconnect(dispatch_uid="test-limit-start")
        signals.request_finished.disconnect(dispatch_uid="test-limit-finish")
    assert [r.status_code for r in responses] == [200] * len(drivers)
    assert [r.json()["id"] for r in responses] == [str(d.pk) for d in drivers]
    assert most[0] == limit
    assert REGISTRY.get_sample_value("api_request_queue_wait_seconds_count", {"lane": "api"}) - waited_before == 2  # the two that waited
    ids = [str(d.pk) for d in drivers]
    assert sorted(started[:limit]) == sorted(ids[:limit]) and sorted(started[limit:]) == sorted(ids[limit:])
    if limit == 1:
        assert started == ids  # first come, first served


def asgi_get(path: str, token: str) -> dict:
    return http_scope("GET", path, [(b"host", b"testserver"), (b"authorization", f"Token {token}".encode())])


class Client:
    """One ASGI request's client side: its body, then a disconnect when `leave()` is called (or
    after the response, as servers say); what the app sent."""

    def __init__(self):
        self.left, self.sent, self.body_given = asyncio.Event(), [], False

    async def receive(self):
        if not self.body_given:
            self.body_given = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.left.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    def status(self):
        return next((m["status"] for m in self.sent if m["type"] == "http.response.start"), None)


def test_a_request_whose_client_leaves_while_it_waits_never_runs(settings):
    settings.API_REQUEST_CONCURRENCY = 1
    first, second = DriverFactory(), DriverFactory()
    handler = LeanApiHandler()
    started = []
    abandoned_before = REGISTRY.get_sample_value("api_requests_abandoned_total", {"lane": "api"}) or 0

    async def scenario():
        loop = asyncio.get_running_loop()
        a, b = Client(), Client()
        b_done = threading.Event()

        def on_start(scope, **kwargs):
            started.append(scope["path"])
            if len(started) == 1:  # the first holds its slot until the second waited and gave up
                slots = handler._slots[loop]["api"]
                wait_until(lambda: len(slots._waiters or ()) == 1, "the second request waits")
                loop.call_soon_threadsafe(b.left.set)
                assert b_done.wait(10), "the second request did not give up"

        async def run_b():
            await handler(asgi_get(f"/v2/drivers/{second.pk}", token_for(second.user)), b.receive, b.send)
            b_done.set()

        signals.request_started.connect(on_start, weak=False, dispatch_uid="test-leave-start")
        try:
            task_a = asyncio.ensure_future(handler(asgi_get(f"/v2/drivers/{first.pk}", token_for(first.user)), a.receive, a.send))
            await asyncio.sleep(0)  # the first takes the slot
            await asyncio.gather(task_a, run_b())
        finally:
            signals.request_started.disconnect(dispatch_uid="test-leave-start")
        return a, b, handler._slots[loop]["api"]

    a, b, slots = async_to_sync(scenario)()
    assert a.status() == 200
    assert b.sent == [] and started == [f"/v2/drivers/{first.pk}"]  # the second never ran
    assert slots._value == 1 and not slots._waiters  # and holds no slot
    assert REGISTRY.get_sample_value("api_requests_abandoned_total", {"lane": "api"}) - abandoned_before == 1


def test_a_request_gives_its_slot_back_before_its_response_is_sent(settings):
    """A slow reader of a response does not hold up the next request."""
    settings.API_REQUEST_CONCURRENCY = 1
    first, second = DriverFactory(), DriverFactory()
    handler = LeanApiHandler()

    async def scenario():
        a, b = Client(), Client()
        sending = asyncio.Event()
        b_done = asyncio.Event()

        async def slow_send(message):  # the first client reads its response only once the second has its own
            a.sent.append(message)
            if message["type"] == "http.response.start":
                sending.set()
                await b_done.wait()

        async def run_b():
            await sending.wait()
            await handler(asgi_get(f"/v2/drivers/{second.pk}", token_for(second.user)), b.receive, b.send)
            b_done.set()

        await asyncio.wait_for(asyncio.gather(
            handler(asgi_get(f"/v2/drivers/{first.pk}", token_for(first.user)), a.receive, slow_send), run_b(),
        ), timeout=30)
        return a, b

    a, b = async_to_sync(scenario)()
    assert (a.status(), b.status()) == (200, 200)


def test_a_request_that_fails_gives_its_slot_back(settings, monkeypatch):
    settings.API_REQUEST_CONCURRENCY = 1
    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}
    handler = LeanApiHandler()
    original = handler.get_response
    calls = []

    def fail_once(request):
        calls.append(request.path)
        if len(calls) == 1:
            raise RuntimeError("the request's thread failed")
        return original(request)

    monkeypatch.setattr(handler, "get_response", fail_once)
    with pytest.raises(RuntimeError):
        get(handler, path, auth)
    response = get(handler, path, auth)
    assert response.status_code == 200 and len(calls) == 2


def test_a_lean_requests_events_go_out_on_the_servers_loop_before_its_response(monkeypatch):
    """The request thread is not a sync_to_async thread: its on-commit events are sent on the
    loop serving it (not the process's spare sender loop), and are out before the response."""
    from channels.testing import WebsocketCommunicator

    import common.broadcast

    def no_sender_loop():
        raise AssertionError("a request's events went to the spare sender loop")

    monkeypatch.setattr(common.broadcast, "_sender_loop", no_sender_loop)
    driver = DriverFactory(availability="available")
    auth = {"Authorization": f"Token {token_for(driver.user)}"}

    async def scenario():
        sock = WebsocketCommunicator(application, f"/ws/drivers/{driver.pk}/?token={token_for(driver.user)}")
        assert (await sock.connect())[0]
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            response = await client.post(f"/v2/drivers/{driver.pk}/availability/take-break",
                                         json={"durationMinutes": 15, "reason": "lunch_break"}, headers=auth)
        assert response.status_code == 200, response.text
        event = await sock.receive_json_from(timeout=5)
        assert (event["type"], event["fromState"], event["toState"]) == ("availability_changed", "available", "on_break")
        await sock.disconnect()

    async_to_sync(scenario)()


def test_a_lean_request_runs_in_a_copy_of_the_loops_context_and_leaves_nothing_on_its_thread():
    import contextvars

    probe = contextvars.ContextVar("probe", default="unset")
    seen = []

    def record(**kwargs):
        seen.append(probe.get())
        probe.set("set by the request")  # must not reach the next request on this thread

    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}
    handler = LeanApiHandler()

    async def two_requests():
        probe.set("from the loop")
        transport = httpx.ASGITransport(app=handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            first = await client.get(path, headers=auth)
            probe.set("later on the loop")
            second = await client.get(path, headers=auth)
        return first, second, probe.get()

    signals.request_started.connect(record, weak=False, dispatch_uid="test-context-probe")
    try:
        first, second, after = async_to_sync(two_requests)()
    finally:
        signals.request_started.disconnect(dispatch_uid="test-context-probe")
    assert (first.status_code, second.status_code) == (200, 200)
    assert seen == ["from the loop", "later on the loop"] and after == "later on the loop"
    assert len(handler._idle) == 1  # both ran on the one borrowed thread


def test_a_proof_upload_waits_in_a_lane_of_its_own_not_in_the_apis(settings):
    """Uploads waiting for a decode slot, or decoding, held the API's turns: one driver's burst
    of large photos held up every other API call of the process."""
    import uuid

    settings.API_REQUEST_CONCURRENCY = 1
    settings.PROOF_UPLOAD_CONCURRENCY = 1
    driver, other = DriverFactory(), DriverFactory()
    handler = LeanApiHandler()
    upload_path = f"/v2/drivers/{driver.pk}/deliveries/{uuid.uuid4()}/proof"
    uploading, release = threading.Event(), threading.Event()

    def on_start(scope, **kwargs):
        if scope["path"] == upload_path:
            uploading.set()
            assert release.wait(10), "never released"

    async def scenario():
        loop = asyncio.get_running_loop()
        up, down = Client(), Client()
        upload = asyncio.ensure_future(handler(
            http_scope("POST", upload_path, [(b"host", b"testserver"), (b"authorization", f"Token {token_for(driver.user)}".encode())]),
            up.receive, up.send))
        await loop.run_in_executor(None, uploading.wait, 10)
        try:  # the upload runs, holding its lane's one turn: an API call still gets the API's
            await asyncio.wait_for(handler(asgi_get(f"/v2/drivers/{other.pk}", token_for(other.user)), down.receive, down.send), 10)
            lanes = handler._slots[loop]
            return down.status(), lanes["upload"].locked(), lanes["api"].locked()
        finally:
            release.set()
            await upload

    signals.request_started.connect(on_start, weak=False, dispatch_uid="test-upload-lane")
    try:
        status, upload_lane_full, api_lane_full = async_to_sync(scenario)()
    finally:
        signals.request_started.disconnect(dispatch_uid="test-upload-lane")
    assert status == 200 and upload_lane_full and not api_lane_full


def test_a_freed_upload_turn_goes_to_another_driver_before_the_rest_of_one_drivers_burst(settings):
    """The upload lane is fair among callers (common.lanes.FairLane): first come first served,
    one driver's burst of photos took every turn and another driver's one photo waited behind
    the whole burst (3.2 s seen). A driver alone still gets every turn."""
    import uuid

    settings.PROOF_UPLOAD_CONCURRENCY = 2
    burst, other = DriverFactory(), DriverFactory()
    handler = LeanApiHandler()
    senders = {"a1": burst, "a2": burst, "a3": burst, "b1": other}
    paths = {name: f"/v2/drivers/{driver.pk}/deliveries/{uuid.uuid4()}/proof" for name, driver in senders.items()}
    started = {name: threading.Event() for name in paths}
    release = {name: threading.Event() for name in paths}
    order = []

    def on_start(scope, **kwargs):
        for name, path in paths.items():
            if scope["path"] == path:
                order.append(name)
                started[name].set()
                assert release[name].wait(10), "never released"

    def upload(name):
        client = Client()
        headers = [(b"host", b"testserver"), (b"authorization", f"Token {token_for(senders[name].user)}".encode())]
        return asyncio.ensure_future(handler(http_scope("POST", paths[name], headers), client.receive, client.send))

    async def scenario():
        loop = asyncio.get_running_loop()
        tasks = [upload("a1"), upload("a2")]  # alone: both turns
        assert await loop.run_in_executor(None, lambda: started["a1"].wait(10) and started["a2"].wait(10))
        tasks.append(upload("a3"))
        await asyncio.sleep(0.05)
        tasks.append(upload("b1"))
        await asyncio.sleep(0.05)
        try:
            release["a1"].set()  # a turn comes free: the other driver's, though a3 came first
            assert await loop.run_in_executor(None, lambda: started["b1"].wait(10))
            return list(order)
        finally:
            for event in release.values():
                event.set()
            await asyncio.gather(*tasks)

    uploads_waited = REGISTRY.get_sample_value("api_request_queue_wait_seconds_count", {"lane": "upload"}) or 0
    api_waited = REGISTRY.get_sample_value("api_request_queue_wait_seconds_count", {"lane": "api"}) or 0
    signals.request_started.connect(on_start, weak=False, dispatch_uid="test-upload-fair")
    try:
        seen = async_to_sync(scenario)()
    finally:
        signals.request_started.disconnect(dispatch_uid="test-upload-fair")
    assert seen == ["a1", "a2", "b1"] and order[-1] == "a3"
    # (their waits are the upload lane's, not the API's: seconds each, they would hide its own)
    assert REGISTRY.get_sample_value("api_request_queue_wait_seconds_count", {"lane": "upload"}) - uploads_waited == 2
    assert (REGISTRY.get_sample_value("api_request_queue_wait_seconds_count", {"lane": "api"}) or 0) == api_waited


def test_an_upload_is_seated_as_the_driver_of_its_path_whatever_the_tokens_spelling(settings):
    """The upload lane's caller is the path's driver (the view holds it to its token): keyed on
    the Authorization header, a token's spellings (`token`, `TOKEN`, two spaces) or a driver's
    several logins were callers of their own, each served before a driver already holding a turn."""
    handler = LeanApiHandler()

    async def seats():
        path = "/v2/drivers/d-1/deliveries/x/proof"
        return (handler._slots_of_running_loop("upload", handler.UPLOAD_PATH.fullmatch(path)["driver"]).key,
                handler._slots_of_running_loop("api", None))

    key, api = async_to_sync(seats)()
    assert key == "d-1" and isinstance(api, asyncio.Semaphore)
