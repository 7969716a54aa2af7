"""Token login at `/v2/auth/token` (SPEC "Wire conventions")."""
from __future__ import annotations

from tests.factories import UserFactory
from tests.wire import assert_error_body


def test_a_correct_username_and_password_get_the_users_token(anon, db):
    user = UserFactory(username="dana")

    r = anon.post("/v2/auth/token", {"username": "dana", "password": "pw-123456"}, format="json")

    assert r.status_code == 200
    assert r.json() == {"token": user.auth_token.key}


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
