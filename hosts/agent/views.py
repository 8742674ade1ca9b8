"""Agent protocol over HTTP (PROTOCOL.md, agent → server): connect, ping, disconnect.

Plain Django views, kept lean because every host pings every ``ping.interval``: one
indexed token lookup, validation, then the service call. Every request is
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

from . import service, validation
from .auth import bearer, host_for_token, is_join_key
from .validation import ProtocolError

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
    """POST only, no CSRF (agents are not browsers), ProtocolError → JSON 4xx."""

    @csrf_exempt
    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs):
        if request.method != "POST":
            return error(f"method {request.method} not allowed; use POST", 405, Allow="POST")
        try:
            return view(request, *args, **kwargs)
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


def authenticated_host(request: HttpRequest) -> Host:
    token = bearer(request.headers)
    if token is None:
        raise ProtocolError("missing credentials: send Authorization: Bearer <host token>", 401)
    host = _gate_host(request, token) or host_for_token(token)
    if host is None:
        raise ProtocolError("invalid host token", 401)
    return host


@agent_endpoint
def connect(request: HttpRequest) -> JsonResponse:
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
        known = _gate_host(request, token) or host_for_token(token)
        if known is None:
            return unauthorized("invalid join key or host token")
    data = validation.parse_connect(read_json(request))
    now = timezone.now()
    if known is not None:
        if known.name != data.name:
            return unauthorized(f"this token does not belong to host {data.name!r}")
        result = service.reconnect(known, token, data, now=now)
    else:
        result = service.enrol(data, now=now)
    return JsonResponse({
        "host_id": result.host.pk,
        "token": result.token,
        "server_token": result.server_token,
        "ping_interval": ping_interval(),
    })


@agent_endpoint
def ping(request: HttpRequest) -> JsonResponse:
    """R1/R8: refresh last_ping and apply the power report."""
    host = authenticated_host(request)
    vms = validation.parse_ping(read_json(request))
    service.ping(host, vms, now=timezone.now())
    return JsonResponse({"ping_interval": ping_interval()})


@agent_endpoint
def disconnect(request: HttpRequest) -> JsonResponse:
    """R7: the agent says goodbye; the host goes Disconnected without investigation."""
    host = authenticated_host(request)
    reason = validation.parse_disconnect(read_json(request, allow_empty=True))
    service.disconnect(host, reason, now=timezone.now())
    return JsonResponse({})
