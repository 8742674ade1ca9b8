"""Ping processes: the agents of a shard of the hosts, in a process of their own.

With ``--processes N`` (the command's default: one per 2,500 hosts, at least one) the
simulator's main process keeps the fleet's truth, the HTTP server (agents, BMCs,
control API), faults and registration, and starts N of these processes. Each runs the
agent loops of :mod:`.agents` — connect, the ping grid, the pong readers — for every
N-th host on its own event loop, so nothing the main process does (registration
requests, JSON for the control API, the engine's agent calls, fault storms, its garbage
collector) can hold back a ping.

They talk over a socket pair, one JSON object a line:

main → pinger
  ``{"op": "start", "options": {…}, "hosts": [host, …]}`` once, then
  ``{"op": "host", "host": host}`` whenever a host's reachability, VMs or "must connect"
  changed (a fault, a VM start/stop/migration), and ``{"op": "stop", "goodbye": bool}``.
  A host is ``{"name", "type", "cluster", "cpus", "memory_mb", "address", "agent_url",
  "vms": {name: power state}, "reachable", "must_connect", "token", "server_token",
  "host_id"}``.
pinger → main
  ``{"op": "cred", "name", "token", "server_token", "host_id"}`` as soon as a connect
  gave new credentials (the main process stores them and checks the server's calls
  with them), and every 0.25 s ``{"op": "stats", "pings", "acks", "errors", "late",
  "hosts": [[name, linked, last_ack, ping_interval], …]}``: counters since the last
  message, ``late`` the lateness samples since then (base64 of native doubles, in
  seconds), the hosts whose link or interval changed, and every second those
  whose last acknowledgement did. Times are ``time.monotonic()``, the same clock in
  every process.

A pinger ignores SIGINT and SIGTERM (its main process stops it) and exits when its
socket closes (the main process died).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import random
import signal
import socket
import sys
from array import array
from types import SimpleNamespace
from typing import Any

import aiohttp

from . import agents

log = logging.getLogger("fleet.simulator")

FLUSH_EVERY = 0.25  # seconds between stats messages
ACKS_EVERY = 4  # flushes between last_ack updates
LINE_LIMIT = 2**28  # one message a line; the start message carries the whole shard


class Host:
    """The agent's side of one host (what :mod:`.agents` reads and writes)."""

    def __init__(self, d: dict[str, Any]):
        self.name: str = d["name"]
        self.type: str = d.get("type", "Routing")
        self.cluster: str = d.get("cluster", "c1")
        self.cpus: int = d.get("cpus", 16)
        self.memory_mb: int = d.get("memory_mb", 65536)
        self.address: str = d.get("address", "")
        self.agent_url: str = d.get("agent_url", "")
        self.vms: dict[str, str] = dict(d.get("vms") or {})
        self._ping: str | None = None
        self.reachable: bool = bool(d.get("reachable", True))
        self.must_connect: bool = bool(d.get("must_connect", True))
        self.token: str | None = d.get("token")
        self.server_token: str | None = d.get("server_token")
        self.host_id: int | None = d.get("host_id")
        self.token_refused = False
        self.ping_interval: float = float(d.get("ping_interval") or 10.0)
        self.linked = False
        self.last_ack = 0.0
        self.task: asyncio.Task | None = None

    def update(self, d: dict[str, Any]) -> None:
        self.vms = dict(d.get("vms") or {})
        self._ping = None
        self.reachable = bool(d.get("reachable", True))
        if d.get("must_connect"):
            self.must_connect = True

    def power_report(self) -> list[dict[str, str]]:
        return [{"name": n, "power_state": s} for n, s in self.vms.items()]

    def ping_message(self) -> str:
        """The ping's JSON text, made again only when the VMs changed (here they
        change only by :meth:`update`)."""
        if self._ping is None:
            self._ping = json.dumps({"type": "ping", "vms": self.power_report()})
        return self._ping


class Stats:
    """Counters and lateness samples since the last stats message."""

    def __init__(self) -> None:
        self.pings = 0
        self.acks = 0
        self.ping_errors = 0
        self.slots_missed = 0
        self.late = array("d")

    def ping(self, late: float) -> None:
        self.pings += 1
        self.late.append(late if late > 0 else 0.0)

    def missed(self, late: float) -> None:
        """A slot skipped after a stall: a lateness sample, not a ping."""
        self.slots_missed += 1
        self.late.append(late if late > 0 else 0.0)

    def take(self) -> dict[str, Any]:
        out = {"pings": self.pings, "acks": self.acks, "errors": self.ping_errors,
               "missed": self.slots_missed,
               "late": base64.b64encode(self.late.tobytes()).decode()}
        self.pings = self.acks = self.ping_errors = self.slots_missed = 0
        self.late = array("d")
        return out


class Credentials:
    """:class:`.state.CredentialStore`'s ``save``, done by the main process."""

    path = "the main process's state file"

    def __init__(self, pinger: Pinger):
        self.pinger = pinger

    def save(self, h: Host) -> None:
        self.pinger.send({"op": "cred", "name": h.name, "token": h.token,
                          "server_token": h.server_token, "host_id": h.host_id})


class Pinger:
    """What :mod:`.agents` expects of a simulator (``session``, ``connect_slots``,
    ``upgrade_slots``, ``opts``, ``server_url``, ``stats``, ``credentials``,
    ``jitter``, ``agent_url``), for the hosts of one shard."""

    def __init__(self, options: dict[str, Any], hosts: list[dict[str, Any]],
                 writer: asyncio.StreamWriter):
        self.opts = SimpleNamespace(
            transport=options.get("transport", "ws"),
            agent_key=options.get("agent_key", ""),
            connect_concurrency=int(options.get("connect_concurrency", 20)),
        )
        self.server_url = str(options["server"]).rstrip("/")
        self.hosts = {d["name"]: Host(d) for d in hosts}
        self.writer = writer
        self.stats = Stats()
        self.credentials = Credentials(self)
        self.session: aiohttp.ClientSession | None = None
        self.connect_slots: asyncio.Semaphore | None = None  # POST /connect
        self.upgrade_slots: asyncio.Semaphore | None = None  # websocket upgrades
        self._rng = random.Random(options.get("seed"))
        self._stopping = False
        self._sent: dict[str, tuple] = {}

    def agent_url(self, name: str) -> str:
        return self.hosts[name].agent_url

    def jitter(self, low: float, high: float) -> float:
        return self._rng.uniform(low, high)

    def send(self, message: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def start(self) -> None:
        self.connect_slots = asyncio.Semaphore(max(1, self.opts.connect_concurrency))
        self.upgrade_slots = asyncio.Semaphore(max(1, self.opts.connect_concurrency))
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=False),
            headers={"User-Agent": "hadash-fleet-simulator"},
        )
        for h in self.hosts.values():
            self.sync(h)

    def sync(self, h: Host) -> None:
        """Run the host's agent task exactly while the server could reach it."""
        if self._stopping:
            return
        if agents.sync_task(self, h):
            h.linked = False

    def on_message(self, message: dict[str, Any]) -> bool:
        """Apply one message from the main process; False on stop."""
        op = message.get("op")
        if op == "host":
            d = message["host"]
            h = self.hosts.get(d["name"])
            if h is not None:
                h.update(d)
                self.sync(h)
        elif op == "stop":
            return False
        return True

    async def flush_forever(self) -> None:
        n = 0
        while True:
            await asyncio.sleep(FLUSH_EVERY)
            n += 1
            self.flush(with_acks=n % ACKS_EVERY == 0)

    def flush(self, with_acks: bool) -> None:
        changed = []
        sent = self._sent
        for h in self.hosts.values():
            now = (h.linked, h.ping_interval)
            old = sent.get(h.name)
            if old is None or old[:2] != now or (with_acks and old[2] != h.last_ack):
                sent[h.name] = (*now, h.last_ack)
                changed.append([h.name, h.linked, h.last_ack, h.ping_interval])
        message = {"op": "stats", **self.stats.take(), "hosts": changed}
        self.send(message)

    async def stop(self, goodbye: bool) -> None:
        self._stopping = True
        if goodbye and self.session is not None:
            await agents.goodbye_all(self)
        tasks = [h.task for h in self.hosts.values() if h.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.5)
        for h in self.hosts.values():
            h.linked = False
        self.flush(with_acks=True)
        if self.session is not None:
            await self.session.close()

    # goodbye_all reads sim.fleet.hosts
    @property
    def fleet(self) -> SimpleNamespace:
        return SimpleNamespace(hosts=self.hosts)


async def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
    first = await reader.readline()
    if not first:
        return
    start = json.loads(first)
    logging.basicConfig(stream=sys.stdout, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    log.setLevel(int(start["options"].get("log_level", logging.INFO)))
    nice = int(start["options"].get("nice", 0))
    if nice:
        # Simulated hosts are machines of their own: on a shared, busy box the agents
        # run ahead of the server, the database and other work, and use little CPU.
        try:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
        except OSError as exc:
            log.info("ping process %d: cannot set its priority to %d (%s); pinging at "
                     "the default priority", os.getpid(), nice, exc)
    pinger = Pinger(start["options"], start["hosts"], writer)
    await pinger.start()
    # Everything built so far lives as long as the process: keep it out of the
    # collector's full passes, and make those rarer (a full pass over ten thousand
    # hosts' tasks and sockets would hold back every ping of the shard).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    flusher = asyncio.get_running_loop().create_task(pinger.flush_forever())
    goodbye = False
    try:
        while line := await reader.readline():
            message = json.loads(line)
            if not pinger.on_message(message):
                goodbye = bool(message.get("goodbye"))
                break
    finally:
        flusher.cancel()
        await pinger.stop(goodbye)
        try:
            await writer.drain()
            writer.close()
        except (ConnectionError, OSError):
            pass


def main(argv: list[str]) -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the main process stops us
    fd = int(argv[1])
    try:
        asyncio.run(serve(fd))
    except (ConnectionError, OSError) as exc:
        log.error("ping process %d: lost its main process (%s)", os.getpid(), exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
