"""Each simulated host's agent: connect, then ping on a fixed schedule (PROTOCOL.md).

One asyncio task per host runs while the server could reach the host (powered on, agent
running, network on; :meth:`Simulator.sync_agent` starts and cancels it). When the
agent (re)started it connects — with its own token if it has one (stored on disk,
``state.CredentialStore``, so a restarted simulator keeps its hosts), else with the join
key to enrol (PROTOCOL.md v1.1, R29) — then pings with a full power report every
``ping_interval`` seconds — over one websocket per host (``/api/agent/v1/ws``, the
default) or by ``POST /ping`` (``--transport http``) — and follows the interval the
server answers with.

Pings keep a fixed grid, ``t0 + k × interval`` with a random phase ``t0``, so a host's
rhythm does not drift with its neighbours' work or with the server's answer times; a
slot missed altogether (the loop was blocked for longer than an interval) is skipped,
never made up in a burst. With the websocket transport a second small task per host
reads the pongs, so a slow answer never holds back the next ping.

If the server is down the agent retries with a jittered exponential back-off (1 s …
30 s). If it refuses the host token (401: an operator re-enrolled the host, or the
server's database was reset) the agent says so and tries the join key, which works
only for a name the server does not know or one an operator re-enrolled; anything
else (409) is logged as needing an operator, and retried with back-off. The agent never
takes another identity than the one a 200 gave it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import TYPE_CHECKING

import aiohttp

if TYPE_CHECKING:
    from .runner import Simulator
    from .state import Host

log = logging.getLogger("fleet.simulator")

BACKOFF_MIN = 1.0
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = aiohttp.ClientTimeout(total=30)
WS_TIMEOUT = aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0)
HANDSHAKE_TIMEOUT = 30.0
CLOSE_UNAUTHORIZED = 4401  # hosts.agent.consumers: the token stopped being valid


class TokenRefused(Exception):
    """The server does not accept the host token (any more): connect again."""


class ServerRefused(Exception):
    """The server answered, but not with what the protocol promises."""


class NeedsOperator(ServerRefused):
    """The server will not take this agent until an operator acts (re-enrol, join
    key): logged as a warning."""


class Grid:
    """A fixed schedule ``first + k × interval``."""

    __slots__ = ("interval", "missed", "next")

    def __init__(self, interval: float, first: float):
        self.interval = interval
        self.next = first
        self.missed: list[float] = []  # how late the slots skipped by the last wait were

    async def wait(self) -> float:
        """Sleep until the next slot; returns how late we woke (seconds). Slots that
        passed altogether are skipped; ``missed`` says how late each of them was by
        now (no coordinated omission: a stall counts once per slot it swallowed)."""
        loop = asyncio.get_running_loop()
        delay = self.next - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        now = loop.time()
        slot = self.next
        nxt = slot + self.interval
        self.missed = []
        if nxt <= now:
            skipped = math.floor((now - nxt) / self.interval) + 1
            self.missed = [now - (nxt + i * self.interval) for i in range(min(skipped, 1000))]
            nxt += skipped * self.interval
        self.next = nxt
        return now - slot


def _error_text(data: object, status: int) -> str:
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return f"HTTP {status}"


async def _json(response: aiohttp.ClientResponse) -> object:
    try:
        return await response.json(content_type=None)
    except (ValueError, aiohttp.ContentTypeError):
        return None


def _interval(data: object, default: float) -> float:
    if isinstance(data, dict):
        value = data.get("ping_interval")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return default


def sync_task(sim, h: Host) -> bool:
    """Run the host's agent task exactly while the server could reach it: start one
    when it can and none runs, cancel the running one when it cannot. True when a
    running task was cancelled (the host's link is gone)."""
    running = h.task is not None and not h.task.done()
    if h.reachable and not running:
        h.task = asyncio.get_running_loop().create_task(run_agent(sim, h))
    elif not h.reachable and running:
        h.task.cancel()
        h.task = None
        return True
    return False


async def run_agent(sim: Simulator, h: Host) -> None:
    """The host's agent, until cancelled (the host became unreachable, or shutdown)."""
    backoff = BACKOFF_MIN
    trouble = ""  # the last failure logged, so a long outage logs once per host
    loop = asyncio.get_running_loop()
    while True:
        connected_at = None
        try:
            if h.must_connect or h.token is None:
                await connect(sim, h)
                connected_at = loop.time()
            if sim.opts.transport == "ws":
                await ping_ws(sim, h)
            else:
                await ping_http(sim, h)
            raise ConnectionError("the server closed the link")
        except TokenRefused:
            h.must_connect = True
            if h.linked:
                h.linked = False
                log.info("%s: the server refused its token; connecting again", h.name)
            # The next connect presents the token once more: a 401 there is what
            # sends the agent to the join key.
            if connected_at is None or loop.time() - connected_at > 5:
                backoff = BACKOFF_MIN
                continue  # connect again at once
            problem = "the server refused a token it had just issued"
            if problem != trouble:
                log.info("%s: %s; retrying with back-off", h.name, problem)
        except NeedsOperator as exc:
            problem = str(exc)
            h.linked = False
            if problem != trouble:
                log.warning("%s: %s; retrying with back-off", h.name, problem)
        except (TimeoutError, aiohttp.ClientError, OSError, ServerRefused) as exc:
            problem = str(exc) or type(exc).__name__
            if h.linked:
                h.linked = False
                log.info("%s disconnected (%s); retrying", h.name, problem)
                backoff = BACKOFF_MIN
            elif problem != trouble:
                log.info("%s cannot reach the server (%s); retrying with back-off",
                         h.name, problem)
        trouble = problem
        await asyncio.sleep(backoff * sim.jitter(0.5, 1.0))
        backoff = min(backoff * 2, BACKOFF_MAX)


async def connect(sim: Simulator, h: Host) -> None:
    """``POST /api/agent/v1/connect``: with the host's own token when it has one (a
    reconnect: the same token comes back), else — or when the server refuses that token
    with 401 — with the join key (an enrolment; 409 when the name is enrolled and no
    operator re-enrolled it). Stores what a 200 gives."""
    body = {
        "name": h.name,
        "type": h.type,
        "hypervisor": "Simulated",
        "cluster": h.cluster,
        "cpus": h.cpus,
        "memory_mb": h.memory_mb,
        "address": h.address,
        "agent_url": sim.agent_url(h.name),
        "vms": h.power_report(),
        # PROTOCOL.md v1.1: who serves the host (the dashboard tells a simulated host
        # from one served by a real hadash-agent).
        "agent": {"name": "hadash-simulator", "version": "1.1",
                  "hypervisor_uri": "simulated://" + h.name},
    }
    assert sim.session is not None and sim.connect_slots is not None
    how = "connected"
    async with sim.connect_slots:
        if h.token:
            status, data = await _post_connect(sim, body, h.token)
            if status == 401 and not h.token_refused:
                log.warning("%s: the server refused its stored token (401: %s); trying "
                            "the join key, which only an unknown or re-enrolled host "
                            "may use", h.name, _error_text(data, 401))
            h.token_refused = status == 401
        if not h.token or h.token_refused:
            status, data = await _post_connect(sim, body, sim.opts.agent_key)
            how = "re-enrolled" if h.token else "enrolled"
            if status == 409:
                raise NeedsOperator(
                    f"connect refused: {_error_text(data, 409)} — "
                    + ("its stored token was refused too: " if h.token else "")
                    + "an operator must re-enrol it (admin, API or dashboard)")
            if status == 401:
                raise NeedsOperator(f"enrolment refused: {_error_text(data, 401)} "
                                    "(check --agent-key / HADASH_AGENT_KEY)")
    if status != 200 or not isinstance(data, dict) or not data.get("token"):
        raise ServerRefused(f"connect failed: {_error_text(data, status)}")
    token, server_token = str(data["token"]), data.get("server_token")
    server_token = str(server_token) if server_token else token  # a v1 server: the token
    host_id = data.get("host_id")
    changed = (token, server_token, host_id) != (h.token, h.server_token, h.host_id)
    h.token, h.server_token, h.host_id = token, server_token, host_id
    h.token_refused = False
    if changed:
        try:
            sim.credentials.save(h)
        except OSError as exc:
            log.error("%s: cannot store its credentials in %s (%s): a restarted simulator "
                      "will need an operator to re-enrol it", h.name, sim.credentials.path,
                      exc)
    h.ping_interval = _interval(data, h.ping_interval)
    h.must_connect = False
    h.linked = True
    h.last_ack = asyncio.get_running_loop().time()
    log.info("%s %s (host id %s, ping every %g s)", h.name, how, h.host_id, h.ping_interval)


async def _post_connect(sim: Simulator, body: dict, credential: str) -> tuple[int, object]:
    assert sim.session is not None
    async with sim.session.post(
        f"{sim.server_url}/api/agent/v1/connect", json=body,
        headers={"Authorization": f"Bearer {credential}"}, timeout=CONNECT_TIMEOUT,
    ) as response:
        return response.status, await _json(response)


def _first_slot(sim: Simulator, h: Host) -> Grid:
    loop = asyncio.get_running_loop()
    return Grid(h.ping_interval, loop.time() + sim.jitter(0.0, h.ping_interval))


def _ws_url(server_url: str) -> str:
    if server_url.startswith("https://"):
        return "wss://" + server_url[len("https://"):]
    if server_url.startswith("http://"):
        return "ws://" + server_url[len("http://"):]
    return server_url


def _relinked(h: Host) -> None:
    if not h.linked:
        h.linked = True
        log.info("%s connected again (pinging with its token)", h.name)


async def ping_ws(sim: Simulator, h: Host) -> None:
    """Ping over one websocket until it closes (returns) or the token is refused."""
    assert sim.session is not None and sim.upgrade_slots is not None
    headers = {"Authorization": f"Bearer {h.token}"}
    try:
        # Upgrades are bounded too (a thousand hosts reopening their sockets at once
        # would swamp the server's handshakes), by slots of their own: in the connect
        # slots' queue a host that had just enrolled waited behind every other host's
        # enrolment — a minute at 1,000 hosts, long past its ping timeout (issue 12).
        async with sim.upgrade_slots, asyncio.timeout(HANDSHAKE_TIMEOUT):
            ws = await sim.session.ws_connect(
                f"{_ws_url(sim.server_url)}/api/agent/v1/ws", headers=headers,
                autoping=True, heartbeat=None, timeout=WS_TIMEOUT, compress=0,
            )
    except aiohttp.WSServerHandshakeError as exc:
        if exc.status in (401, 403):
            raise TokenRefused from exc
        raise
    reader = asyncio.get_running_loop().create_task(_read_pongs(sim, h, ws))
    try:
        _relinked(h)
        grid = _first_slot(sim, h)
        while True:
            late = await grid.wait()
            if reader.done():
                break
            await ws.send_str(h.ping_message())
            sim.stats.ping(late)
            for missed in grid.missed:
                sim.stats.missed(missed)
            grid.interval = h.ping_interval
        if reader.result() == "token":
            raise TokenRefused
    finally:
        reader.cancel()
        if not ws.closed:
            await ws.close()


async def _read_pongs(sim: Simulator, h: Host, ws: aiohttp.ClientWebSocketResponse) -> str:
    """Read the server's answers; returns why the socket ended ("closed"/"token")."""
    loop = asyncio.get_running_loop()
    async for msg in ws:
        if msg.type != aiohttp.WSMsgType.TEXT:
            continue
        try:
            data = json.loads(msg.data)
        except ValueError:
            continue
        if not isinstance(data, dict):
            continue
        if data.get("type") == "pong":
            sim.stats.acks += 1
            h.last_ack = loop.time()
            h.ping_interval = _interval(data, h.ping_interval)
        elif data.get("type") == "error":
            sim.stats.ping_errors += 1
            log.warning("%s: the server answered a ping with an error: %s",
                        h.name, data.get("error"))
    if ws.close_code == CLOSE_UNAUTHORIZED:
        return "token"
    return "closed"


async def ping_http(sim: Simulator, h: Host) -> None:
    """``POST /api/agent/v1/ping`` on the grid until something fails (raises)."""
    assert sim.session is not None
    url = f"{sim.server_url}/api/agent/v1/ping"
    headers = {"Authorization": f"Bearer {h.token}", "Content-Type": "application/json"}
    grid = _first_slot(sim, h)
    loop = asyncio.get_running_loop()
    while True:
        late = await grid.wait()
        body = json.dumps({"vms": h.power_report()}).encode()
        sim.stats.ping(late)
        for missed in grid.missed:
            sim.stats.missed(missed)
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(h.ping_interval, 10.0)))
        async with sim.session.post(url, data=body, headers=headers,
                                    timeout=timeout) as response:
            data = await _json(response)
            if response.status == 401:
                raise TokenRefused
            if response.status != 200:
                sim.stats.ping_errors += 1
                raise ServerRefused(f"ping failed: {_error_text(data, response.status)}")
        sim.stats.acks += 1
        h.last_ack = loop.time()
        _relinked(h)
        h.ping_interval = grid.interval = _interval(data, h.ping_interval)


async def goodbye_all(sim: Simulator, timeout: float = 5.0) -> None:
    """``POST /disconnect`` for every connected host (``--goodbye``), bounded."""
    assert sim.session is not None
    slots = asyncio.Semaphore(50)
    hosts = [h for h in sim.fleet.hosts.values() if h.linked and h.reachable and h.token]

    async def one(h: Host) -> None:
        async with slots:
            try:
                async with sim.session.post(
                    f"{sim.server_url}/api/agent/v1/disconnect",
                    json={"reason": "simulator shutdown"},
                    headers={"Authorization": f"Bearer {h.token}"},
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as response:
                    await response.read()
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass

    if not hosts:
        return
    log.info("saying goodbye (disconnect) for %d hosts", len(hosts))
    tasks = [asyncio.ensure_future(one(h)) for h in hosts]
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    for t in pending:
        t.cancel()
