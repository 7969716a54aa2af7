"""API tokens for logins (DRF authtoken keys), behind one function so services need not
import the API framework."""
from rest_framework.authtoken.models import Token


def api_token_create(user) -> str:
    """A new API token for `user`; returns its key (shown once)."""
    return Token.objects.create(user=user).key
