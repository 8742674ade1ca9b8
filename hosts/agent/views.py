"""Agent protocol over HTTP (PROTOCOL.md, agent → server): connect, ping, disconnect.

Plain Django views, kept lean because every host pings every ``ping.interval``: one
indexed token lookup, validation, then the service call. Every request is
authenticated before its body is read and validated in full before the service is
called, so a rejected request (4xx) changes nothing.
"""

from __future__ import annotations

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


def authenticated_host(request: HttpRequest) -> Host:
    token = bearer(request.headers)
    if token is None:
        raise ProtocolError("missing credentials: send Authorization: Bearer <host token>", 401)
    host = host_for_token(token)
    if host is None:
        raise ProtocolError("invalid host token", 401)
    return host


@agent_endpoint
def connect(request: HttpRequest) -> JsonResponse:
    """R1/R6: register or reconnect a host, answer with a fresh token."""
    token = bearer(request.headers)
    if token is None:
        return unauthorized("missing credentials: send Authorization: Bearer <join key>")
    known: Host | None = None
    if not is_join_key(token):
        # A reconnect may present the host's current token instead of the join key.
        known = host_for_token(token)
        if known is None:
            return unauthorized("invalid join key or host token")
    data = validation.parse_connect(read_json(request))
    if known is not None and known.name != data.name:
        return unauthorized(f"this token does not belong to host {data.name!r}")
    host, host_token = service.connect(data, now=timezone.now())
    return JsonResponse({"host_id": host.pk, "token": host_token, "ping_interval": ping_interval()})


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
