"""Agent protocol over HTTP (PROTOCOL.md, agent → server): connect, ping, disconnect.

Async Django views, their database work in hosts.agent.dbpool's threads (each with a
long-lived connection: issue 12); kept lean because every host pings every
``ping.interval``: one indexed token lookup, validation, then the service call. Every request is
authenticated before its body is read and validated in full before the service is
called, so a rejected request (4xx) changes nothing. (Under ASGI, Django reads a body
before any view runs: ``hosts.agent.asgi.AgentGate`` refuses bad credentials and
oversized bodies before that, and hands the host it found on to these views.)

Credentials (PROTOCOL.md v1.1, SPEC R29/R30): the join key enrols new host names only;
a known host reconnects with its own token, which is echoed back, never rotated.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps

from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from hadash import config
from hosts.models import Host

from . import dbpool, service, validation
from .auth import bearer, host_for_token, is_join_key
from .validation import ProtocolError

dbpool.expected(ProtocolError, service.ConnectRefused)
log = logging.getLogger("hadash.agent")

# Where AgentGate leaves the host it found for the request's token (ASGI scope key).
SCOPE_HOST = "hadash.agent.host"


def error(message: str, status: int, **headers: str) -> JsonResponse:
    response = JsonResponse({"error": message}, status=status)
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def unauthorized(message: str) -> JsonResponse:
    return error(message, 401, WWW_Authenticate='Bearer realm="hadash-agent"')


def agent_endpoint(view: Callable) -> Callable:
    """POST only, no CSRF (agents are not browsers), ProtocolError → JSON 4xx.

    The view is async and gets ``db``: how to run its database work (hosts.agent.dbpool:
    under ASGI, in the pool's threads with their long-lived connections)."""

    @csrf_exempt
    @wraps(view)
    async def wrapper(request: HttpRequest, *args, **kwargs):
        response = await _answer(request, *args, **kwargs)
        # Set here, not by CommonMiddleware: under ASGI agent requests skip it
        # (hosts.agent.asgi.agent_handler).
        response["Content-Length"] = str(len(response.content))
        return response

    async def _answer(request: HttpRequest, *args, **kwargs):
        if request.method != "POST":
            return error(f"method {request.method} not allowed; use POST", 405, Allow="POST")
        try:
            return await view(request, dbpool.run_for(request), *args, **kwargs)
        except ProtocolError as exc:
            if exc.status == 401:
                return unauthorized(exc.message)
            return error(exc.message, exc.status)
        except service.ConnectRefused as exc:
            if exc.status == 401:
                return unauthorized(exc.message)
            return error(exc.message, exc.status)
        except Exception:
            # Never an HTML page for an agent: a failure of ours is still JSON.
            log.exception("agent request %s failed", request.path)
            return error("the server could not process this request (nothing was "
                         "changed); try again", 500)

    return wrapper


def read_json(request: HttpRequest, *, allow_empty: bool = False) -> dict:
    """The request body as a JSON object, read at most 4 MiB.

    Reads the stream itself rather than ``request.body``: Django's own limit
    (DATA_UPLOAD_MAX_MEMORY_SIZE, 2.5 MB) is below the protocol's 4 MiB."""
    validation.check_content_type(request.META.get("CONTENT_TYPE"))
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    validation.check_size(length)
    raw = request.read(validation.MAX_BODY_BYTES + 1)
    return validation.parse_json_object(raw, allow_empty=allow_empty)


def ping_interval() -> int:
    return config.get("ping.interval")


def _gate_host(request: HttpRequest, token: str) -> Host | None:
    """The host AgentGate already found for this very token, if it ran."""
    scope = getattr(request, "scope", None) or {}
    host = scope.get(SCOPE_HOST)
    if host is not None and host.token_matches(token):
        return host
    return None


async def authenticated_host(request: HttpRequest, db) -> Host:
    token = bearer(request.headers)
    if token is None:
        raise ProtocolError("missing credentials: send Authorization: Bearer <host token>", 401)
    host = _gate_host(request, token) or await db(host_for_token, token)
    if host is None:
        raise ProtocolError("invalid host token", 401)
    return host


def _reconnect(host: Host, token: str, data, now) -> tuple:
    result = service.reconnect(host, token, data, now=now)
    return result, result.ping_interval or ping_interval()


def _enrol(data, now) -> tuple:
    result = service.enrol(data, now=now)
    return result, result.ping_interval or ping_interval()


@agent_endpoint
async def connect(request: HttpRequest, db) -> JsonResponse:
    """R1/R6/R29: enrol a new host with the join key, or reconnect a known one with
    its own token. Answers with the token the agent keeps and the server_token the
    server presents on its calls to the agent."""
    token = bearer(request.headers)
    if token is None:
        return unauthorized(
            "missing credentials: send Authorization: Bearer <join key> to enrol, or "
            "Bearer <host token> to reconnect")
    known: Host | None = None
    join = is_join_key(token)
    if not join:
        known = _gate_host(request, token) or await db(host_for_token, token)
        if known is None:
            return unauthorized("invalid join key or host token")
    data = validation.parse_connect(read_json(request))
    now = timezone.now()
    if known is not None:
        if known.name != data.name:
            return unauthorized(f"this token does not belong to host {data.name!r}")
        result, interval = await db(_reconnect, known, token, data, now)
    else:
        result, interval = await db(_enrol, data, now)
    return JsonResponse({
        "host_id": result.host.pk,
        "token": result.token,
        "server_token": result.server_token,
        "ping_interval": interval,
    })


def _ping(host: Host, vms, now) -> int:
    service.ping(host, vms, now=now)
    return ping_interval()


@agent_endpoint
async def ping(request: HttpRequest, db) -> JsonResponse:
    """R1/R8: refresh last_ping and apply the power report."""
    host = await authenticated_host(request, db)
    vms = validation.parse_ping(read_json(request))
    return JsonResponse({"ping_interval": await db(_ping, host, vms, timezone.now())})


@agent_endpoint
async def disconnect(request: HttpRequest, db) -> JsonResponse:
    """R7: the agent says goodbye; the host goes Disconnected without investigation."""
    host = await authenticated_host(request, db)
    reason = validation.parse_disconnect(read_json(request, allow_empty=True))
    await db(service.disconnect, host, reason, now=timezone.now())
    return JsonResponse({})
