"""The simulator's HTTP server: every host's agent and BMC, and the control API.

One aiohttp application on one port:

* ``/agents/{host}/…`` — PROTOCOL.md's server→agent endpoints (``check-health``,
  ``vms/{name}``, ``vms/{name}/start|stop|migrate``, ``check-on-host``), so a host's
  ``agent_url`` is ``http://HOST:PORT/agents/{host}``. The server's bearer token must
  be the ``server_token`` the host got from ``connect`` (401 otherwise). A host the
  server could not reach (powered off, agent stopped, network off) — or that does not
  exist — answers nothing: the connection is closed without a response, so the
  server's client sees a connection error (``Unreachable``).
* ``/bmc/{host}/redfish/v1/…`` — a Redfish BMC per host (``oobm_address``
  ``http://HOST:PORT/bmc/{host}``, system id = host name, basic auth): the system's
  ``PowerState`` and ``Actions/ComputerSystem.Reset``. It answers while the BMC is ok,
  whatever the machine's state; ``bmc H fail`` closes connections unanswered.
* ``/control/…`` — the control API (docs/simulator.md): ``GET /control/health``,
  ``GET /control/hosts``, ``GET /control/hosts/{name}``, ``POST /control/faults``.
  Every call needs ``Authorization: Bearer <control token>`` (``--token``,
  ``$HADASH_FLEET_TOKEN``, else one made up and logged at start), a ``Host`` that names
  this simulator (loopback, the listen address or the advertised one), no ``Origin``
  but the simulator's own, and a POST body of ``application/json``: a web page open in
  the operator's browser cannot inject faults cross-origin (issue 8, part 5).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from aiohttp import web

from .state import FaultError, Host

if TYPE_CHECKING:
    from .runner import Simulator

log = logging.getLogger("fleet.simulator")

SIM: web.AppKey[Simulator] = web.AppKey("simulator")
MAX_BODY = 4 * 1024 * 1024

RESET_TYPES = ("On", "ForceOn", "ForceOff", "GracefulShutdown", "ForceRestart",
               "GracefulRestart", "PowerCycle", "PushPowerButton")


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(data), status=status, content_type="application/json")


def error(message: str, status: int, **headers: str) -> web.Response:
    response = json_response({"error": message}, status)
    response.headers.update(headers)
    return response


def drop(request: web.Request) -> web.StreamResponse:
    """Nobody is there: close the connection without answering."""
    transport = request.transport
    if transport is not None:
        transport.close()
    raise web.HTTPServiceUnavailable()  # never reaches the (closed) connection


async def read_json(request: web.Request) -> dict:
    """The request body as a JSON object ({} when empty); 400 otherwise."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "the body is not valid JSON"}),
            content_type="application/json",
        ) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": "the body must be a JSON object"}),
            content_type="application/json",
        )
    return data


# --- agents ---------------------------------------------------------------------

AgentHandler = Callable[["Simulator", Host, web.Request], Awaitable[web.StreamResponse]]


def agent_endpoint(fn: AgentHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """Unreachable hosts answer nothing; then the server's token is checked."""

    async def handler(request: web.Request) -> web.StreamResponse:
        sim = request.app[SIM]
        h = sim.fleet.hosts.get(request.match_info["host"])
        if h is None or not h.reachable:
            return drop(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        # PROTOCOL.md v1.1: the server presents the server_token it gave in `connect`
        # (never the agent's own token).
        if (
            scheme.lower() != "bearer"
            or not token
            or not h.server_token
            or not hmac.compare_digest(token.encode(), h.server_token.encode())
        ):
            why = ("the agent has not connected yet" if not h.server_token
                   else "wrong or missing server token")
            return error(why, 401, **{"WWW-Authenticate": 'Bearer realm="hadash-agent"'})
        return await fn(sim, h, request)

    return handler


@agent_endpoint
async def check_health(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    return json_response({"ok": True})


@agent_endpoint
async def get_vm(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    name = request.match_info["vm"]
    state = h.vms.get(name)
    if state is None:
        return error(f"{h.name} does not know VM {name}", 404)
    return json_response({"name": name, "power_state": state})


async def _takes_time(sim: Simulator, h: Host) -> bool:
    """Wait ``--start-delay`` seconds; False as soon as the server could no longer reach
    the host (its connection then drops at once, as a dying machine's would)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + sim.opts.start_delay
    while (left := end - loop.time()) > 0:
        await asyncio.sleep(min(left, 0.1))
        if not h.reachable:
            return False
    return h.reachable


@agent_endpoint
async def start_vm(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    name = request.match_info["vm"]
    await read_json(request)
    if h.start_fail > 0:
        h.start_fail -= 1
        log.info("%s: start %s refused (injected start-fail, %d more)", h.name, name,
                 h.start_fail)
        return error(f"{h.name} refused to start {name} (injected failure)", 500)
    if h.vms.get(name) == "PowerOn":
        return json_response({"power_state": "PowerOn"})
    h.starting.add(name)
    try:
        alive = await _takes_time(sim, h)
    finally:
        h.starting.discard(name)
    if not alive:  # the machine died (or was cut off) while starting
        return drop(request)
    others = [o for o in sim.fleet.where(name) if o != h.name]
    if others:
        log.warning("%s: VM %s started here while it runs on %s (double run!)", h.name, name,
                    ", ".join(others))
    h.vms[name] = "PowerOn"
    sim.changed(h)
    return json_response({"power_state": "PowerOn"})


@agent_endpoint
async def stop_vm(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    name = request.match_info["vm"]
    await read_json(request)
    if h.vms.pop(name, None) is None:
        return error(f"{h.name} does not know VM {name}", 404)
    sim.changed(h)
    return json_response({"power_state": "PowerOff"})


def target_host_name(target_url: object) -> str | None:
    """The host name of an agent URL ``…/agents/{name}``."""
    if not isinstance(target_url, str):
        return None
    path = urlsplit(target_url).path.rstrip("/")
    head, _, name = path.rpartition("/")
    if not head.endswith("/agents") or not name:
        return None
    return unquote(name)


@agent_endpoint
async def migrate_vm(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    name = request.match_info["vm"]
    body = await read_json(request)
    target_name = target_host_name(body.get("target_url"))
    target = sim.fleet.hosts.get(target_name or "")
    if target is None:
        return error(f"cannot migrate {name}: {body.get('target_url')!r} is not a host "
                     "of this simulator", 409)
    if target is h:
        return error(f"cannot migrate {name}: it is already on {h.name}", 409)
    if h.vms.get(name) != "PowerOn":
        return error(f"{name} is not running on {h.name}", 409)
    if not (target.powered and target.agent_running):
        return error(f"cannot migrate {name}: {target.name} does not answer", 409)
    if not await _takes_time(sim, h):
        return drop(request)
    if h.vms.get(name) != "PowerOn":
        return error(f"{name} stopped running on {h.name} during the migration", 409)
    if not (target.powered and target.agent_running):
        return error(f"migration of {name} failed: {target.name} went away", 409)
    del h.vms[name]
    target.vms[name] = "PowerOn"
    sim.changed(h)
    sim.changed(target)
    log.info("%s: migrated %s to %s", h.name, name, target.name)
    return json_response({"power_state": "PowerOn", "host": target.name})


@agent_endpoint
async def check_on_host(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    other = sim.fleet.hosts.get(body.get("name")) if isinstance(body.get("name"), str) else None
    # Neighbours see the machine (its storage heartbeat), not its agent.
    return json_response({"alive": None if other is None else other.powered})


# --- Redfish BMCs ---------------------------------------------------------------


def _redfish_error(message: str, status: int, code: str = "Base.1.0.GeneralError",
                   **headers: str) -> web.Response:
    body = {"error": {"code": code, "message": message,
                      "@Message.ExtendedInfo": [{"MessageId": code, "Message": message}]}}
    response = json_response(body, status)
    response.headers.update(headers)
    return response


def _basic_auth_ok(sim: Simulator, request: web.Request) -> bool:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        user, _, password = base64.b64decode(value.strip()).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return hmac.compare_digest(user.encode(), sim.opts.bmc_username.encode()) and (
        hmac.compare_digest(password.encode(), sim.opts.bmc_password.encode())
    )


BmcHandler = Callable[["Simulator", Host, web.Request], Awaitable[web.StreamResponse]]


def bmc_endpoint(fn: BmcHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        sim = request.app[SIM]
        h = sim.fleet.hosts.get(request.match_info["host"])
        if h is None or not h.bmc_ok:
            return drop(request)
        if not _basic_auth_ok(sim, request):
            return _redfish_error("invalid credentials", 401, "Base.1.0.InsufficientPrivilege",
                                  **{"WWW-Authenticate": 'Basic realm="hadash-sim BMC"'})
        system = request.match_info.get("system")
        if system is not None and system != h.name:
            return _redfish_error(f"no system {system!r} on this BMC", 404,
                                  "Base.1.0.ResourceMissingAtURI")
        return await fn(sim, h, request)

    return handler


@bmc_endpoint
async def redfish_root(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    base = f"/bmc/{h.name}/redfish/v1"
    return json_response({
        "@odata.id": base, "@odata.type": "#ServiceRoot.v1_5_0.ServiceRoot",
        "Id": "RootService", "Name": f"Simulated BMC of {h.name}", "RedfishVersion": "1.6.0",
        "Systems": {"@odata.id": f"{base}/Systems"},
    })


@bmc_endpoint
async def redfish_systems(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    base = f"/bmc/{h.name}/redfish/v1/Systems"
    return json_response({
        "@odata.id": base, "@odata.type": "#ComputerSystemCollection.ComputerSystemCollection",
        "Name": "Computer System Collection", "Members@odata.count": 1,
        "Members": [{"@odata.id": f"{base}/{h.name}"}],
    })


@bmc_endpoint
async def redfish_system(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    uri = f"/bmc/{h.name}/redfish/v1/Systems/{h.name}"
    return json_response({
        "@odata.id": uri, "@odata.type": "#ComputerSystem.v1_10_0.ComputerSystem",
        "Id": h.name, "Name": h.name, "SystemType": "Physical",
        "PowerState": "On" if h.powered else "Off",
        "Status": {"State": "Enabled", "Health": "OK"},
        "ProcessorSummary": {"Count": h.cpus},
        "MemorySummary": {"TotalSystemMemoryGiB": round(h.memory_mb / 1024, 1)},
        "Actions": {"#ComputerSystem.Reset": {
            "target": f"{uri}/Actions/ComputerSystem.Reset",
            "ResetType@Redfish.AllowableValues": list(RESET_TYPES),
        }},
    })


@bmc_endpoint
async def redfish_reset(sim: Simulator, h: Host, request: web.Request) -> web.StreamResponse:
    try:
        body = await read_json(request)
    except web.HTTPBadRequest:
        return _redfish_error("the body is not a JSON object", 400, "Base.1.0.MalformedJSON")
    reset = body.get("ResetType")
    if reset not in RESET_TYPES:
        return _redfish_error(
            f"ResetType {reset!r} is not one of {', '.join(RESET_TYPES)}", 400,
            "Base.1.0.ActionParameterValueNotInList",
        )
    source = f"BMC {reset}"
    if reset == "PushPowerButton":
        reset = "ForceOff" if h.powered else "On"
    if reset in ("ForceOff", "GracefulShutdown", "ForceRestart", "GracefulRestart",
                 "PowerCycle") and h.powered:
        sim.apply_fault(f"host {h.name} power off", source=source)
    if reset in ("On", "ForceOn", "ForceRestart", "GracefulRestart", "PowerCycle"):
        if not h.powered:
            sim.apply_fault(f"host {h.name} power on", source=source)
    return web.Response(status=204)


# --- control API ----------------------------------------------------------------

CONTROL_TOKEN: web.AppKey[str] = web.AppKey("control_token", str)
CONTROL_HOSTS: web.AppKey[frozenset] = web.AppKey("control_hosts", frozenset)
CONTROL_MAX_BODY = 64 * 1024
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def host_name(value: str) -> str:
    """The host name of a Host header or URL authority: ``[::1]:9100`` → ``::1``."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") > 1:  # a bare IPv6 address
        return value
    return value.partition(":")[0]


def _is_loopback(name: str) -> bool:
    import ipaddress

    if name in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def control_token(sim: Simulator) -> str:
    """The control API's token: the one the simulator was given (``--token``), else
    ``$HADASH_FLEET_TOKEN``, else a random one (logged, so it can be used)."""
    import os
    import secrets

    token = getattr(sim, "control_token", "") or os.environ.get("HADASH_FLEET_TOKEN", "")
    if not token.strip():
        token = secrets.token_urlsafe(32)
        log.warning("control API token (none given with --token or HADASH_FLEET_TOKEN): %s",
                    token)
    sim.control_token = token.strip()
    return sim.control_token


def control_hosts_allowed(sim: Simulator) -> frozenset:
    """Host names the control API answers to: loopback, the address it listens on and
    the host of the URL it advertises (``--advertise``)."""
    names = set(LOOPBACK_NAMES)
    listen = host_name(sim.opts.listen_host or "")
    if listen and listen not in ("0.0.0.0", "::"):
        names.add(listen)
    if sim.opts.advertise:
        names.add(host_name(urlsplit(sim.opts.advertise).netloc.rpartition("@")[2]))
    return frozenset(names)


def _host_allowed(request: web.Request, name: str) -> bool:
    return name in request.app[CONTROL_HOSTS] or _is_loopback(name)


def _origin_allowed(request: web.Request, origin: str) -> bool:
    """Only the simulator's own origin (no page it serves calls it, so in practice
    none): a browser adds Origin to cross-origin requests and to every POST."""
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    local_port = request.transport.get_extra_info("sockname")[1] if request.transport else None
    return _host_allowed(request, host_name(parts.netloc)) and port == local_port


ControlHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def control_endpoint(fn: ControlHandler) -> ControlHandler:
    """Host, Origin, token and (for a body) JSON, checked before anything is done."""

    async def handler(request: web.Request) -> web.StreamResponse:
        host = host_name(request.headers.get("Host", ""))
        if not _host_allowed(request, host):
            return error(f"the control API does not answer to Host {host!r} (loopback, the "
                         "listen address and the --advertise host only)", 400)
        origin = request.headers.get("Origin")
        if origin is not None and not _origin_allowed(request, origin):
            return error(f"requests from origin {origin!r} are refused: the control API "
                         "is not for web pages", 403)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        expected = request.app[CONTROL_TOKEN]
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), expected.encode()):
            return error("wrong or missing control token (Authorization: Bearer …; see "
                         "--token / HADASH_FLEET_TOKEN)", 401,
                         **{"WWW-Authenticate": 'Bearer realm="hadash-sim control"'})
        if request.method not in ("GET", "HEAD"):
            if request.content_type != "application/json":
                return error("the control API takes application/json only", 415)
            if (request.content_length or 0) > CONTROL_MAX_BODY:
                return error(f"the body is over {CONTROL_MAX_BODY} bytes", 413)
        return await fn(request)

    return handler


@control_endpoint
async def control_health(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[SIM].health())


def _flag(request: web.Request, name: str, default: bool) -> bool:
    value = request.query.get(name)
    if value is None:
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


@control_endpoint
async def control_hosts(request: web.Request) -> web.StreamResponse:
    """Every host; ``?vms=false`` leaves out the VM lists (counts only), which keeps
    the answer small for a large fleet."""
    sim = request.app[SIM]
    now = asyncio.get_running_loop().time()
    vms = _flag(request, "vms", True)
    return json_response([sim.fleet.view(h, now, vms) for h in sim.fleet.hosts.values()])


@control_endpoint
async def control_host(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    h = sim.fleet.hosts.get(request.match_info["name"])
    if h is None:
        return error(f"no simulated host {request.match_info['name']!r}", 404)
    return json_response(sim.fleet.view(h, asyncio.get_running_loop().time()))


@control_endpoint
async def control_faults(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    try:
        body = await read_json(request)
    except web.HTTPBadRequest:
        return error('the body must be a JSON object: {"do": "host kvm-001 power off"}', 400)
    do = body.get("do")
    if not isinstance(do, str) or not do.strip():
        return error('missing "do": a fault such as "host kvm-001 power off"', 400)
    try:
        touched = sim.apply_fault(do)
    except FaultError as exc:
        return error(str(exc), 400)
    now = asyncio.get_running_loop().time()
    return json_response({"ok": True, "do": " ".join(do.split()),
                          "hosts": [sim.fleet.view(h, now) for h in touched]})


async def index(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIM]
    return json_response({
        "simulator": "hadash fleet simulator",
        "agents": f"{sim.base_url}/agents/{{host}}",
        "bmcs": f"{sim.base_url}/bmc/{{host}}/redfish/v1/Systems/{{host}}",
        "control": [f"GET {sim.control_url}/health",
                    f"GET {sim.control_url}/hosts[?vms=false]",
                    f"GET {sim.control_url}/hosts/{{name}}",
                    f"POST {sim.control_url}/faults {{\"do\": \"host H power off\"}}"],
    })


def make_app(sim: Simulator) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[SIM] = sim
    app[CONTROL_TOKEN] = control_token(sim)
    app[CONTROL_HOSTS] = control_hosts_allowed(sim)
    r = app.router
    r.add_get("/", index)
    a = "/agents/{host}"
    r.add_post(f"{a}/check-health", check_health)
    r.add_get(a + "/vms/{vm}", get_vm)
    r.add_post(a + "/vms/{vm}/start", start_vm)
    r.add_post(a + "/vms/{vm}/stop", stop_vm)
    r.add_post(a + "/vms/{vm}/migrate", migrate_vm)
    r.add_post(f"{a}/check-on-host", check_on_host)
    b = "/bmc/{host}/redfish/v1"
    r.add_get(b, redfish_root)
    r.add_get(b + "/", redfish_root)
    r.add_get(b + "/Systems", redfish_systems)
    r.add_get(b + "/Systems/{system}", redfish_system)
    r.add_post(b + "/Systems/{system}/Actions/ComputerSystem.Reset", redfish_reset)
    r.add_get("/control/health", control_health)
    r.add_get("/control/hosts", control_hosts)
    r.add_get("/control/hosts/{name}", control_host)
    r.add_post("/control/faults", control_faults)
    return app
