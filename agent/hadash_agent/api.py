"""Server → agent (PROTOCOL.md "Server → agent"): the HTTP API hadash calls.

Every call must carry ``Authorization: Bearer <server_token>`` (from the connect
answer); anything else is 401 and changes nothing. All answers are JSON, errors
``{"error": "…"}``. Extensions: ``GET /peer`` (unauthenticated, read-only: who answers
here and whether it accepts migrations — what another host's agent asks for
``check-on-host`` and ``migrate``), and, with test hooks enabled only, ``/test/…``.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from . import AGENT_NAME, __version__
from .config import NAME_RE, NAME_RULE, url_host
from .hypervisor import POWER_OFF, POWER_ON, ActionError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("hadash_agent")

MAX_BODY = 4 * 1024 * 1024
PUBLIC_PATHS = frozenset({"/peer"})
ADDRESS_RE = re.compile(r"[A-Za-z0-9.:\-\[\]%]{1,255}")
AGENT_KEY = web.AppKey("agent", object)


class BadRequest(ActionError):
    def __init__(self, message: str):
        super().__init__(message, 400)


def error(message: str, status: int, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def agent_of(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]


@web.middleware
async def json_errors(request: web.Request, handler):
    try:
        return await handler(request)
    except ActionError as exc:
        return error(exc.message, exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.reason if exc.status != 404 else f"no such endpoint: {request.path}"
        return error(message, exc.status)
    except Exception as exc:  # a bug: answer in protocol, log the traceback
        log.exception("server call %s %s failed", request.method, request.path)
        return error(f"internal error in the agent: {exc!r}", 500)


@web.middleware
async def server_token(request: web.Request, handler):
    """PROTOCOL.md Authentication: the server presents its own credential."""
    if request.path in PUBLIC_PATHS:
        return await handler(request)
    expected = agent_of(request).creds.server_token
    value = request.headers.get("Authorization", "")
    scheme, _, presented = value.strip().partition(" ")
    presented = presented.strip()
    if not expected:
        return _unauthorized("this agent is not enrolled yet: it has no server credential "
                             "to check")
    if scheme.lower() != "bearer" or not presented:
        return _unauthorized("missing credentials: send Authorization: Bearer <server_token>")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        log.warning("refused a call %s %s from %s: wrong server token", request.method,
                    request.path, request.remote)
        return _unauthorized("invalid server token")
    return await handler(request)


def _unauthorized(message: str) -> web.Response:
    response = error(message, 401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="hadash-agent"'
    return response


async def body(request: web.Request) -> dict:
    """The request's JSON object ({} when empty)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest("request body must be a JSON object")
    return value


def vm_name(request: web.Request) -> str:
    name = request.match_info["name"]
    if not NAME_RE.fullmatch(name):
        raise BadRequest(f"{name!r} is not a VM name hadash uses ({NAME_RULE})")
    return name


# --- the protocol ------------------------------------------------------------------------


async def check_health(request: web.Request) -> web.Response:
    agent = agent_of(request)
    ok, problem = await agent.call(agent.hv.health)
    if not ok:
        return web.json_response({"ok": False, "error": problem}, status=503)
    return web.json_response({"ok": True, **agent.identity()})


async def get_vm(request: web.Request) -> web.Response:
    agent = agent_of(request)
    name = vm_name(request)
    state = await agent.call(agent.hv.power_of, name)
    if state is None:
        return error(f"no domain named {name} on this host", 404)
    return web.json_response({"name": name, "power_state": state})


async def start_vm(request: web.Request) -> web.Response:
    agent = agent_of(request)
    name = vm_name(request)
    data = await body(request)
    definition = data.get("definition")
    xml = None
    if definition is not None:
        if not isinstance(definition, dict):
            raise BadRequest("definition must be an object {\"format\": \"libvirt-xml\", "
                             "\"xml\": …}")
        if definition.get("format") != "libvirt-xml":
            raise BadRequest(f"definition format {definition.get('format')!r} is not "
                             "supported (libvirt-xml)")
        xml = definition.get("xml")
        if not isinstance(xml, str) or not xml.strip():
            raise BadRequest("definition.xml must be a non-empty string")
    t0 = time.monotonic()
    async with agent.vm_lock(name):
        try:
            what = await agent.call(agent.hv.start, name, xml)
        except ActionError as exc:
            log.warning("server: start %s refused (%d): %s", name, exc.status, exc.message)
            raise
        state = await agent.call(agent.hv.power_of, name)
    agent.poke()
    if state != POWER_ON:
        log.warning("server: start %s: %s, but it is %s right after", name, what, state)
        return error(f"{name} is not running right after the start ({state or 'gone'})", 500)
    log.info("server: start %s → PowerOn (%s, %.2f s)", name, what, time.monotonic() - t0)
    return web.json_response({"power_state": POWER_ON})


async def stop_vm(request: web.Request) -> web.Response:
    agent = agent_of(request)
    name = vm_name(request)
    data = await body(request)
    force = data.get("force", True)
    if not isinstance(force, bool):
        raise BadRequest("force must be true or false")
    async with agent.vm_lock(name):
        try:
            what = await agent.call(agent.hv.stop, name, force, agent.cfg.stop_timeout)
        except ActionError as exc:
            if exc.status != 404:
                log.warning("server: stop %s failed (%d): %s", name, exc.status, exc.message)
            raise
    agent.poke()
    log.info("server: stop %s → PowerOff (%s and forgotten)", name, what)
    return web.json_response({"power_state": POWER_OFF})


async def migrate_vm(request: web.Request) -> web.Response:
    agent = agent_of(request)
    name = vm_name(request)
    data = await body(request)
    target_url = data.get("target_url")
    if not isinstance(target_url, str) or not _http_url(target_url):
        raise BadRequest("target_url must be the target agent's http(s) URL")
    peer = await probe(agent, target_url.rstrip("/") + "/peer", timeout=5.0)
    if not isinstance(peer, dict):
        raise ActionError(f"migrate {name}: the target agent at {target_url} did not answer "
                          f"({peer})", 409)
    target = peer.get("name")
    if target == agent.cfg.name:
        raise ActionError(f"migrate {name}: the target is this host", 409)
    uri = peer.get("migration_uri")
    if not isinstance(uri, str) or not uri:
        raise ActionError(f"migrate {name}: host {target} accepts no libvirt migrations "
                          "(set migration_uri in its agent configuration)", 409)
    data_uri = peer.get("migration_data_uri") or ""
    async with agent.vm_lock(name):
        try:
            await agent.call(agent.hv.migrate, name, uri, str(data_uri))
        except ActionError as exc:
            log.warning("server: migrate %s to %s failed (%d): %s", name, target, exc.status,
                        exc.message)
            raise
    agent.poke()
    log.info("server: migrate %s → running on %s (libvirt %s)", name, target, uri)
    return web.json_response({"power_state": POWER_ON, "host": target})


async def check_on_host(request: web.Request) -> web.Response:
    """This host's view of another: its agent answers → alive. Anything else → null
    (cannot tell): a host cut off from the network looks exactly like a dead one, and
    "dead" would make hadash restart VMs that may still run there."""
    agent = agent_of(request)
    data = await body(request)
    name, address = data.get("name"), data.get("address")
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BadRequest(f"name must be a host name ({NAME_RULE})")
    if address is None or address == "":
        return web.json_response({"alive": None, "detail": "no address given"})
    if not isinstance(address, str) or not ADDRESS_RE.fullmatch(address):
        raise BadRequest("address must be an IP address or host name")
    scheme = urlsplit(agent.cfg.agent_url).scheme or "http"
    url = f"{scheme}://{url_host(address.strip('[]'))}:{agent.cfg.effective_peer_port}/peer"
    peer = await probe(agent, url, timeout=agent.cfg.peer_timeout)
    if isinstance(peer, dict) and peer.get("agent"):
        if peer.get("name") not in (None, name):
            alive, detail = None, f"{address} answers as host {peer.get('name')}"
        else:
            alive, detail = True, f"its agent answers at {address}"
    else:
        alive, detail = None, f"no agent answers at {address} ({peer})"
    log.info("server: check-on-host %s → alive %s (%s)", name,
             {True: "true", None: "unknown"}[alive], detail)
    return web.json_response({"alive": alive, "detail": detail})


async def probe(agent: Agent, url: str, timeout: float) -> dict | str:
    """GET another agent's /peer: its JSON object, or why there is none."""
    session = agent.link.session
    assert session is not None
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout),
                               allow_redirects=False) as response:
            try:
                data = await response.json(content_type=None)
            except ValueError:
                return f"HTTP {response.status}, not JSON"
            if response.status != 200 or not isinstance(data, dict):
                return f"HTTP {response.status}"
            return data
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except aiohttp.ClientConnectorError as exc:
        return exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc)
    except (aiohttp.ClientError, OSError) as exc:
        return str(exc) or type(exc).__name__


def _http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname) and not (
        parts.username or parts.password or parts.query or parts.fragment)


async def peer(request: web.Request) -> web.Response:
    agent = agent_of(request)
    ok, _problem = await agent.call(agent.hv.health)
    return web.json_response({
        "agent": AGENT_NAME, "version": __version__, "name": agent.cfg.name,
        "libvirt_ok": ok, "migration_uri": agent.cfg.migration_uri or None,
        "migration_data_uri": agent.cfg.migration_data_uri or None,
    })


# --- test hooks (HADASH_AGENT_TEST_HOOKS=1 only) ---------------------------------------------


async def test_destroy(request: web.Request) -> web.Response:
    """Stop a domain behind hadash's back (libvirt's test driver is private to this
    process, so a test cannot do it from outside)."""
    agent = agent_of(request)
    name = vm_name(request)
    await agent.call(agent.hv.destroy_only, name)
    log.warning("test hook: destroyed %s behind hadash's back", name)
    return web.json_response({"destroyed": name})


async def test_define(request: web.Request) -> web.Response:
    agent = agent_of(request)
    data = await body(request)
    xml = data.get("xml")
    if not isinstance(xml, str):
        raise BadRequest("xml must be a string")
    name = await agent.call(agent.hv.define, xml)
    log.warning("test hook: defined %s behind hadash's back", name)
    return web.json_response({"defined": name})


def make_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[json_errors, server_token], client_max_size=MAX_BODY)
    app[AGENT_KEY] = agent
    app.add_routes([
        web.post("/check-health", check_health),
        web.get("/vms/{name}", get_vm),
        web.post("/vms/{name}/start", start_vm),
        web.post("/vms/{name}/stop", stop_vm),
        web.post("/vms/{name}/migrate", migrate_vm),
        web.post("/check-on-host", check_on_host),
        web.get("/peer", peer),
    ])
    if agent.cfg.test_hooks:
        app.add_routes([
            web.post("/test/destroy/{name}", test_destroy),
            web.post("/test/define", test_define),
        ])
    return app


async def start_api(agent: Agent) -> web.AppRunner:
    runner = web.AppRunner(make_app(agent), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, agent.cfg.listen_host, agent.cfg.listen_port,
                       reuse_address=True)
    await site.start()
    return runner
