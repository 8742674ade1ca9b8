"""ASGI gate for the operator API (issue 8, part 4: unauthenticated bodies are refused
by their Content-Length before being read).

Django's ASGI handler reads a request's whole body before any view runs, so the view
layer (hadash.api.views.ApiView.initial) can refuse a request only after that.
:class:`ApiGate` wraps the HTTP application and, for a request under ``/api/v1/`` that
carries a body, answers from the headers alone — without receiving a byte of it:

* the header rules of :func:`hadash.api.guard.early_refusal` (no database): a
  Content-Length that is not a number → 400, a chunked body → 411, over
  ``MAX_BODY_BYTES`` → 413, no credentials at all → 401;
* credentials that are not valid — an API token that is unknown, revoked or whose user
  is inactive; a session cookie without a logged-in, active user → 401.

Requests without a body, other paths, websockets and lifespan pass through untouched
(DRF authenticates those, and it reads no body either). It is the operator-API twin of
``hosts.agent.asgi.AgentGate``; the two compose: ``AgentGate(ApiGate(django_app))``.

An HTTP server that hands the application a request only once it has read all of it
(daphne does) can apply :func:`hadash.api.guard.early_refusal` itself as soon as the
headers have arrived.
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async

from . import guard


def _text(value) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


async def _answer(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _has_session(cookie_header: str, cookie_name: str) -> str | None:
    for part in cookie_header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == cookie_name and value:
            return value
    return None


def credentials_problem(headers: list[tuple[str, str]]) -> str | None:
    """Why the request's credentials are not valid, or None when they are (database)."""
    from django.conf import settings
    from django.contrib.auth import get_user
    from django.http import HttpRequest

    from hadash.models import ApiToken

    values = {k.lower(): v for k, v in headers}
    authorization = values.get("authorization")
    if authorization is not None:
        parts = authorization.split()
        if len(parts) != 2 or parts[0].lower() != "bearer":
            return "Authorization header must be 'Bearer <token>'"
        token = (ApiToken.objects.select_related("user")
                 .filter(key_hash=ApiToken.hash(parts[1])).first())
        if token is None or not token.user.is_active:
            return "Invalid or revoked API token"
        return None
    session_key = _has_session(values.get("cookie", ""), settings.SESSION_COOKIE_NAME)
    if session_key is None:
        return "Authentication credentials were not provided."
    from importlib import import_module

    request = HttpRequest()
    request.session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    user = get_user(request)
    if not (user.is_authenticated and user.is_active):
        return "the session is not logged in"
    return None


class ApiGate:
    def __init__(self, app, prefix: str = guard.API_PREFIX):
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or not scope.get("path", "").startswith(self.prefix):
            return await self.app(scope, receive, send)
        from django.conf import settings

        headers = [(_text(k), _text(v)) for k, v in scope.get("headers") or []]
        refusal = guard.early_refusal(scope["path"], headers,
                                      session_cookie=settings.SESSION_COOKIE_NAME)
        if refusal is not None:
            return await _answer(send, *refusal)
        if guard.has_body(headers):
            problem = await database_sync_to_async(credentials_problem)(headers)
            if problem is not None:
                return await _answer(send, 401, problem)
        return await self.app(scope, receive, send)
