from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.authentication import TokenAuthentication as _TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from availability.models import Driver
from common.models import ApiToken
from common.tokens import api_token_expired, token_digest

USER_FIELDS = ("id", "username", "is_active", "is_staff", "is_superuser")
DRIVER_FIELDS = ("id", "user_id", "name", "availability", "vehicle_type")

_SQL = (
    "SELECT t.id, t.expires_at, "
    + ", ".join(f"u.{f}" for f in USER_FIELDS)
    + ", "
    + ", ".join(f"d.{f}" for f in DRIVER_FIELDS)
    # the login's group names too (common.roles reads them from `user._group_names`), so the
    # role checks of an integration cost no second query
    + ", ARRAY(SELECT g.name FROM {groups_table} ug JOIN auth_group g ON g.id = ug.group_id WHERE ug.user_id = u.id)"
    + " FROM common_apitoken t JOIN {user_table} u ON u.id = t.user_id"
    " LEFT JOIN dispatch_driver d ON d.user_id = u.id WHERE t.digest = %s"
)


class TokenAuthentication(_TokenAuthentication):
    """DRF's token auth (`Authorization: Token <key>`) against our hashed tokens
    (common.tokens), in one hand-written query for the token, its user and the user's
    driver. Every request pays for authentication, and on the hottest endpoint (driver
    location) the ORM's compilation of the equivalent select_related cost more than the
    query itself. The models are built with `from_db`, so any field not selected here is
    deferred and loads on first access, exactly as with `.only()`."""

    model = ApiToken

    def authenticate_credentials(self, key):
        User = get_user_model()
        with connection.cursor() as cur:
            cur.execute(_SQL.format(
                user_table=connection.ops.quote_name(User._meta.db_table),
                groups_table=connection.ops.quote_name(User.groups.through._meta.db_table),
            ), [token_digest(key)])
            row = cur.fetchone()
        if row is None:
            raise AuthenticationFailed("Invalid token.")
        *row, group_names = row
        token_id, expires_at = row[0], row[1]
        user_values = row[2 : 2 + len(USER_FIELDS)]
        driver_values = row[2 + len(USER_FIELDS) :]
        user = _from_db(User, USER_FIELDS, user_values)
        user._group_names = set(group_names)
        if not user.is_active:
            raise AuthenticationFailed("User inactive or deleted.")
        if api_token_expired(expires_at):
            raise AuthenticationFailed("Token expired.")
        driver = _from_db(Driver, DRIVER_FIELDS, driver_values) if driver_values[0] else None
        # cache the reverse one-to-one: user.driver answers without a query (None: not a driver)
        user._state.fields_cache["driver"] = driver
        if driver is not None:
            driver._state.fields_cache["user"] = user
        token = ApiToken(id=token_id, expires_at=expires_at, user=user)
        return user, token


def _from_db(model, names, values):
    """`Model.from_db` wants the values in the model's concrete-field order."""
    by_name = dict(zip(names, values))
    ordered = [f.attname for f in model._meta.concrete_fields if f.attname in by_name]
    return model.from_db(connection.alias, ordered, [by_name[n] for n in ordered])
