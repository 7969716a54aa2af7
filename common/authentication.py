from rest_framework.authentication import TokenAuthentication as _TokenAuthentication
from rest_framework.authtoken.models import Token
from rest_framework.exceptions import AuthenticationFailed


class TokenAuthentication(_TokenAuthentication):
    """DRF's token auth, loading the token, its user and the user's driver in one query
    (every driver request needs the driver; the location endpoint is the hottest path)."""

    model = Token

    def authenticate_credentials(self, key):
        token = Token.objects.select_related("user", "user__driver").filter(key=key).first()
        if token is None:
            raise AuthenticationFailed("Invalid token.")
        if not token.user.is_active:
            raise AuthenticationFailed("User inactive or deleted.")
        return token.user, token
