"""ASGI gate for the agent protocol's HTTP endpoints (issue 8, item 4; SPEC R31).

Django's ASGI handler reads a request's whole body before any view runs, so a view
cannot refuse a request "before its body is read". :class:`AgentGate` wraps the HTTP
application and, for ``POST /api/agent/v1/…``, answers from the headers alone:

* a ``Content-Length`` over the protocol's limit → ``413`` (JSON), body unread;
* no ``Authorization: Bearer …``, or one that is neither the join key (``connect``
  only) nor a host's current token → ``401`` (JSON, ``WWW-Authenticate``), body
  unread;
* a body without ``Content-Length`` (chunked) is counted as it arrives and cut off
  (the request is treated as abandoned) once past the limit.

A request that passes goes on to Django with the host found put in the scope
(``hosts.agent.views.SCOPE_HOST``), so the view does not look the token up again.
Everything else (other paths, websockets, lifespan) passes through untouched.

Wire it in ``hadash/asgi.py``: ``"http": AgentGate(django_asgi_app)``.
"""

from __future__ import annotations

import json

from channels.db import database_sync_to_async

from .auth import bearer, host_for_token, is_join_key
from .validation import MAX_BODY_BYTES
from .views import SCOPE_HOST

PREFIX = "/api/agent/v1/"
CONNECT = PREFIX + "connect"


def _header(scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if bytes(key).lower() == name:
            return bytes(value)
    return None


async def _answer(send, status: int, message: str, **headers: str) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _lookup(token: str):
    return host_for_token(token)


class AgentGate:
    def __init__(self, app, prefix: str = PREFIX):
        self.app = app
        self.prefix = prefix

    async def __call__(self, scope, receive, send):
        if (
            scope.get("type") != "http"
            or not scope.get("path", "").startswith(self.prefix)
            or scope.get("method") != "POST"
        ):
            return await self.app(scope, receive, send)
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                size = int(length)
            except ValueError:
                return await _answer(send, 400, "Content-Length is not a number")
            if size > MAX_BODY_BYTES:
                return await _answer(
                    send, 413, f"report too large: {size} bytes, the limit is "
                    f"{MAX_BODY_BYTES} bytes (4 MiB)")
        token = bearer(scope.get("headers") or [])
        if token is None:
            return await _answer(
                send, 401, "missing credentials: send Authorization: Bearer <host token> "
                "(or, to enrol on connect, Bearer <join key>)",
                WWW_Authenticate='Bearer realm="hadash-agent"')
        if not (scope["path"] == CONNECT and is_join_key(token)):
            host = await database_sync_to_async(_lookup)(token)
            if host is None:
                what = "invalid join key or host token" if scope["path"] == CONNECT \
                    else "invalid host token"
                return await _answer(send, 401, what,
                                     WWW_Authenticate='Bearer realm="hadash-agent"')
            scope = {**scope, SCOPE_HOST: host}
        return await self.app(scope, _limited(receive), send)


def _limited(receive):
    """``receive`` that reports a disconnect once more than MAX_BODY_BYTES of body
    arrived (a chunked body has no Content-Length to check first)."""
    seen = 0

    async def wrapped():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body") or b"")
            if seen > MAX_BODY_BYTES + 1:
                return {"type": "http.disconnect"}
        return message

    return wrapped
