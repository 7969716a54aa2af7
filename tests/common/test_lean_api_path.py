"""Token-authenticated API requests take the lean middleware stack under ASGI (config/asgi.py):
the same answer as the full stack, without its per-middleware thread hops."""
import httpx
import pytest
from asgiref.sync import SyncToAsync, async_to_sync

from config.asgi import ApiSplit, application, django_asgi_app
from tests.factories import DriverFactory
from tests.api import token_for

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


def test_the_lean_stack_hops_into_threads_only_for_the_view_where_the_full_stack_hops_per_middleware(hops):
    driver = DriverFactory()
    path, auth = f"/v2/drivers/{driver.pk}", {"Authorization": f"Token {token_for(driver.user)}"}
    get(application, path, auth)
    lean = [h for h in hops if "signal" not in h.lower() and "close_old_connections" not in h]
    hops.clear()
    get(django_asgi_app, path, auth)
    full = [h for h in hops if "signal" not in h.lower() and "close_old_connections" not in h]
    # The DRF view, and Django's own render and close of its response: nothing per middleware.
    assert sorted(lean) == sorted(["View.as_view.<locals>.view", "SimpleTemplateResponse.render", "HttpResponseBase.close"])
    assert len(full) >= len(lean) + 6, full


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
