"""Operator API authentication: `Authorization: Bearer <api token>`."""

from django.utils import timezone
from rest_framework import authentication, exceptions

from hadash.models import ApiToken


class BearerTokenAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <token>'")
        try:
            key = header[1].decode()
        except UnicodeError:
            raise exceptions.AuthenticationFailed("Invalid token") from None
        token = (
            ApiToken.objects.select_related("user").filter(key_hash=ApiToken.hash(key)).first()
        )
        if token is None or not token.user.is_active:
            raise exceptions.AuthenticationFailed("Invalid or revoked API token")
        ApiToken.objects.filter(pk=token.pk).update(last_used=timezone.now())
        return (token.user, token)

    def authenticate_header(self, request):
        return self.keyword
