"""`/v2/webhooks`: integrations manage their own endpoints and see only their own events (another
integration's endpoint is a 404, never a 403), ops see all; the secret is shown once; rotation
signs with both secrets for a day; a test event; the attempt log; SSRF refusals."""
from __future__ import annotations

import ipaddress
import socket
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from notifications.egress import address_allowed
from notifications.models import OutboxEvent, WebhookAttempt, WebhookEndpoint, WebhookMessage
from tests.api import assert_error, client_for
from tests.factories import IntegrationUserFactory, OpsUserFactory
from tests.notifications.receiver import Answer
from tests.notifications.webhook_helpers import delivery_walk, endpoint_via_api, sweep

pytestmark = pytest.mark.django_db(transaction=True)


def test_creating_an_endpoint_shows_the_secret_once(receiver):
    merchant = IntegrationUserFactory()
    response = client_for(merchant).post(
        "/v2/webhooks", {"url": receiver.url, "events": ["delivery.assigned"], "description": "orders"}, format="json"
    )
    assert response.status_code == 201
    body = response.json()
    assert body["events"] == ["delivery.assigned"] and body["active"] is True and body["allDeliveries"] is False
    assert body["secret"].startswith("whsec_")
    shown = client_for(merchant).get(f"/v2/webhooks/{body['id']}").json()
    assert "secret" not in shown and shown["url"] == receiver.url
    listed = client_for(merchant).get("/v2/webhooks").json()
    assert [w["id"] for w in listed["webhooks"]] == [body["id"]] and listed["next"] is None


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "http://example.com/h", "events": []}, "events"),
    ({"url": "http://example.com/h", "events": ["delivery.teleported"]}, "events"),
    ({"url": "http://example.com/h", "events": "*"}, "events"),
    ({"url": "ftp://example.com/h", "events": ["*"]}, "url"),
    ({"url": "http://user:pw@example.com/h", "events": ["*"]}, "url"),
    ({"url": "not a url", "events": ["*"]}, "url"),
    ({"url": "http://ex ample.com/h", "events": ["*"]}, "url"),
    ({"url": "http://example.com:0/h", "events": ["*"]}, "url"),
    ({"url": "http://exa<mple.com/h", "events": ["*"]}, "url"),
    ({"url": 12, "events": ["*"]}, "url"),
    ({"events": ["*"]}, "url"),
    # accepted, and then never deliverable (retried for a day) or sent elsewhere
    ({"url": "http://example.com/x\r\nX-Injected: 1", "events": ["*"]}, "url"),
    ({"url": "http://example.com/a b", "events": ["*"]}, "url"),
    ({"url": "http://example.com/a\tb", "events": ["*"]}, "url"),
    ({"url": "http://example.com/caf\u00e9", "events": ["*"]}, "url"),
    ({"url": "http://@example.com/h", "events": ["*"]}, "url"),
    ({"url": "http://:@example.com/h", "events": ["*"]}, "url"),
    ({"url": "http://example.com/h", "events": ["*"], "description": "a\u0001b\u001bc"}, "description"),
])
def test_bad_endpoint_input_is_a_400_naming_the_field(db, body, field):
    response = client_for(IntegrationUserFactory()).post("/v2/webhooks", body, format="json")
    assert field in assert_error(response, 400)["details"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/h", "http://localhost/h", "http://10.1.2.3/h", "http://169.254.169.254/latest/meta-data",
    "http://[::1]/h", "http://192.168.0.10/h", "http://[::ffff:127.0.0.1]/h", "http://100.64.0.1/h",
    # Loopback as a resolver also reads it: short, decimal, hex, octal, zero-padded, a trailing dot.
    "http://0/h", "http://127.1/h", "http://2130706433/h", "http://0x7f000001/h", "http://017700000001/h",
    "http://0177.0.0.1/h", "http://127.000.000.001/h", "http://localhost./h", "http://0xa9.254.169.254/h",
    # Full-width forms (a resolver folds them), and IPv4 inside IPv6: compatible, NAT64, 6to4.
    "http://１２７.０.０.１/h", "http://ｌｏｃａｌｈｏｓｔ/h", "http://[::127.0.0.1]/h", "http://[64:ff9b::7f00:1]/h",
    "http://[2002:7f00:1::1]/h", "http://[64:ff9b::a9fe:a9fe]/h",
    # IPv4-translated (SIIT) and a network's local NAT64 prefix
    "http://[::ffff:0:7f00:1]/h", "http://[64:ff9b:1::7f00:1]/h", "http://[64:ff9b:1::5db8:d822]/h",
])
def test_private_targets_are_refused_when_the_endpoint_is_made(db, settings, url):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    response = client_for(IntegrationUserFactory()).post("/v2/webhooks", {"url": url, "events": ["*"]}, format="json")
    assert "url" in assert_error(response, 400)["details"]


def test_a_name_that_resolves_to_a_private_address_is_refused_at_send_time(receiver, settings, monkeypatch):
    """The name passes when the endpoint is made; at send time it resolves to loopback, and
    nothing is sent (the attempt says why)."""
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    merchant = IntegrationUserFactory()
    port = receiver.server.server_address[1]
    name = _a_name_for_this_machine()
    endpoint_id, _ = endpoint_via_api(merchant, f"http://{name}:{port}/hooks", events=["delivery.assigned"])
    delivery_walk(merchant, steps=())
    assert receiver.requests == []
    (attempt,) = WebhookAttempt.objects.filter(endpoint_id=endpoint_id)
    assert attempt.status_code is None and "refused" in attempt.error and name in attempt.error
    # the owner reads the error: it names no address, and says the same of a name that does not
    # resolve (else an integration maps the network's internal names and addresses)
    assert "127." not in attempt.error and "::1" not in attempt.error
    missing, real = "no-such-host.invalid", socket.getaddrinfo

    def lookup(host, *args, **kwargs):  # (no name server asked: NXDOMAIN as the resolver says it)
        if host == missing:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    other_id, _ = endpoint_via_api(merchant, f"http://{missing}:{port}/hooks", events=["delivery.assigned"])
    delivery_walk(merchant, steps=())
    (other,) = WebhookAttempt.objects.filter(endpoint_id=other_id)
    assert other.error.replace(missing, "NAME") == attempt.error.replace(name, "NAME")


def _a_name_for_this_machine() -> str:
    """A host name (not "localhost") that resolves to this machine: its own name, or one of
    /etc/hosts' loopback aliases."""
    for name in (socket.gethostname(), "vm", "runsc", "localhost.localdomain", "ip6-localhost"):
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
        except socket.gaierror:
            continue
        if addresses and not any(address_allowed_public(a) for a in addresses):
            return name
    raise AssertionError("no host name of this machine resolves to a private address")


def address_allowed_public(address: str) -> bool:
    return ipaddress.ip_address(address).is_global


def test_a_target_that_turned_private_is_refused_at_send_time(receiver, settings):
    merchant = IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    delivery_walk(merchant, steps=())
    assert receiver.requests == []
    assert "refused" in WebhookAttempt.objects.get(endpoint_id=endpoint_id).error


@pytest.mark.parametrize(("address", "allowed"), [
    ("93.184.216.34", True), ("2606:2800:220:1:248:1893:25c8:1946", True), ("127.0.0.1", False), ("10.0.0.1", False),
    ("172.16.5.4", False), ("192.168.1.1", False), ("169.254.169.254", False), ("::1", False), ("fe80::1", False),
    ("fc00::1", False), ("::ffff:10.0.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("100.64.0.1", False),
    ("::ffff:0:a00:1", False), ("::ffff:0:5db8:d822", True), ("64:ff9b:1::a00:1", False), ("64:ff9b::5db8:d822", True),
])
def test_which_addresses_are_public(settings, address, allowed):
    """(IPv4 inside IPv6 is judged as the IPv4 address; a local NAT64 prefix is never public.)"""
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    assert address_allowed(address) is allowed


def test_an_integration_cannot_see_or_manage_another_integrations_endpoints(receiver):
    alice, bob = IntegrationUserFactory(), IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(alice, receiver.url)
    as_bob = client_for(bob)
    for method, path, body in [
        ("get", f"/v2/webhooks/{endpoint_id}", None),
        ("patch", f"/v2/webhooks/{endpoint_id}", {"active": False}),
        ("delete", f"/v2/webhooks/{endpoint_id}", None),
        ("post", f"/v2/webhooks/{endpoint_id}/rotate-secret", None),
        ("post", f"/v2/webhooks/{endpoint_id}/test", None),
        ("get", f"/v2/webhooks/{endpoint_id}/attempts", None),
    ]:
        assert_error(getattr(as_bob, method)(path, body, format="json"), 404)
    assert as_bob.get("/v2/webhooks").json()["webhooks"] == []
    assert WebhookEndpoint.objects.get(pk=endpoint_id).active
    # ops see and manage all
    ops = client_for(OpsUserFactory())
    assert [w["id"] for w in ops.get("/v2/webhooks").json()["webhooks"]] == [endpoint_id]
    assert ops.patch(f"/v2/webhooks/{endpoint_id}", {"description": "checked by ops"}, format="json").status_code == 200


def test_an_integration_gets_only_its_own_deliveries_events_and_ops_get_all(receiver):
    alice, bob = IntegrationUserFactory(), IntegrationUserFactory()
    endpoint_via_api(alice, receiver.url + "/alice", events=["delivery.assigned"])
    endpoint_via_api(OpsUserFactory(), receiver.url + "/ops", events=["delivery.assigned"])
    alices, _ = delivery_walk(alice, steps=())
    bobs, _ = delivery_walk(bob, steps=())
    by_path = {}
    for r in receiver.requests:
        by_path.setdefault(r.path, []).append(r.json()["data"]["id"])
    assert by_path["/hooks/alice"] == [str(alices.pk)]
    assert sorted(by_path["/hooks/ops"]) == sorted([str(alices.pk), str(bobs.pk)])


def test_a_drivers_token_cannot_use_webhooks(driver_client):
    assert_error(driver_client.get("/v2/webhooks"), 403)


def test_an_endpoint_is_switched_off_and_on_and_what_waited_goes_out(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, secret = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    api = client_for(merchant)
    assert api.patch(f"/v2/webhooks/{endpoint_id}", {"active": False}, format="json").json()["active"] is False
    delivery_walk(merchant, steps=())
    assert receiver.requests == []
    on = api.patch(f"/v2/webhooks/{endpoint_id}", {"active": True, "events": ["*"]}, format="json")
    assert on.status_code == 200 and on.json()["events"] == ["*"]
    assert [r.verified(secret)["type"] for r in receiver.requests] == ["delivery.assigned"]


def test_active_true_on_a_failing_endpoint_clears_its_record_and_retries_now(receiver):
    """The receiver was fixed: `active: true` on an endpoint that is on but failing did nothing
    (the failure record stayed, the event waited for its backoff)."""
    merchant = IntegrationUserFactory()
    endpoint_id, secret = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    receiver.answer(Answer(503))
    delivery_walk(merchant, steps=())
    assert [r.status_code for r in WebhookAttempt.objects.all()] == [503]
    assert WebhookEndpoint.objects.get(pk=endpoint_id).failing_since is not None

    on = client_for(merchant).patch(f"/v2/webhooks/{endpoint_id}", {"active": True}, format="json")

    assert on.status_code == 200 and on.json()["failingSince"] is None
    assert [r.status_code for r in WebhookAttempt.objects.order_by("attempted_at")] == [503, 200]
    assert [r.verified(secret)["type"] for r in receiver.requests] == ["delivery.assigned"] * 2


def test_switching_a_failing_endpoint_off_and_on_sends_what_waited_at_once(receiver):
    """Off then on (after an automatic disable, say): the messages kept their backoff, up to
    two hours, though the docs say switching it on sends what waited."""
    merchant = IntegrationUserFactory()
    endpoint_id, secret = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    receiver.answer(Answer(503))
    delivery_walk(merchant, steps=())
    api = client_for(merchant)
    assert api.patch(f"/v2/webhooks/{endpoint_id}", {"active": False}, format="json").status_code == 200
    assert WebhookMessage.objects.get(endpoint_id=endpoint_id).next_attempt_at > timezone.now()  # (its backoff)

    on = api.patch(f"/v2/webhooks/{endpoint_id}", {"active": True}, format="json")

    assert on.status_code == 200 and on.json()["failingSince"] is None
    assert [r.status_code for r in WebhookAttempt.objects.order_by("attempted_at")] == [503, 200]


def test_a_new_url_for_a_failing_endpoint_clears_its_record_and_sends_now(receiver):
    """The usual fix of a wrong URL: the new one waited for the old one's backoff, and the
    failures went on counting towards the automatic disable."""
    merchant = IntegrationUserFactory()
    endpoint_id, secret = endpoint_via_api(merchant, f"{receiver.url}/wrong", events=["delivery.assigned"])
    receiver.answer(Answer(503))
    delivery_walk(merchant, steps=())
    assert WebhookEndpoint.objects.get(pk=endpoint_id).failing_since is not None

    fixed = client_for(merchant).patch(f"/v2/webhooks/{endpoint_id}", {"url": f"{receiver.url}/right"}, format="json")

    assert fixed.status_code == 200 and fixed.json()["failingSince"] is None
    assert [r.path for r in receiver.requests] == ["/hooks/wrong", "/hooks/right"]
    assert [r.status_code for r in WebhookAttempt.objects.order_by("attempted_at")] == [503, 200]


def test_a_change_that_changes_nothing_keeps_updated_at(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(merchant, receiver.url, events=["delivery.assigned"])
    api = client_for(merchant)
    before = api.get(f"/v2/webhooks/{endpoint_id}").json()
    for body in ({}, {"events": ["delivery.assigned"]}, {"url": receiver.url, "active": True}):
        assert api.patch(f"/v2/webhooks/{endpoint_id}", body, format="json").json()["updatedAt"] == before["updatedAt"]
    changed = api.patch(f"/v2/webhooks/{endpoint_id}", {"description": "new"}, format="json").json()
    assert changed["updatedAt"] != before["updatedAt"]


def test_an_endpoint_made_switched_off(receiver):
    """`active` on create was ignored (201 with active true); a string is refused as on PATCH."""
    merchant = IntegrationUserFactory()
    api = client_for(merchant)
    assert_error(api.post("/v2/webhooks", {"url": receiver.url, "events": ["*"], "active": "false"}, format="json"), 400)
    made = api.post("/v2/webhooks", {"url": receiver.url, "events": ["delivery.assigned"], "active": False}, format="json")
    assert made.status_code == 201 and made.json()["active"] is False and made.json()["disabledAt"] is not None
    delivery_walk(merchant, steps=())
    assert receiver.requests == []
    on = api.patch(f"/v2/webhooks/{made.json()['id']}", {"active": True}, format="json")
    assert on.json()["active"] is True and [r.json()["type"] for r in receiver.requests] == ["delivery.assigned"]


def test_deleting_an_endpoint(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(merchant, receiver.url)
    assert client_for(merchant).delete(f"/v2/webhooks/{endpoint_id}").status_code == 204
    assert_error(client_for(merchant).get(f"/v2/webhooks/{endpoint_id}"), 404)


def test_after_a_rotation_both_secrets_sign_for_a_day(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, old = endpoint_via_api(merchant, receiver.url)
    now = timezone.now()
    with time_machine.travel(now, tick=False):
        rotated = client_for(merchant).post(f"/v2/webhooks/{endpoint_id}/rotate-secret")
    assert rotated.status_code == 200
    new = rotated.json()["secret"]
    assert new != old and rotated.json()["previousSecretExpiresAt"]
    shown = client_for(merchant).get(f"/v2/webhooks/{endpoint_id}").json()  # (only the rotate answer had it)
    assert shown["previousSecretExpiresAt"] == rotated.json()["previousSecretExpiresAt"] and "secret" not in shown
    with time_machine.travel(now + timedelta(hours=23), tick=False):
        client_for(merchant).post(f"/v2/webhooks/{endpoint_id}/test")
        (during,) = receiver.requests
        assert during.verified(old) == during.verified(new)
        assert len(during.headers["webhook-signature"].split(" ")) == 2
    with time_machine.travel(now + timedelta(hours=25), tick=False):
        client_for(merchant).post(f"/v2/webhooks/{endpoint_id}/test")
        after = receiver.requests[1]
        assert after.verified(new)["type"] == "webhook.test"
        with pytest.raises(WebhookVerificationError):
            Webhook(old).verify(after.body, after.headers)


def test_a_test_event_and_the_attempt_log(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, secret = endpoint_via_api(merchant, receiver.url)
    receiver.answer(Answer(500))
    queued = client_for(merchant).post(f"/v2/webhooks/{endpoint_id}/test")
    assert queued.status_code == 202
    event_id = queued.json()["eventId"]
    assert event_id.startswith("msg_")
    payload = receiver.requests[0].verified(secret)
    assert payload["id"] == event_id and payload["type"] == "webhook.test" and payload["data"]["endpointId"] == endpoint_id
    log = client_for(merchant).get(f"/v2/webhooks/{endpoint_id}/attempts").json()
    (attempt,) = log["attempts"]
    assert attempt["eventId"] == event_id and attempt["statusCode"] == 500 and attempt["error"] == "HTTP 500"
    assert attempt["nextRetryAt"] and attempt["messageStatus"] == "pending" and attempt["durationMs"] >= 0


def test_a_test_event_to_a_switched_off_endpoint_is_a_conflict(receiver):
    merchant = IntegrationUserFactory()
    endpoint_id, _ = endpoint_via_api(merchant, receiver.url)
    client_for(merchant).patch(f"/v2/webhooks/{endpoint_id}", {"active": False}, format="json")
    assert_error(client_for(merchant).post(f"/v2/webhooks/{endpoint_id}/test"), 409)


def test_an_endpoint_made_later_does_not_get_older_events(receiver):
    merchant = IntegrationUserFactory()
    delivery_walk(merchant, steps=())
    endpoint_via_api(merchant, receiver.url)
    sweep()
    assert receiver.requests == [] and OutboxEvent.objects.exists()


@pytest.mark.parametrize("url", [
    "https://hooks.example.com./h", "http://bücher.example/h", "http://my_hooks.example.com/h",
    "http://[2606:4700::1111]:8443/h", "http://8.8.8.8/h", "http://deadbeef.example/h",
])
def test_public_names_and_addresses_in_their_usual_forms_are_accepted(db, settings, url):
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    response = client_for(IntegrationUserFactory()).post("/v2/webhooks", {"url": url, "events": ["*"]}, format="json")
    assert response.status_code == 201, response.content


def test_a_host_name_in_another_script_is_kept_in_its_ascii_form_a_uri(db, settings):
    """Stored as given, `https://exämple.example/` was shown back as an IRI: `format: uri` in the
    schema refused our own answer. The name a resolver looks up is the IDNA one."""
    settings.WEBHOOK_ALLOW_PRIVATE_TARGETS = False
    client = client_for(IntegrationUserFactory())
    made = client.post("/v2/webhooks", {"url": "https://Exämple.example:8443/h?q=1", "events": ["*"]}, format="json")
    assert made.status_code == 201, made.content
    assert made.json()["url"] == "https://xn--exmple-cua.example:8443/h?q=1"
    assert client.get(f"/v2/webhooks/{made.json()['id']}").json()["url"] == "https://xn--exmple-cua.example:8443/h?q=1"
    changed = client.patch(f"/v2/webhooks/{made.json()['id']}", {"url": "http://ＢÜＣＨＥＲ.example./"}, format="json")
    assert changed.status_code == 200 and changed.json()["url"] == "http://xn--bcher-kva.example./"
    # as browsers and resolvers read it (IDNA 2008, UTS 46), not as Python's IDNA 2003 codec: fass.de
    german = client.patch(f"/v2/webhooks/{made.json()['id']}", {"url": "https://faß.example/"}, format="json")
    assert german.status_code == 200 and german.json()["url"] == "https://xn--fa-hia.example/"
    # a symbol IDNA 2008 refuses: not a new URL; one stored before still sends as it did
    assert "url" in assert_error(client.post("/v2/webhooks", {"url": "https://☃.example/h", "events": ["*"]}, format="json"), 400)["details"]
    from notifications.egress import url_check

    assert url_check("https://☃.example/h")[1] == "☃.example"

    fragment = client.post("/v2/webhooks", {"url": "https://example.com/h#é", "events": ["*"]}, format="json")
    assert "url" in assert_error(fragment, 400)["details"]
    host = ".".join(["é"] * 30) + ".example"  # 67 characters, 248 in ASCII form (xn--9ca. × 30)
    long_name = client.post("/v2/webhooks", {"url": f"https://{host}/" + "a" * (2000 - 9 - len(host)), "events": ["*"]},
                            format="json")  # (2,000 characters as given: too long for the column in ASCII form)
    assert "ASCII form" in assert_error(long_name, 400)["details"]["url"][0]


def test_the_migration_writes_the_hosts_stored_before_in_ascii_form_and_leaves_what_idna_2008_refuses(db):
    from importlib import import_module

    from django.apps import apps

    migration = import_module("notifications.migrations.0015_webhook_endpoint_ascii_hosts")
    owner = IntegrationUserFactory()
    stored = {
        "https://Exämple.example:8443/h?q=ä#frag": "https://xn--exmple-cua.example:8443/h?q=ä#frag",
        "https://faß.example/": "https://xn--fa-hia.example/",
        "https://☃.example/h": "https://☃.example/h",  # (IDNA 2008 refuses it: the sender reads it as before)
        "https://example.com/é": "https://example.com/é",  # (the host is ASCII already)
        "https://plain.example/h": "https://plain.example/h",
    }
    made = {url: WebhookEndpoint.objects.create(owner=owner, url=url, events=["*"], secret="s", created_at=timezone.now(),
                                               updated_at=timezone.now()).pk for url in stored}

    migration.rewrite(apps, None)

    assert {url: WebhookEndpoint.objects.get(pk=pk).url for url, pk in made.items()} == stored


def test_a_huge_events_list_is_refused_by_its_length_in_a_short_answer(db):
    """Each item was checked (and reported) before the list's length: a 3.9 MB error body."""
    response = client_for(IntegrationUserFactory()).post(
        "/v2/webhooks", {"url": "http://example.com/h", "events": ["x"] * 50_000}, format="json")

    assert "events" in assert_error(response, 400)["details"] and len(response.content) < 2000


def test_an_account_has_at_most_the_set_number_of_endpoints(settings):
    """Each event is one message per endpoint: a fuzzer's 850 ops endpoints made 4 million
    messages in 15 minutes."""
    settings.WEBHOOK_MAX_ENDPOINTS_PER_OWNER = 3
    merchant, other = IntegrationUserFactory(), IntegrationUserFactory()
    api = client_for(merchant)
    made = [api.post("/v2/webhooks", {"url": f"https://h{n}.example.com/hook", "events": ["*"]}, format="json")
            for n in range(4)]

    assert [r.status_code for r in made] == [201, 201, 201, 409]
    assert "at most 3 webhook endpoints" in assert_error(made[3], 409)["message"]
    assert WebhookEndpoint.objects.filter(owner=merchant).count() == 3
    assert client_for(other).post("/v2/webhooks", {"url": "https://o.example.com/hook", "events": ["*"]},
                                  format="json").status_code == 201  # per account
    assert api.delete(f"/v2/webhooks/{made[0].json()['id']}").status_code == 204
    assert api.post("/v2/webhooks", {"url": "https://h9.example.com/hook", "events": ["*"]}, format="json").status_code == 201


def test_two_creates_at_the_cap_make_one_endpoint(settings):
    from common.exceptions import Conflict
    from notifications import services
    from tests.concurrency import race

    settings.WEBHOOK_MAX_ENDPOINTS_PER_OWNER = 2
    merchant = IntegrationUserFactory()
    services.endpoint_create(owner=merchant, all_deliveries=False, url="https://first.example.com/h", events=["*"])

    made, errors = race([
        lambda n=n: services.endpoint_create(owner=merchant, all_deliveries=False, url=f"https://r{n}.example.com/h",
                                             events=["*"])
        for n in range(4)
    ])

    assert len(made) == 1 and len(errors) == 3 and all(isinstance(e, Conflict) for e in errors)
    assert WebhookEndpoint.objects.filter(owner=merchant).count() == 2


def test_a_fan_out_writes_a_bounded_number_of_messages_a_transaction(monkeypatch, no_worker):
    """500 events to 850 endpoints were 425,000 rows in one transaction; an endpoint's delete waited."""
    from notifications import services
    from notifications.models import WebhookMessage

    monkeypatch.setattr(services, "FAN_OUT_MAX_MESSAGES", 12)
    merchant = IntegrationUserFactory()
    for n in range(5):
        services.endpoint_create(owner=merchant, all_deliveries=False, url=f"https://b{n}.example.com/h", events=["*"])
    for _ in range(4):  # each goes to all 5
        OutboxEvent.objects.create(type="delivery.status_changed", owner=merchant, payload={"data": {}},
                                   created_at=timezone.now())
    lone = [services.endpoint_send_test(endpoint_id=WebhookEndpoint.objects.filter(owner=merchant).first().pk)]

    assert services.webhooks_fan_out(now=timezone.now()) == 2  # 10 messages; a third event would make 15
    assert WebhookMessage.objects.count() == 10
    assert services.webhooks_fan_out(now=timezone.now()) == 3 and len(lone) == 1  # 10 + the test event's 1
    assert services.webhooks_fan_out(now=timezone.now()) == 0
    assert OutboxEvent.objects.filter(fanned_out_at__isnull=True).count() == 0
    assert WebhookMessage.objects.count() == 21
