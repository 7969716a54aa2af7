"""A request through the web process (config.asgi) leaves no reference cycles behind.

An object in a reference cycle is not freed when its request ends but waits for the garbage
collector, and counts towards the next young collection all that time (bench/README.md: young
collections of up to 170 ms with 45,000 cyclic objects in one). Measured under a real uvicorn
(bench/README.md, "cyclic garbage per request"): Django's ASGI handler left ~100 objects per
request in cycles (its disconnect listener's RequestAborted, whose traceback holds the handler's
frame, which holds the task, which holds the exception), and a token API request 80-170 (the
DRF view, its response and request; the authenticated user and its driver; the serializer and
its fields). These tests count what the collector finds after N requests with the collector
off, against a bound well under one object per request for the lean path.

The requests are driven with a plain ASGI receive/send (an ASGI test client leaves cycles of
its own). Database connection wrappers are not counted: Django makes one per thread or
context and it is a cycle of its own when that ends (under a real server, Django's full stack
makes one a request: 15 objects; see bench/README.md)."""
import asyncio
import gc

import pytest
from asgiref.sync import async_to_sync
from django.db.backends.base.base import BaseDatabaseWrapper

from config.asgi import application, django_asgi_app
from tests.api import token_for
from tests.factories import DriverFactory
from tests.wire import http_scope

pytestmark = pytest.mark.django_db(transaction=True)

REQUESTS = 20


async def _get(app, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    scope = http_scope("GET", path, [(b"host", b"testserver"), *headers], port=40000)
    answered = asyncio.Event()
    requested = False
    status = []

    async def receive():
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await answered.wait()  # as a server does: the disconnect once the response is out
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
        elif not message.get("more_body", False):
            answered.set()

    await app(scope, receive, send)
    return status[0]


def cyclic_objects_per_request(app, path: str, headers=()) -> float:
    """Objects the collector finds unreachable after REQUESTS requests, per request (after
    three requests that fill the caches)."""

    async def run(n: int) -> set[int]:
        return {await _get(app, path, list(headers)) for _ in range(n)}

    assert async_to_sync(run)(3) == {200}
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        statuses = async_to_sync(run)(REQUESTS)
        gc.collect()
        found = _not_of_a_database_connection(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert statuses == {200}
    return found / REQUESTS


def _not_of_a_database_connection(garbage: list) -> int:
    """How many of the collector's finds are not a database connection's wrapper (Django's:
    it and its parts hold each other) or held by one only: one is left whenever the thread or
    context that held it ends, an earlier test's thread too."""
    inside = {id(o) for o in garbage}
    todo = [o for o in garbage if isinstance(o, BaseDatabaseWrapper)]
    held = {id(o) for o in todo}
    while todo:
        for o in gc.get_referents(todo.pop()):
            if id(o) in inside and id(o) not in held:
                held.add(id(o))
                todo.append(o)
    return len(garbage) - len(held)


def test_the_harness_itself_leaves_no_cycles():
    async def plain(scope, receive, send):
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    assert cyclic_objects_per_request(plain, "/") == 0


def test_a_request_through_djangos_full_stack_leaves_no_cycles():
    # /health/: the full middleware stack, a query and a Redis PING. Before: 96 objects a
    # request (the RequestAborted cycle with the whole request hanging off it; then the lazy
    # user's closure and the messages storage, each holding the request: 40).
    assert cyclic_objects_per_request(django_asgi_app, "/health/") < 1


@pytest.mark.parametrize("path, bound", [
    ("/v2/drivers/{id}", 1),  # before: 174 objects a request
    ("/v2/drivers/{id}/offers", 15),  # before: 122; left: the serializer of its query (13)
])
def test_a_token_api_request_leaves_no_cycles_but_its_query_serializer(path, bound):
    driver = DriverFactory()
    auth = [(b"authorization", f"Token {token_for(driver.user)}".encode())]
    assert cyclic_objects_per_request(application, path.format(id=driver.pk), auth) < bound


def test_a_client_gone_before_the_response_still_cancels_the_request(monkeypatch):
    """DjangoHandler's disconnect listener returns where Django's raises: the request is
    cancelled all the same (if a Django upgrade made `handle` tell the two apart, this fails)."""
    started, cancelled = asyncio.Event(), []

    async def never_answers(self, request):
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(request.path)
            raise

    monkeypatch.setattr(type(django_asgi_app), "get_response_async", never_answers)

    async def go():
        scope = http_scope("GET", "/health/", [(b"host", b"testserver")], port=40000)
        messages = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive():
            if messages:
                return messages.pop()
            await started.wait()
            return {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        await asyncio.wait_for(django_asgi_app(scope, receive, send), 30)  # (a guard: it returns at once)
        return sent

    assert async_to_sync(go)() == []
    assert cancelled == ["/health/"]


@pytest.mark.parametrize("path, expected", [("/health/", 200), ("/nothing-here", 404), ("/v2/nothing-here", 404)])
def test_a_session_cookie_on_a_page_that_never_reads_the_user_is_no_500(path, expected):
    """The request's release must not evaluate the full stack's lazy session user: from the
    event loop that is a session read, SynchronousOnlyOperation, a 500 for any browser with a
    session cookie (a made-up one or a logged-in console's) on /health/, /metrics, a customer's
    tracking page or any 404."""
    from django.test import Client

    from tests.factories import OpsUserFactory

    browser = Client()
    browser.force_login(OpsUserFactory())
    for cookie in (b"sessionid=made-up-123", f"sessionid={browser.cookies['sessionid'].value}".encode()):
        assert async_to_sync(_get)(application, path, [(b"cookie", cookie)]) == expected, cookie
