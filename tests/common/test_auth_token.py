"""Token login at `/v2/auth/token` (SPEC "Wire conventions") and the hashed tokens behind it
(common/tokens.py): shown once, stored as a hash, revocable, optionally expiring."""
from __future__ import annotations

from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.contrib.admin.sites import site
from django.db import connection
from django.test import override_settings
from django.utils import timezone

from common.models import ApiToken
from common.tokens import api_token_issue, token_digest
from config.asgi import application
from tests.api import assert_error, client_for
from tests.factories import OpsUserFactory, UserFactory
from tests.sockets import refusal
from tests.wire import assert_error_body


def login(anon, username="dana", password="pw-123456"):
    return anon.post("/v2/auth/token", {"username": username, "password": password}, format="json")


def test_a_login_gets_a_new_token_that_only_its_hash_remembers(anon, db):
    user = UserFactory(username="dana")

    r = login(anon)

    assert r.status_code == 200
    key = r.json()["token"]
    assert len(key) == 40
    stored = ApiToken.objects.get(user=user, name="login")
    assert stored.digest == token_digest(key) and stored.prefix == key[:8] and stored.name == "login"
    with connection.cursor() as cur:  # the key is nowhere in the database
        cur.execute("SELECT count(*) FROM common_apitoken WHERE digest = %s OR prefix = %s", [key, key])
        assert cur.fetchone()[0] == 0
    me = client_for()
    me.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert me.get("/v2/deliveries").status_code != 401


@override_settings(API_LOGIN_TOKEN_TTL_SECONDS=3600)
def test_login_tokens_expire_after_the_setting_and_each_login_gets_its_own(anon, db):
    UserFactory(username="dana")
    before = timezone.now()

    first, second = login(anon).json(), login(anon).json()

    assert first["token"] != second["token"]
    expires = ApiToken.objects.get(digest=token_digest(first["token"])).expires_at
    assert timedelta(seconds=3599) < expires - before < timedelta(seconds=3601)
    assert first["expiresAt"].startswith(expires.strftime("%Y-%m-%dT%H:%M"))


@override_settings(API_LOGIN_TOKEN_TTL_SECONDS=0)
def test_a_zero_ttl_means_login_tokens_never_expire(anon, db):
    UserFactory(username="dana")
    body = login(anon).json()
    assert body["expiresAt"] is None
    assert ApiToken.objects.get(digest=token_digest(body["token"])).expires_at is None


def test_an_expired_token_is_a_401_and_a_login_prunes_it(anon, db):
    user = OpsUserFactory(username="dana")
    key, token = api_token_issue(user, ttl=timedelta(hours=1))
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    client = client_for()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")

    assert_error(client.get("/v2/deliveries"), 401)

    login(anon)
    assert not ApiToken.objects.filter(pk=token.pk).exists()


def test_an_expired_token_cannot_open_a_socket(db):
    user = OpsUserFactory()
    key, token = api_token_issue(user, ttl=timedelta(hours=1))
    ApiToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    async def go():
        return await refusal(WebsocketCommunicator(application, f"/ws/ops/?token={key}"))

    assert async_to_sync(go)() == 4401


def test_delete_revokes_the_token_it_was_sent_with_only(anon, db):
    user = OpsUserFactory(username="dana")
    one, other = login(anon).json()["token"], login(anon).json()["token"]
    client = client_for()
    client.credentials(HTTP_AUTHORIZATION=f"Token {one}")

    assert client.delete("/v2/auth/token").status_code == 204

    assert_error(client.get("/v2/deliveries"), 401)
    client.credentials(HTTP_AUTHORIZATION=f"Token {other}")
    assert client.get("/v2/deliveries").status_code == 200
    assert ApiToken.objects.filter(user=user, name="login").count() == 1


def test_delete_without_a_token_is_a_401(anon, db):
    assert_error(anon.delete("/v2/auth/token"), 401)


def test_the_token_admin_shows_a_new_key_once_and_stores_its_hash(client, db):
    staff = OpsUserFactory(is_superuser=True)
    owner = UserFactory(username="courier-app")
    client.force_login(staff)

    r = client.post("/admin/common/apitoken/add/", {"user": owner.pk, "name": "courier app", "expires_at_0": "", "expires_at_1": ""}, follow=True)

    assert r.status_code == 200
    token = ApiToken.objects.get(user=owner, name="courier app")
    shown = [str(m) for m in r.context["messages"] if "not shown again" in str(m)]
    assert len(shown) == 1
    key = shown[0].split(": ", 1)[1].split(".", 1)[0]
    assert token_digest(key) == token.digest
    page = client.get(f"/admin/common/apitoken/{token.pk}/change/").content.decode()
    assert key not in page and token.digest not in page  # never shown again
    assert site.is_registered(ApiToken)


def test_plain_text_tokens_from_before_hashing_keep_working(db):
    """The migration (common/migrations/0002_apitoken.py) hashes DRF's authtoken rows in place."""
    from importlib import import_module

    user = OpsUserFactory()
    old_key = "0123456789abcdef0123456789abcdef01234567"
    with connection.cursor() as cur:
        cur.execute("CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, created timestamptz NOT NULL, user_id uuid NOT NULL)")
        cur.execute("INSERT INTO authtoken_token VALUES (%s, now(), %s)", [old_key, user.pk])
        cur.execute(import_module("common.migrations.0002_apitoken").HASH_EXISTING)
        cur.execute("SELECT to_regclass('authtoken_token')")
        assert cur.fetchone()[0] is None  # the plain-text table is gone

    migrated = ApiToken.objects.get(user=user, name="migrated")
    assert (migrated.name, migrated.prefix, migrated.digest) == ("migrated", old_key[:8], token_digest(old_key))
    client = client_for()
    client.credentials(HTTP_AUTHORIZATION=f"Token {old_key}")
    assert client.get("/v2/deliveries").status_code == 200


def test_a_wrong_password_is_a_401_in_the_error_body(anon, db):
    UserFactory(username="dana")

    r = anon.post("/v2/auth/token", {"username": "dana", "password": "wrong"}, format="json")

    body = assert_error_body(r, 401, path="/v2/auth/token")
    assert body["message"] == "Invalid username or password."
    assert "token" not in body


def test_an_inactive_users_correct_password_is_a_401(anon, db):
    UserFactory(username="gone", is_active=False)

    r = anon.post("/v2/auth/token", {"username": "gone", "password": "pw-123456"}, format="json")

    assert_error_body(r, 401, path="/v2/auth/token")


def test_a_token_request_without_credentials_is_a_400_naming_both_fields(anon, db):
    r = anon.post("/v2/auth/token", {}, format="json")

    body = assert_error_body(r, 400, path="/v2/auth/token")
    assert body["details"] == {"username": ["This field is required."], "password": ["This field is required."]}

