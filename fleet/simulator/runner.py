"""The simulator process: one asyncio loop, one listening port, many hosts.

:class:`Simulator` ties the pieces together: the fleet's state (:mod:`.state`), the HTTP
server with every host's agent endpoints, its Redfish BMC and the control API
(:mod:`.server`), the agent loops that connect and ping (:mod:`.agents`), and the
registration of the demo VMs through the operator API (:mod:`.api`). It never touches
hadash's database: everything goes over HTTP (and the websocket upgrade).

:class:`SimulatorThread` runs one on a background thread's loop, for tests and for
embedding.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import random
import socket
import subprocess
import sys
import threading
from array import array
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from . import agents, api, server
from .state import CredentialStore, Fleet, Host, demo_fleet

log = logging.getLogger("fleet.simulator")

__all__ = ["Options", "Simulator", "SimulatorThread", "Stats"]

DEFAULT_AGENT_KEY = "hadash-dev-join-key"  # hadash/settings.py's development join key


@dataclass
class Options:
    """Everything the command line sets (``manage.py simulate --help``)."""

    server: str = "http://127.0.0.1:8000"
    listen_host: str = "127.0.0.1"
    listen_port: int = 9100  # 0: any free port (tests)
    advertise: str = ""  # base URL the server reaches the simulator at (default: listen)
    hosts: int = 20
    vms: int = 200
    ha_ratio: float = 0.5
    clusters: int = 1
    host_cpus: int = 32
    host_memory_mb: int = 131072
    start_delay: float = 1.0  # seconds a VM start (and a migration) takes
    transport: str = "ws"  # ws | http
    agent_key: str = DEFAULT_AGENT_KEY
    api_token: str = ""  # operator API token; empty: no registration
    faults: list[tuple[float, str]] = field(default_factory=list)  # (seconds after start, do)
    bmc_username: str = "admin"
    bmc_password: str = "hadash-sim"
    connect_concurrency: int = 20
    api_concurrency: int = 20
    status_interval: float = 10.0  # seconds between status lines (0: none)
    goodbye: bool = False  # send `disconnect` for every connected host on shutdown
    agents: bool = True  # run the agent loops (tests of the endpoints turn this off)
    seed: int | None = None
    # Where the hosts' agent credentials are kept across restarts (state.CredentialStore):
    # None → $HADASH_SIM_STATE_FILE, else <settings.VAR_DIR>/simulator/agents.jsonl;
    # "" → in memory only.
    state_file: str | None = None
    # Ping processes (fleet.simulator.pinger): 0 runs the agents in this process's loop
    # (tests, embedding); N ≥ 1 runs them in N processes of their own, so that nothing
    # this process does (registration, the control API, agent calls, faults, GC) can
    # hold back a ping.
    processes: int = 0
    log_level: int = logging.INFO  # the ping processes' log level
    # The ping processes' nice value: negative (when allowed) runs them ahead of the
    # server and the database on a shared machine, as if each host had its own CPU.
    ping_nice: int = 0


def default_state_file() -> str:
    """``$HADASH_SIM_STATE_FILE``, else ``<VAR_DIR>/simulator/agents.jsonl`` (hadash's
    settings), else "" (no Django settings: in memory only)."""
    env = os.environ.get("HADASH_SIM_STATE_FILE")
    if env is not None:
        return env
    try:
        from django.conf import settings

        return str(settings.VAR_DIR / "simulator" / "agents.jsonl")
    except Exception:  # noqa: BLE001 - settings not configured: nothing to derive from
        return ""


class Stats:
    """Ping counters and schedule lateness (a ring of the last ``ring`` pings)."""

    def __init__(self, ring: int = 100_000):
        self.pings = 0
        self.acks = 0
        self.ping_errors = 0
        self.slots_missed = 0  # slots skipped after a stall (each also a lateness sample)
        self._late = array("d", bytes(8 * ring))
        self._n = 0
        self._samples: deque[tuple[float, int]] = deque(maxlen=11)

    def ping(self, late: float) -> None:
        self.pings += 1
        self._late[self._n % len(self._late)] = late if late > 0 else 0.0
        self._n += 1

    def missed(self, late: float) -> None:
        """A slot skipped after a stall: a lateness sample, not a ping."""
        self.slots_missed += 1
        self._late[self._n % len(self._late)] = late if late > 0 else 0.0
        self._n += 1

    def merge(self, pings: int, acks: int, errors: int, late: str, missed: int = 0) -> None:
        """Counters and lateness samples (base64 of native doubles) from a ping
        process."""
        late = array("d", base64.b64decode(late)) if late else array("d")
        self.acks += acks
        self.ping_errors += errors
        self.slots_missed += missed
        ring, n, size = self._late, self._n, len(self._late)
        for value in late:
            ring[n % size] = value if value > 0 else 0.0
            n += 1
        self._n = n
        self.pings += pings

    def sample(self, now: float) -> None:
        self._samples.append((now, self.pings))

    def rate(self) -> float:
        """Pings per second over the last ~10 s of samples."""
        if len(self._samples) < 2:
            return 0.0
        (t0, p0), (t1, p1) = self._samples[0], self._samples[-1]
        return (p1 - p0) / (t1 - t0) if t1 > t0 else 0.0

    def lateness_ms(self) -> dict[str, float | None]:
        """How late pings left against their fixed schedule: p50, p99, max (ms)."""
        n = min(self._n, len(self._late))
        if not n:
            return {"p50": None, "p99": None, "max": None, "samples": 0}
        values = sorted(self._late[:n])

        def pct(p: float) -> float:
            return round(values[min(n - 1, math.ceil(p * n) - 1)] * 1000, 2)

        return {"p50": pct(0.50), "p99": pct(0.99), "max": round(values[-1] * 1000, 2),
                "samples": n}


def rss_mb(pid: int | str = "self") -> float | None:
    """A process's resident memory (Linux), in MB (default: this one's)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


ROOT = Path(__file__).resolve().parents[2]  # the project: `python -m fleet.simulator.pinger`
LINE_LIMIT = 2**28


class PingProcess:
    """One ping process (:mod:`.pinger`) running the agents of a shard of the hosts,
    and the socket to it. Started again if it dies while the simulator runs."""

    def __init__(self, sim: Simulator, index: int, hosts: list[Host]):
        self.sim = sim
        self.index = index
        self.hosts = hosts
        self.proc: subprocess.Popen | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None
        self.restarts = 0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH"))
                                            if p)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet.simulator.pinger", str(child.fileno())],
                pass_fds=(child.fileno(),), cwd=str(ROOT), env=env,
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        reader, self.writer = await asyncio.open_unix_connection(sock=parent,
                                                                 limit=LINE_LIMIT)
        sim = self.sim
        self.send({
            "op": "start",
            "options": {"server": sim.server_url, "transport": sim.opts.transport,
                        "agent_key": sim.opts.agent_key,
                        "connect_concurrency": max(
                            1, sim.opts.connect_concurrency // max(1, len(sim.pingers))),
                        "seed": None if sim.opts.seed is None else sim.opts.seed + self.index,
                        "log_level": sim.opts.log_level, "nice": sim.opts.ping_nice},
            "hosts": [sim.host_message(h, must_connect=True) for h in self.hosts],
        })
        for h in self.hosts:  # a new ping process connects every host first anyway
            h.must_connect = False
        self.task = asyncio.get_running_loop().create_task(self._read(reader))

    def send(self, message: dict[str, Any]) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                self.sim.on_pinger_message(json.loads(line))
        except (ConnectionError, OSError, ValueError) as exc:
            log.error("ping process %d: %s", self.index + 1, exc)
        if self.sim._stopping:  # noqa: SLF001
            return
        code = self.proc.wait() if self.proc is not None else None
        for h in self.hosts:
            h.linked = False
        self.restarts += 1
        log.error("ping process %d exited (%s); starting it again for its %d hosts",
                  self.index + 1, code, len(self.hosts))
        await asyncio.sleep(1.0)
        if not self.sim._stopping:  # noqa: SLF001
            await self.start()

    async def stop(self, goodbye: bool) -> None:
        self.send({"op": "stop", "goodbye": goodbye})
        loop = asyncio.get_running_loop()
        end = loop.time() + (7.0 if goodbye else 3.0)
        while self.alive and loop.time() < end:
            await asyncio.sleep(0.05)
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            await loop.run_in_executor(None, self.proc.wait)
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, 1.0)
            except (TimeoutError, asyncio.CancelledError):
                pass
        if self.writer is not None:
            self.writer.close()


class Simulator:
    """A simulated fleet served on one port. Use from inside a running loop:
    ``await sim.start()`` … ``await sim.stop()``."""

    def __init__(self, options: Options | None = None, fleet: Fleet | None = None):
        self.opts = opts = options or Options()
        if opts.transport not in ("ws", "http"):
            raise ValueError(f"transport must be ws or http, not {opts.transport!r}")
        self.fleet = fleet or demo_fleet(
            hosts=opts.hosts, vms=opts.vms, ha_ratio=opts.ha_ratio, clusters=opts.clusters,
            cpus=opts.host_cpus, memory_mb=opts.host_memory_mb, seed=opts.seed,
        )
        for _, do in opts.faults:
            self.fleet.check(do)  # an unknown host or VM fails now, not later
        self.server_url = opts.server.rstrip("/")
        state_file = default_state_file() if opts.state_file is None else opts.state_file
        self.credentials = CredentialStore(state_file or None, self.server_url)
        self.stats = Stats()
        self.base_url = ""
        self.port = 0
        self.session: aiohttp.ClientSession | None = None
        self.registration: dict[str, Any] = {"state": "pending" if opts.api_token else "skipped"}
        self.server_known_vms: set[str] = set()  # names the server knew at start (adopt)
        self.started_at = 0.0
        self._runner: web.AppRunner | None = None
        self._background: set[asyncio.Task] = set()
        self._rng = random.Random(opts.seed)
        self._stopping = False
        self.connect_slots: asyncio.Semaphore | None = None  # POST /connect
        self.upgrade_slots: asyncio.Semaphore | None = None  # websocket upgrades
        # Agents in ping processes (Options.processes ≥ 1) rather than in this loop.
        self.use_pingers = opts.agents and opts.processes > 0
        self.pingers: list[PingProcess] = []
        self._shard: dict[str, PingProcess] = {}

    # --- URLs ---------------------------------------------------------------------
    def agent_url(self, name: str) -> str:
        return f"{self.base_url}/agents/{name}"

    def bmc_url(self, name: str) -> str:
        return f"{self.base_url}/bmc/{name}"

    @property
    def control_url(self) -> str:
        return f"{self.base_url}/control"

    # --- lifecycle ----------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = loop.time()
        self.connect_slots = asyncio.Semaphore(max(1, self.opts.connect_concurrency))
        self.upgrade_slots = asyncio.Semaphore(max(1, self.opts.connect_concurrency))
        self._runner = web.AppRunner(
            server.make_app(self), access_log=None, shutdown_timeout=1.0,
            handle_signals=False,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.opts.listen_host, self.opts.listen_port,
                           backlog=1024)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001
        self.port = sockets[0].getsockname()[1] if sockets else self.opts.listen_port
        host = self.opts.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        self.base_url = (self.opts.advertise or f"http://{host}:{self.port}").rstrip("/")
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False),
            headers={"User-Agent": "hadash-fleet-simulator"},
        )
        log.info(
            "simulating %d hosts and %d VMs at %s (agents %s/agents/NAME, BMCs %s/bmc/NAME, "
            "control %s); server %s, %s pings, VM start %.1f s",
            len(self.fleet.hosts), len(self.fleet.vm_specs), self.base_url, self.base_url,
            self.base_url, self.control_url, self.server_url, self.opts.transport,
            self.opts.start_delay,
        )
        if self.opts.agents and self.credentials.path is not None:
            restored = self.credentials.restore(self.fleet)
            log.info("agent credentials in %s: %d host(s) reconnect with their stored token",
                     self.credentials.path, restored)
        self.spawn(self._sampler())
        if self.opts.status_interval > 0:
            self.spawn(self._status_lines())
        if self.opts.agents:
            if self.opts.api_token:
                await api.adopt(self)
            if self.use_pingers:
                await self._start_pingers()
            else:
                for h in self.fleet.hosts.values():
                    self.sync_agent(h)
            if self.opts.api_token:
                self.spawn(api.register(self))
            else:
                log.info("no --api-token (or HADASH_API_TOKEN): the demo VMs and BMC settings "
                         "are not registered with the server")
        if self.opts.faults:
            self.spawn(self._scheduled_faults())

    async def stop(self) -> None:
        """Stop serving and pinging: within a couple of seconds."""
        if self._stopping:
            return
        self._stopping = True
        if self.pingers:
            await asyncio.gather(*(p.stop(self.opts.goodbye) for p in self.pingers))
        elif self.opts.goodbye and self.session is not None:
            await agents.goodbye_all(self)
        tasks = [h.task for h in self.fleet.hosts.values() if h.task is not None]
        tasks += list(self._background)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        for h in self.fleet.hosts.values():
            h.task = None
            h.linked = False
        if self.session is not None:
            await self.session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        log.info("simulator stopped")

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    # --- agents -------------------------------------------------------------------
    async def _start_pingers(self) -> None:
        hosts = list(self.fleet.hosts.values())
        n = max(1, min(self.opts.processes, len(hosts)))
        self.pingers = [PingProcess(self, i, hosts[i::n]) for i in range(n)]
        for p in self.pingers:
            for h in p.hosts:
                self._shard[h.name] = p
        await asyncio.gather(*(p.start() for p in self.pingers))
        log.info("pinging from %d process(es) (pids %s), %d hosts each at most", n,
                 ", ".join(str(p.proc.pid) for p in self.pingers if p.proc),
                 max(len(p.hosts) for p in self.pingers))

    def host_message(self, h: Host, must_connect: bool) -> dict[str, Any]:
        """A host as a ping process needs it (fleet.simulator.pinger)."""
        return {"name": h.name, "type": h.type, "cluster": h.cluster, "cpus": h.cpus,
                "memory_mb": h.memory_mb, "address": h.address,
                "agent_url": self.agent_url(h.name), "vms": h.vms,
                "reachable": h.reachable, "must_connect": must_connect,
                "token": h.token, "server_token": h.server_token, "host_id": h.host_id,
                "ping_interval": h.ping_interval}

    def changed(self, h: Host) -> None:
        """The host's VMs, reachability or must-connect changed: tell its ping
        process (nothing to do when the agents run in this loop)."""
        p = self._shard.get(h.name)
        if p is None:
            return
        p.send({"op": "host", "host": {"name": h.name, "vms": h.vms,
                                       "reachable": h.reachable,
                                       "must_connect": h.must_connect}})
        h.must_connect = False

    def on_pinger_message(self, message: dict[str, Any]) -> None:
        op = message.get("op")
        hosts = self.fleet.hosts
        if op == "stats":
            self.stats.merge(message.get("pings", 0), message.get("acks", 0),
                             message.get("errors", 0), message.get("late") or "",
                             message.get("missed", 0))
            for name, linked, last_ack, interval in message.get("hosts") or ():
                h = hosts.get(name)
                if h is None:
                    continue
                h.linked = bool(linked) and h.reachable
                h.last_ack = max(h.last_ack, float(last_ack))
                h.ping_interval = float(interval)
        elif op == "cred":
            h = hosts.get(message.get("name"))
            if h is None:
                return
            h.token, h.server_token = message.get("token"), message.get("server_token")
            h.host_id = message.get("host_id")
            try:
                self.credentials.save(h)
            except OSError as exc:
                log.error("%s: cannot store its credentials in %s (%s): a restarted "
                          "simulator will need an operator to re-enrol it", h.name,
                          self.credentials.path, exc)

    def sync_agent(self, h: Host) -> None:
        """Run the host's agent task exactly while the server could reach it."""
        if not self.opts.agents or self._stopping:
            return
        if self.use_pingers:
            if not h.reachable and h.linked:
                h.linked = False
                log.info("%s disconnected (%s)", h.name, self.why_unreachable(h))
            self.changed(h)
            return
        if agents.sync_task(self, h) and h.linked:
            h.linked = False
            log.info("%s disconnected (%s)", h.name, self.why_unreachable(h))

    @staticmethod
    def why_unreachable(h: Host) -> str:
        if not h.powered:
            return "powered off"
        if not h.agent_running:
            return "agent stopped"
        if not h.network_on:
            return "network off"
        return "reachable"

    # --- faults -------------------------------------------------------------------
    def apply_fault(self, do: str, source: str = "control API") -> list[Host]:
        """Apply a fault (in the loop's thread); raises state.FaultError."""
        touched = self.fleet.apply(do)
        log.info("fault: %s (%s)", " ".join(do.split()), source)
        for h in touched:
            self.sync_agent(h)
        return touched

    async def _scheduled_faults(self) -> None:
        loop = asyncio.get_running_loop()
        for at, do in sorted(self.opts.faults, key=lambda f: f[0]):
            delay = self.started_at + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                self.apply_fault(do, source=f"--fault at {at:g} s")
            except ValueError as exc:
                log.error("fault %r not applied: %s", do, exc)

    # --- status -------------------------------------------------------------------
    async def _sampler(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.stats.sample(loop.time())
            await asyncio.sleep(1.0)

    def health(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        hosts = self.fleet.hosts.values()
        vms_on = vms_off = starting = 0
        for h in hosts:
            starting += len(h.starting)
            for ps in h.vms.values():
                if ps == "PowerOn":
                    vms_on += 1
                else:
                    vms_off += 1
        return {
            "ok": True,
            "uptime_s": round(loop.time() - self.started_at, 1),
            "server": self.server_url,
            "url": self.base_url,
            "transport": self.opts.transport,
            "start_delay": self.opts.start_delay,
            "hosts": len(self.fleet.hosts),
            "hosts_powered": sum(h.powered for h in hosts),
            "hosts_reachable": sum(h.reachable for h in hosts),
            "hosts_connected": sum(h.linked and h.reachable for h in hosts),
            "vms_running": vms_on,
            "vms_powered_off": vms_off,
            "vms_starting": starting,
            "double_runs": self.fleet.double_runs(),
            "pings": self.stats.pings,
            "pings_per_s": round(self.stats.rate(), 1),
            "ping_acks": self.stats.acks,
            "ping_errors": self.stats.ping_errors,
            "ping_late_ms": self.stats.lateness_ms(),
            "ping_slots_missed": self.stats.slots_missed,
            "faults": self.fleet.fault_count,
            "registration": dict(self.registration),
            "rss_mb": rss_mb(),
            # The agents' ping processes (0: the agents run in this process's loop).
            "processes": len(self.pingers),
            "processes_alive": sum(p.alive for p in self.pingers),
            "processes_restarted": sum(p.restarts for p in self.pingers),
            "rss_mb_processes": [rss_mb(p.proc.pid) if p.alive and p.proc else None
                                 for p in self.pingers],
        }

    def status_line(self) -> str:
        hl = self.health()
        late = hl["ping_late_ms"]
        lateness = (f"late p50 {late['p50']} ms p99 {late['p99']} ms max {late['max']} ms"
                    if late["samples"] else "no pings yet")
        return (
            f"status: {hl['hosts_connected']}/{hl['hosts']} hosts connected "
            f"({hl['hosts'] - hl['hosts_reachable']} unreachable); "
            f"{hl['vms_running']} VMs running, {hl['vms_starting']} starting; "
            f"{hl['pings_per_s']} pings/s, {lateness}; RSS {hl['rss_mb']} MB"
            + (f" (+ {len(self.pingers)} ping processes "
               f"{sum(r or 0 for r in hl['rss_mb_processes']):.0f} MB)" if self.pingers else "")
        )

    async def _status_lines(self) -> None:
        while True:
            await asyncio.sleep(self.opts.status_interval)
            log.info("%s", self.status_line())

    def jitter(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)


class SimulatorThread:
    """A :class:`Simulator` on its own thread and event loop (tests, embedding)::

        with SimulatorThread(Options(listen_port=0, agents=False)) as st:
            st.url  # http://127.0.0.1:PORT
            st.call(st.sim.apply_fault, "host kvm-001 power off")
    """

    def __init__(self, options: Options | None = None, fleet: Fleet | None = None,
                 start_timeout: float = 15.0):
        self.sim = Simulator(options, fleet)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="fleet-simulator", daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._start_timeout = start_timeout

    @property
    def url(self) -> str:
        return self.sim.base_url

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.sim.start())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._loop.run_until_complete(self.sim.stop())
            self._loop.close()
            self._started.set()
            return
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.sim.stop())
        self._loop.close()

    def start(self) -> SimulatorThread:
        self._thread.start()
        if not self._started.wait(self._start_timeout):
            raise TimeoutError("the simulator did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def call(self, fn, *args, timeout: float = 10.0, **kwargs):
        """Run ``fn(*args, **kwargs)`` in the simulator's loop; its result (awaited if
        it is a coroutine)."""

        async def wrapper():
            result = fn(*args, **kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()

