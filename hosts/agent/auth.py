"""Agent authentication (PROTOCOL.md, Authentication).

An agent presents ``Authorization: Bearer <join key>`` on its first ``connect`` (the
enrolment of a new name: SPEC R29) and ``Authorization: Bearer <host token>`` on
everything after, reconnects included. Host tokens are random (R30); the server stores
only their SHA-256 (``Host.token_hash``, indexed), so a token is looked up by its hash.
Shared by the HTTP views, ``hosts.agent.asgi.AgentGate`` and the websocket consumer.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping

from django.conf import settings

from hosts.models import Host

MAX_TOKEN_LENGTH = 1024  # anything longer is not a token we issued


def _authorization(headers: Mapping | Iterable) -> str | None:
    if isinstance(headers, Mapping):
        # Django's request.headers is case-insensitive; a plain dict may not be.
        value = headers.get("Authorization")
        if value is None:
            value = headers.get("authorization")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        return value
    # ASGI scope["headers"]: an iterable of (name, value) byte pairs, names lower-case.
    for name, value in headers:
        if bytes(name).lower() == b"authorization":
            return bytes(value).decode("latin-1")
    return None


def bearer(request_headers: Mapping | Iterable) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None.

    Accepts Django's ``request.headers`` (or any mapping) or an ASGI
    ``scope["headers"]`` list of byte pairs."""
    value = _authorization(request_headers)
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_LENGTH:
        return None
    return token


def is_join_key(token: str | None) -> bool:
    """Whether ``token`` is the installation's join key (``HADASH_AGENT_KEY``).
    An empty join key lets nobody join."""
    key = getattr(settings, "HADASH_AGENT_KEY", "") or ""
    if not token or not key:
        return False
    return hmac.compare_digest(token.encode(), key.encode())


def host_for_token(token: str | None) -> Host | None:
    """The host whose current token this is, or None."""
    if not token:
        return None
    host = Host.objects.filter(token_hash=Host.hash_token(token)).first()
    if host is None or not host.token_matches(token):
        return None
    return host
