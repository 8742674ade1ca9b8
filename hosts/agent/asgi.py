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

daphne itself receives a whole request before it calls the application. The rules that
need no database — the length, a missing or non-Bearer ``Authorization``, the join key
anywhere but ``connect`` — are :func:`early_refusal`, a pure function of the path and
headers that an HTTP server can apply as soon as the headers have arrived (and that
AgentGate applies first); whether a token belongs to a host needs the database, so
AgentGate checks that next.
"""

from __future__ import annotations

import json

from . import dbpool
from .auth import bearer, host_for_token, is_join_key
from .validation import MAX_BODY_BYTES
from .views import SCOPE_HOST

PREFIX = "/api/agent/v1/"
CONNECT = PREFIX + "connect"


async def _answer(send, status: int, message: str, **headers: str) -> None:
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _lookup(token: str):
    return host_for_token(token)


UNAUTHORIZED = {"WWW_Authenticate": 'Bearer realm="hadash-agent"'}


def early_refusal(path: str, headers, *, method: str = "POST") -> tuple[int, str] | None:
    """``(status, message)`` when an agent request must be refused from its request
    line and headers alone (no database, no body), else None. ``headers``: (name,
    value) pairs, str or bytes, names in any case. Only ``POST /api/agent/v1/…``."""
    if method != "POST" or not path.startswith(PREFIX):
        return None
    pairs = [(_text(k).lower(), _text(v)) for k, v in headers]
    values = dict(pairs)
    raw_length = values.get("content-length")
    if raw_length is not None and raw_length.strip():
        if not raw_length.strip().isdigit():
            return 400, f"Content-Length must be a number of bytes, not {raw_length[:40]!r}"
        if int(raw_length) > MAX_BODY_BYTES:
            return 413, (f"report too large: {int(raw_length)} bytes, the limit is "
                         f"{MAX_BODY_BYTES} bytes (4 MiB)")
    token = bearer(values)  # a mapping with lower-case names
    if token is None:
        return 401, ("missing credentials: send Authorization: Bearer <host token> (or, to "
                     "enrol on connect, Bearer <join key>)")
    if path != CONNECT and is_join_key(token):
        return 401, "the join key only enrols (connect): send Authorization: Bearer <host token>"
    return None


def _text(value) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


# The middleware an agent's answer goes through (hosts.agent.asgi.agent_handler): the
# ones that set its headers (nosniff, referrer and opener policies, CSP, X-Frame-Options).
# Sessions, CSRF (the views are exempt), authentication, messages and login throttling
# have nothing to do with an agent, and each costs a request two hops to a thread.
AGENT_MIDDLEWARE = (
    "django.middleware.security.SecurityMiddleware",
    "csp.middleware.CSPMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
)


def agent_handler():
    """Django's ASGI handler for the agent endpoints: the same URLs and views, with only
    AGENT_MIDDLEWARE of settings.MIDDLEWARE (issue 12: a fleet connecting at once made
    the web process CPU-bound, a good part of it in the middleware's thread hops)."""
    from django.conf import settings
    from django.core.handlers.asgi import ASGIHandler

    class AgentHandler(ASGIHandler):
        def load_middleware(self, is_async=False):
            full = settings.MIDDLEWARE
            settings.MIDDLEWARE = [m for m in full if m in AGENT_MIDDLEWARE]
            try:
                super().load_middleware(is_async=is_async)
            finally:
                settings.MIDDLEWARE = full

    return AgentHandler()


class AgentGate:
    def __init__(self, app, prefix: str = PREFIX, agent_app=None):
        self.app = app
        self.prefix = prefix
        # Where the agent requests that pass go (agent_handler()); default: app.
        self.agent_app = agent_app or app

    async def __call__(self, scope, receive, send):
        if (
            scope.get("type") != "http"
            or not scope.get("path", "").startswith(self.prefix)
            or scope.get("method") != "POST"
        ):
            return await self.app(scope, receive, send)
        refusal = early_refusal(scope["path"], scope.get("headers") or [])
        if refusal is not None:
            status, message = refusal
            return await _answer(send, status, message,
                                 **(UNAUTHORIZED if status == 401 else {}))
        token = bearer(scope.get("headers") or [])
        if not (scope["path"] == CONNECT and is_join_key(token)):
            # In the agent protocol's own threads, on their long-lived connections
            # (hosts.agent.dbpool): not a new connection per request.
            host = await dbpool.run(_lookup, token)
            if host is None:
                what = "invalid join key or host token" if scope["path"] == CONNECT \
                    else "invalid host token"
                return await _answer(send, 401, what, **UNAUTHORIZED)
            scope = {**scope, SCOPE_HOST: host}
        return await self.agent_app(scope, _limited(receive), send)


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
