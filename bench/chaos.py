"""``python manage.py chaos``: the whole system under random faults, checked against
SPEC §6 while it runs (issue 8, part 10; docs/reliability.md).

What runs — real processes on PostgreSQL, with Redis as the channel layer, started
through :class:`bench.system.System` on a fresh database:

* two daphne web processes behind :class:`Front`, a small TCP load balancer (as haproxy
  would be): the simulator's agents, the operator API and the dashboard client connect
  through it, and a connection lives and dies with the web process it landed on;
* two django-q clusters (``qcluster``) running the engine loops;
* the fleet simulator (default 30 hosts, 300 VMs, half of them HA);
* :class:`LiveClient`, a logged-in dashboard following ``/ws/events`` the way
  ``dashboard/static/dashboard/live.js`` does (watermark, reconnect with back-off,
  resume with ``?after=``).

What happens — a seeded plan (:func:`make_plan`, the seed is printed) of machine faults
through the simulator's control API (host power off/on, agent stop/start, network
off/on, BMC failures, start failures, VM crash and vanish; every host fault healed
again after a while), kill -9 of a web process (the one serving the dashboard's
socket, or either) and of an engine process group (the one holding the sweeper lease,
or either), each restarted a few seconds later, every connection to the run's database
cut now and then (``pg_terminate_backend``: what a PostgreSQL restart does to its
clients, without touching the server), and with ``--long`` PostgreSQL restarts. Then a
settle phase: every fault healed, every process up, until the fleet is quiet.

What is checked (:class:`Watch` samples throughout; the rest is read at the end):

* double runs — a VM powered on on two powered hosts at once: sampled from the
  simulator's truth (``GET /control/hosts``) every half second, plus every
  "double run!" the simulator logs when a start completes on a second host (exact),
  plus *overlapping starts* — a start under way on one host while the VM runs or
  starts on another (the moment two workers, or a worker and a live copy, collide);
* HA items processed twice — each item's step events must form one chain (each
  event's ``old`` is the previous event's ``new``, nothing after a final step, the
  last event's ``new`` is the item's step): a second worker acting on a stale copy
  breaks it — and HA items lost: after the settle, every HA VM must run exactly once
  (Running in the database, powered on on exactly that host); one that does not is
  *lost* (no unfinished item and the last one is not Error), *stuck* (an unfinished
  item) or *gave up* (its item ended in Error, R12.5);
* events missed by the dashboard — every event id in the table after the start must
  have reached the live client; its delivery latency (received − the event's
  ``time``) is reported, not judged (the event's time is the engine's clock when the
  step began, not the commit);
* sweeper gaps — the longest interval between two renewals of the sweeper lease
  (``GET /api/v1/engine``: a renewal is ``expires − SWEEPER_TTL``; the sweeper renews
  before every sweep), and how long any HA item stayed taken by one worker.

Any violation makes the command exit non-zero; the figures are printed either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import signal
import subprocess
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from hadash.supervisor import Child, live_members, wait_for_port

from .common import (
    BenchError,
    fmt,
    interruptible,
    machine_info,
    percentile,
    say,
    table,
    throwaway_database,
)
from .system import System, parse_time

# The engine's timings, shortened as in the end-to-end tests (tests/conftest.py).
CONFIG = {"ping.interval": "2", "ping.timeout": "2",
          "investigate.retry.interval": "5", "restart.retry.interval": "5"}
FINAL_STEPS = ("Done", "Cancelled", "Error")
DOUBLE_RUN_LINE = re.compile(r"(\S+): VM (\S+) started here while it runs on (.+?) \(double run")
PG_RESTART = ["pg_ctlcluster", "--skip-systemctl-redirect", "{version}", "main", "restart"]


# --- the load balancer in front of the web processes -------------------------------------

class Front:
    """A TCP load balancer for the web processes, as haproxy or nginx would be in
    production: each new connection goes to the next web process that accepts it
    (round robin, skipping one that refuses), and lives and dies with it."""

    def __init__(self, ports: list[int]):
        from hadash.supervisor import free_port

        self.backends = list(ports)
        self.port = free_port()
        self.connections = 0
        self.refused = 0
        self._next = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self.routes: dict[int, int] = {}  # client's port → web port, of open connections
        self._server: asyncio.base_events.Server | None = None
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True,
                                       name="chaos-front")
        self.thread.start()
        if not ready.wait(10):
            raise BenchError("the load balancer did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        ready.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream = None
        try:
            for _ in range(len(self.backends)):
                port = self.backends[self._next % len(self.backends)]
                self._next += 1
                try:
                    upstream = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 3)
                    break
                except (OSError, TimeoutError):
                    self.refused += 1
            if upstream is None:
                return
            self.connections += 1
            client_port = writer.get_extra_info("peername")[1]
            self.routes[client_port] = port
            up_reader, up_writer = upstream
            self._writers.add(up_writer)
            pipes = [asyncio.ensure_future(_pipe(reader, up_writer)),
                     asyncio.ensure_future(_pipe(up_reader, writer))]
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for p in pipes:
                    p.cancel()
                up_writer.close()
                self._writers.discard(up_writer)
                self.routes.pop(client_port, None)
        finally:
            writer.close()
            self._writers.discard(writer)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()  # the pipes see the end and their connections finish
            await asyncio.sleep(0.2)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


# --- the live dashboard ---------------------------------------------------------------------

def login(base_url: str, username: str, password: str) -> str:
    """Log in through the dashboard's login form; the session cookie's value."""
    with httpx.Client(base_url=base_url, timeout=30, trust_env=False) as http:
        page = http.get("/login/")
        m = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text)
        if page.status_code != 200 or m is None:
            raise BenchError(f"GET /login/: HTTP {page.status_code}, no CSRF token")
        r = http.post("/login/", data={"username": username, "password": password,
                                       "csrfmiddlewaretoken": m.group(1)},
                      headers={"Referer": f"{base_url}/login/"})
        session = http.cookies.get("sessionid")
        if r.status_code not in (200, 302) or not session:
            raise BenchError(f"logging in as {username} failed: HTTP {r.status_code}")
        return session


class LiveClient:
    """A dashboard page's live feed (dashboard/static/dashboard/live.js): one websocket
    to ``/ws/events?after=<watermark>``; keeps the highest watermark the server sent
    and every event id it received (with the time it arrived); on a drop reconnects
    with exponential back-off (0.5 s doubling to 15 s, ±20 % jitter, reset once a
    message arrives) and resumes from its watermark."""

    def __init__(self, base_url: str, session: str, after: int):
        self.base_url = base_url
        self.url = base_url.replace("http://", "ws://", 1) + "/ws/events"
        self.session = session
        self.watermark = after
        self.received: dict[int, float] = {}  # event id → POSIX time it arrived
        self.times: dict[int, str] = {}  # event id → its `time`
        self.duplicates = 0
        self.connects = 0
        self.drops = 0
        self.reloads: list[tuple[int, int]] = []
        self.errors: Counter = Counter()
        self.state = "connecting"
        self.local_port = 0  # of the open socket: which web process serves it (Front.routes)
        self._jitter = random.Random()
        self._task: asyncio.Task | None = None
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos-live")

    def start(self) -> LiveClient:
        self.thread.start()
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self._task = self.loop.create_task(self._follow())
        with contextlib.suppress(asyncio.CancelledError):
            self.loop.run_until_complete(self._task)

    async def _follow(self) -> None:
        import aiohttp

        backoff = 0.5
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            while True:
                live = False
                try:
                    ws = await asyncio.wait_for(http.ws_connect(
                        f"{self.url}?after={self.watermark}", origin=self.base_url,
                        headers={"Cookie": f"sessionid={self.session}"}), 15)
                    async with ws:
                        sockname = ws.get_extra_info("sockname")
                        self.local_port = sockname[1] if sockname else 0
                        async for msg in ws:
                            if msg.type != aiohttp.WSMsgType.TEXT:
                                continue
                            if not live:
                                live, backoff = True, 0.5
                                self.connects += 1
                                self.state = "live"
                            self._message(json.loads(msg.data), time.time())
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    self.errors[type(exc).__name__] += 1
                if live:
                    self.drops += 1
                self.state = "reconnecting"
                wait = min(15.0, backoff) * (0.8 + self._jitter.random() * 0.4)
                backoff = min(15.0, backoff * 2)
                await asyncio.sleep(wait)

    def _message(self, msg: dict, now: float) -> None:
        mark = msg.get("watermark")
        if msg.get("type") == "reload":
            # Too much missed to replay: the page would render the present afresh.
            self.reloads.append((self.watermark, int(mark or 0)))
        elif msg.get("type") == "events":
            for ev in msg.get("events") or []:
                if ev["id"] in self.received:
                    self.duplicates += 1
                    continue
                self.received[ev["id"]] = now
                self.times[ev["id"]] = ev.get("time") or ""
        if isinstance(mark, int) and mark > self.watermark:
            self.watermark = mark

    def stop(self) -> None:
        if self._task is not None:
            self.loop.call_soon_threadsafe(self._task.cancel)
        self.thread.join(10)


# --- logs of the processes ------------------------------------------------------------------

class LogTap(list):
    """Stands in for a supervised child's ``log`` list (the supervisor appends every
    line of its output): counts lines and tracebacks per process name, hands every
    line to ``on_line`` and, with a ``log_dir``, appends it to ``<name>.log`` there."""

    def __init__(self, name: str, lines: list[str], counts: dict[str, Counter], on_line=None,
                 log_dir: Path | None = None):
        super().__init__(lines)
        self.name, self.counts, self.on_line = name, counts, on_line
        self.sink = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            self.sink = open(log_dir / f"{name}.log", "a", buffering=1)  # noqa: SIM115
            self.sink.write(f"---- {time.strftime('%H:%M:%S')} {name} started\n")
        for line in lines:
            self._see(line)

    def append(self, line: str) -> None:
        super().append(line)
        self._see(line)

    def _see(self, line: str) -> None:
        c = self.counts.setdefault(self.name, Counter())
        c["lines"] += 1
        if line.startswith("Traceback (most recent call last)"):
            c["tracebacks"] += 1
        if " ERROR " in line or " CRITICAL " in line:
            c["errors"] += 1
        if self.on_line is not None:
            self.on_line(line)
        if self.sink is not None:
            self.sink.write(line + "\n")


def tap(child: Child, counts: dict[str, Counter], on_line=None,
        log_dir: Path | None = None) -> None:
    if not isinstance(child.log, LogTap):
        child.log = LogTap(child.name, list(child.log), counts, on_line, log_dir)


# --- watching the system ----------------------------------------------------------------------

class Watch:
    """Samples the simulator's truth (double runs, overlapping starts) every
    ``truth_every`` s, the engine (sweeper lease renewals, HA items held) every
    ``engine_every`` s, and the event table every ``table_every`` s (when each event
    became visible, i.e. committed: the start of its delivery to the dashboard) —
    each in its own thread with its own connections."""

    def __init__(self, system: System, truth_every: float = 0.5, engine_every: float = 1.0,
                 table_every: float = 0.1):
        from hadash.ha.runtime import SWEEPER_TTL

        self.ttl = SWEEPER_TTL.total_seconds()
        self.control = httpx.Client(base_url=system.control.base_url,
                                    headers=system.control.headers, timeout=5,
                                    trust_env=False)
        self.api = httpx.Client(base_url=system.api.base_url, headers=system.api.headers,
                                timeout=5, trust_env=False)
        self.truth_every, self.engine_every = truth_every, engine_every
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        # (vm, hosts) → {"first", "last", "samples"}
        self.double: dict[tuple[str, tuple[str, ...]], dict] = {}
        self.overlap: dict[tuple[str, tuple[str, ...]], dict] = {}
        self.logged_double: list[dict] = []
        self.truth = {"samples": 0, "errors": 0, "blind_max": 0.0}
        self.engine = {"samples": 0, "errors": 0, "blind_max": 0.0}
        self.renewals: list[tuple[float, str]] = []  # (renewed at, holder)
        self.holds: dict[tuple[int, str], dict] = {}  # (item id, taken) → …
        self.open_items = 0
        self.faulty_hosts = 0
        self.db_url = system.db.url
        self.visible: dict[int, float] = {}  # event id → POSIX time first seen committed
        self.table = {"samples": 0, "errors": 0, "blind_max": 0.0}
        self._conn = None
        self.threads = [threading.Thread(target=self._loop, args=(self._table, table_every,
                                                                  self.table), daemon=True,
                                         name="chaos-events"),
                        threading.Thread(target=self._loop, args=(self._truth, truth_every,
                                                                  self.truth), daemon=True,
                                         name="chaos-truth"),
                        threading.Thread(target=self._loop, args=(self._engine, engine_every,
                                                                  self.engine), daemon=True,
                                         name="chaos-engine")]

    def start(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(10)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self.control.close()
        self.api.close()

    def _loop(self, sample, every: float, stats: dict) -> None:
        last_ok = time.monotonic()
        while not self.stopping.is_set():
            t = time.monotonic()
            try:
                sample()
            except (httpx.HTTPError, ValueError, KeyError, TypeError):
                with self.lock:
                    stats["errors"] += 1
            else:
                with self.lock:
                    stats["samples"] += 1
                    stats["blind_max"] = max(stats["blind_max"], t - last_ok)
                last_ok = t
            self.stopping.wait(max(0.0, every - (time.monotonic() - t)))

    def simulator_line(self, line: str) -> None:
        if m := DOUBLE_RUN_LINE.search(line):
            with self.lock:
                self.logged_double.append({"vm": m.group(2), "started_on": m.group(1),
                                           "runs_on": m.group(3), "at": time.time()})

    # the simulator's truth
    def _truth(self) -> None:
        r = self.control.get("/hosts")
        r.raise_for_status()
        hosts = r.json()
        now = time.time()
        on: dict[str, list[str]] = {}
        starting: dict[str, list[str]] = {}
        faulty = 0
        for h in hosts:
            faulty += not (h["powered"] and h["agent"] and h["network"])
            if not h["powered"]:
                continue
            for v in h.get("vms", []):
                if v["power_state"] == "PowerOn":
                    on.setdefault(v["name"], []).append(h["name"])
            for name in h.get("starting", []):
                starting.setdefault(name, []).append(h["name"])
        with self.lock:
            self.faulty_hosts = faulty
            for vm, where in on.items():
                if len(where) > 1:
                    self._note(self.double, vm, where, now)
            for vm, where in starting.items():
                elsewhere = set(where) | set(on.get(vm, []))
                if len(elsewhere) > 1:
                    self._note(self.overlap, vm, sorted(elsewhere), now)

    @staticmethod
    def _note(book: dict, vm: str, where: list[str], now: float) -> None:
        key = (vm, tuple(sorted(where)))
        seen = book.setdefault(key, {"vm": vm, "hosts": list(key[1]), "first": now,
                                     "last": now, "samples": 0})
        seen["last"] = now
        seen["samples"] += 1

    # the event table: when each event became visible (committed)
    def _table(self) -> None:
        import psycopg

        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.db_url, autocommit=True, connect_timeout=3)
            # Ids are handed out before commit: a lower id may commit after a higher
            # one, so look back a little behind the highest id seen.
            floor = max(self.visible, default=0) - 300
            rows = self._conn.execute("SELECT id FROM event WHERE id > %s", (floor,)).fetchall()
        except psycopg.Error as exc:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()
            self._conn = None
            raise ValueError(str(exc)) from None
        now = time.time()
        with self.lock:
            for (i,) in rows:
                self.visible.setdefault(i, now)

    # the engine: sweeper lease and HA items held
    def _engine(self) -> None:
        r = self.api.get("/engine")
        r.raise_for_status()
        sweeper = r.json()["sweeper"]
        w = self.api.get("/ha-work", params={"finished": "false", "limit": 10000})
        w.raise_for_status()
        now = time.time()
        with self.lock:
            if sweeper.get("expires"):
                renewed = parse_time(sweeper["expires"]) - self.ttl
                if not self.renewals or renewed > self.renewals[-1][0] + 1e-3:
                    self.renewals.append((renewed, sweeper.get("holder") or ""))
            items = w.json()
            self.open_items = len(items)
            for item in items:
                if not item.get("taken"):
                    continue
                key = (item["id"], item["taken"])
                hold = self.holds.setdefault(key, {
                    "item": item["id"], "vm": item["vm"], "by": item["taken_by"],
                    "taken": parse_time(item["taken"]), "last": now})
                hold["last"] = now

    # figures
    def sweeper_gaps(self, t0: float) -> list[dict]:
        """Intervals between consecutive lease renewals after ``t0``, longest first."""
        with self.lock:
            renewals = [r for r in self.renewals if r[0] >= t0 - self.ttl]
        gaps = [{"seconds": round(b[0] - a[0], 2), "from": a[1], "to": b[1],
                 "after_s": round(a[0] - t0, 1)}
                for a, b in zip(renewals, renewals[1:], strict=False)]
        return sorted(gaps, key=lambda g: -g["seconds"])

    def longest_hold(self) -> dict | None:
        with self.lock:
            holds = [dict(h, seconds=round(h["last"] - h["taken"], 1))
                     for h in self.holds.values()]
        return max(holds, key=lambda h: h["seconds"], default=None)


# --- the plan ------------------------------------------------------------------------------------

@dataclass
class Step:
    at: float  # seconds after the chaos began
    kind: str  # fault | kill | db-cut | pg-restart | pg-failover
    what: str  # the fault (scenario vocabulary), or the process: web1, engine:sweeper …
    after: float = 0.0  # kill: restart the process this many seconds later

    def __str__(self) -> str:
        if self.kind == "kill":
            return f"kill -9 {self.what} (restart after {self.after:.0f} s)"
        if self.kind == "pg-restart":
            return "restart PostgreSQL"
        if self.kind == "pg-failover":
            return "kill the PostgreSQL primary, promote the standby"
        if self.kind == "db-cut":
            return "cut every connection to the database"
        return self.what


# weights of the machine faults; host faults are healed again after `hold` seconds
MACHINE_FAULTS = {
    "power off": (22, "power on", (10, 40)),
    "agent stop": (14, "agent start", (5, 30)),
    "network off": (14, "network on", (5, 30)),
    "bmc fail": (10, "ok", (10, 60)),
    "start-fail 1": (10, "start-fail 0", (10, 30)),
    "vm crash": (18, "", (0, 0)),
    "vm vanish": (12, "", (0, 0)),
}


def make_plan(seed: int, *, duration: float, hosts: list[str], vms: list[str],
              fault_every: float, kill_every: float, pg_restarts: int,
              webs: list[str], engines: list[str], clusters: int = 1,
              db_cut_every: float = 0.0, pg_failovers: int = 0) -> list[Step]:
    """The whole run's faults, from ``seed`` alone: machine faults about every
    ``fault_every`` s (exponential gaps); at once at most a fifth of the hosts (at
    least 2) and a third of a cluster's (at least 1) down, cut off or without agent,
    so the mass-failure brake (R14: more than half of a cluster) is not what the run
    measures; a web and an engine kill about every ``kill_every`` s each; every
    connection to the database cut about every ``db_cut_every`` s; and
    ``pg_restarts`` PostgreSQL restarts and ``pg_failovers`` failovers (the primary
    killed, the standby promoted: ``--pg-failovers``) spread over the run. ``hosts`` in the
    simulator's order: it deals them round-robin to ``clusters`` clusters."""
    rng = random.Random(seed)
    steps: list[Step] = []
    max_faulty = max(2, len(hosts) // 5) if len(hosts) >= 6 else 1
    cluster_of = {h: i % clusters for i, h in enumerate(hosts)}
    per_cluster = max(1, len(hosts) // clusters // 3)
    busy: dict[str, float] = {}  # host → when its host fault heals
    bmc_busy: dict[str, float] = {}
    fail_busy: dict[str, float] = {}
    names = list(MACHINE_FAULTS)
    weights = [MACHINE_FAULTS[n][0] for n in names]
    t = rng.uniform(1.0, fault_every)
    while t < duration:
        kind = rng.choices(names, weights)[0]
        heal, hold = MACHINE_FAULTS[kind][1], MACHINE_FAULTS[kind][2]
        until = t + rng.uniform(*hold)
        if kind.startswith("vm "):
            steps.append(Step(round(t, 2), "fault", f"vm {rng.choice(vms)} {kind[3:]}"))
        else:
            book = {"bmc fail": bmc_busy, "start-fail 1": fail_busy}.get(kind, busy)
            down = [h for h in hosts if busy.get(h, -1.0) > t]
            free = [h for h in hosts if book.get(h, -1.0) <= t and (book is not busy or sum(
                1 for d in down if cluster_of[d] == cluster_of[h]) < per_cluster)]
            if free and (book is not busy or len(down) < max_faulty):
                host = rng.choice(free)
                book[host] = until
                prefix, what = ("bmc", "fail") if kind == "bmc fail" else ("host", kind)
                steps.append(Step(round(t, 2), "fault", f"{prefix} {host} {what}"))
                if until < duration:
                    steps.append(Step(round(until, 2), "fault", f"{prefix} {host} {heal}"))
                else:
                    book[host] = float("inf")  # healed in the settle phase
        t += rng.expovariate(1.0 / fault_every)
    if kill_every > 0:
        for first, targets, restart in ((0.4, webs, (1, 5)), (0.8, engines, (2, 8))):
            t = kill_every * rng.uniform(first - 0.1, first + 0.1)
            while t < duration - 3:
                if targets is engines and rng.random() < 0.6:
                    what = "engine:sweeper"  # whichever engine holds the sweeper lease
                elif targets is webs and rng.random() < 0.5:
                    what = "web:dashboard"  # the one serving the live dashboard's socket
                else:
                    what = rng.choice(targets)
                steps.append(Step(round(t, 2), "kill", what, round(rng.uniform(*restart), 1)))
                t += kill_every * rng.uniform(0.8, 1.2)
    if db_cut_every > 0:
        t = db_cut_every * rng.uniform(0.4, 0.7)
        while t < duration - 3:
            steps.append(Step(round(t, 2), "db-cut", "database"))
            t += db_cut_every * rng.uniform(0.8, 1.2)
    for k in range(pg_restarts):
        at = duration * (k + 1) / (pg_restarts + 1) + rng.uniform(-10, 10)
        steps.append(Step(round(min(max(at, 5.0), duration - 5), 2), "pg-restart", "postgresql"))
    for k in range(pg_failovers):  # evenly: each needs its new standby before the next
        at = duration * (k + 1) / (pg_failovers + 1)
        steps.append(Step(round(min(max(at, 5.0), duration - 5), 2), "pg-failover",
                          "postgresql"))
    return sorted(steps, key=lambda s: s.at)


# --- the run --------------------------------------------------------------------------------

def run(o: dict[str, Any]) -> dict[str, Any]:
    _check_redis(o["redis"])
    if o["long"] and not os.path.isdir("/etc/postgresql"):
        raise BenchError("--long restarts PostgreSQL with pg_ctlcluster: /etc/postgresql "
                         "is missing (PostgreSQL must run on this machine)")
    if o.get("pg_failovers"):
        from .pgha import ha_database

        if o["long"]:
            raise BenchError("--pg-failovers runs its own PostgreSQL pair: no --long")
        database = ha_database(o)
    else:
        database = throwaway_database({**o, "allow_sqlite": False})
    with interruptible(), database as (db, tmp):
        return Chaos(o, db, tmp).run()


def _check_redis(url: str) -> None:
    import redis

    try:
        redis.Redis.from_url(url, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise BenchError(f"Redis at {url} does not answer ({exc}); the chaos run uses it "
                         "as the channel layer (--redis)") from None


class Chaos:
    def __init__(self, o: dict[str, Any], db, tmp: Path):
        self.o = o
        self.db = db
        self.tmp = tmp
        self.seed = o["seed"] if o["seed"] is not None else secrets.randbelow(10 ** 6)
        env = {"REDIS_URL": o["redis"], "SECRET_KEY": secrets.token_urlsafe(50),
               "HADASH_AGENT_KEY": secrets.token_urlsafe(32)}
        self.system = System(db, tmp, verbose=o["verbose"], config=CONFIG, env=env)
        self.front: Front | None = None
        self.live: LiveClient | None = None
        self.watch: Watch | None = None
        self.logs: dict[str, Counter] = {}
        self.log_dir = Path(o["log_dir"]) if o.get("log_dir") else None
        self.killed: set[int] = set()  # pids we killed (their exit is expected)
        self.kills: list[dict] = []
        self.pg_restarts: list[dict] = []
        self.db_cuts: list[dict] = []
        self.failovers: list[dict] = []  # --pg-failovers
        self.canary = None  # bench.pgha.Canary, with --pg-failovers
        self._rebuilding: threading.Thread | None = None
        self.ping_counts: dict = {}
        self.unexpected: list[dict] = []
        self.faults: list[dict] = []
        self.fault_errors: list[str] = []
        self.restarts: list[tuple[float, Child, dict]] = []  # (due, child, kill record)
        self.t0 = 0.0  # monotonic start of the chaos
        self.t0_wall = 0.0

    # set-up
    def _front(self, ports: list[int]) -> int:
        self.front = Front(ports)
        return self.front.port

    def run(self) -> dict[str, Any]:
        system = self.system
        say(f"chaos seed {self.seed} (python manage.py chaos --seed {self.seed} … repeats "
            "the plan)")
        info = machine_info(self.db)
        with system:
            try:
                return self._run(info)
            finally:
                for stop in (self.live and self.live.stop, self.watch and self.watch.stop,
                             self.front and self.front.close,
                             self.canary and self.canary.stop):
                    if stop:
                        with contextlib.suppress(Exception):
                            stop()

    def _run(self, info: dict) -> dict[str, Any]:
        o, system = self.o, self.system
        system.start(hosts=o["hosts"], vms=o["vms"], ha_ratio=0.5, clusters=o["clusters"],
                     start_delay=o["start_delay"], web_processes=2, engine_processes=2,
                     front=self._front)
        self.watch = Watch(system)
        for child in system.sup.children:
            tap(child, self.logs, self.watch.simulator_line if child.name == "fleet" else None,
                self.log_dir)
        ready = system.wait_ready(timeout=300 + o["vms"] * 0.5)
        say(f"fleet ready in {ready:.0f} s: {o['hosts']} hosts Up, {o['vms']} VMs Running")
        base = f"http://127.0.0.1:{system.web_port}"
        password = secrets.token_urlsafe(16)
        from .common import manage

        manage(system.env, "shell", "-c",
               "from django.contrib.auth import get_user_model as g; "
               f"g().objects.create_user('chaos-watch', password='{password}')")
        start_id = system.last_event_id()
        self.live = LiveClient(base, login(base, "chaos-watch", password), start_id).start()
        self.watch.start()
        if o.get("pg_failovers"):
            from .pgha import Canary

            self.canary = Canary(self.db).start()
        hosts = sorted(h["name"] for h in system.get("/hosts", limit=10000))
        vms = sorted(v["name"] for v in system.get("/vms", limit=10000))
        engines = [c.name for c in system.sup.children if c.name.startswith("engine")]
        webs = [c.name for c in system.sup.children if c.name.startswith("web")]
        pg = max(1, round(o["duration"] / 200)) if o["long"] else 0
        plan = make_plan(self.seed, duration=o["duration"], hosts=hosts, vms=vms,
                         fault_every=o["fault_every"], kill_every=o["kill_every"],
                         pg_restarts=pg, webs=webs, engines=engines,
                         clusters=o["clusters"], db_cut_every=o["db_cut_every"],
                         pg_failovers=o.get("pg_failovers") or 0)
        say(f"plan: {sum(s.kind == 'fault' for s in plan)} machine faults and heals, "
            f"{sum(s.kind == 'kill' for s in plan)} kills, "
            f"{sum(s.kind == 'db-cut' for s in plan)} database cuts, "
            f"{sum(s.kind == 'pg-failover' for s in plan)} PostgreSQL failovers, {pg} "
            "PostgreSQL restart(s) over "
            f"{o['duration']:.0f} s")
        if o.get("pg_failovers"):
            self.db.pair.standby_ready()
        time.sleep(2)  # the live client connects
        self.t0, self.t0_wall = time.monotonic(), time.time()
        self.ping_counts["start"] = self._pings()
        self._play(plan)
        self._rebuilt()
        say("chaos over: healing every fault, restarting what is down, settling …")
        settle = self._settle()
        self.ping_counts["end"] = self._pings()
        events = self._catch_up(start_id)
        return self._figures(info, plan, events, settle)

    def _child(self, name: str) -> Child:
        for c in self.system.sup.children:
            if c.name == name:
                return c
        raise BenchError(f"no process {name!r}")

    # the plan
    def _play(self, plan: list[Step]) -> None:
        shown = 0.0
        for step in [*plan, Step(self.o["duration"], "end", "")]:
            while (now := time.monotonic() - self.t0) < step.at:
                self._housekeeping()
                if now - shown >= self.o["progress_every"]:
                    shown = now
                    say(self._progress(now))
                time.sleep(min(0.2, max(0.0, step.at - now)))
            if step.kind == "fault":
                self._fault(step.what)
            elif step.kind == "kill":
                self._kill(step)
            elif step.kind == "db-cut":
                self._db_cut()
            elif step.kind == "pg-restart":
                self._pg_restart()
            elif step.kind == "pg-failover":
                self._pg_failover()

    def _since(self) -> float:
        return round(time.monotonic() - self.t0, 1)

    def _fault(self, do: str) -> None:
        try:
            self.system.fault(do)
            self.faults.append({"at": self._since(), "do": do})
        except (BenchError, httpx.HTTPError) as exc:
            self.fault_errors.append(f"{do}: {exc}")

    def _kill(self, step: Step) -> None:
        name = step.what
        role = ""
        if name == "engine:sweeper":
            child, role = self._sweeper_child(), "sweeper"
        elif name == "web:dashboard":
            child, role = self._dashboard_web(), "dashboard"
        else:
            child = self._child(name)
        if child is None or child.proc.poll() is not None:
            return
        pids = live_members(child.proc.pid)
        self.killed.update(pids)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(10)
        record = {"at": self._since(), "process": child.name, "role": role,
                  "pids": len(pids), "restart_after": step.after}
        self.kills.append(record)
        self.restarts.append((time.monotonic() + step.after, child, record))
        say(f"  t={record['at']:.0f}s kill -9 {child.name}"
            f"{f' (the {role})' if role else ''}: {len(pids)} process(es)")

    def _dashboard_web(self) -> Child | None:
        """The web process serving the live dashboard's socket (else either web)."""
        webs = [c for c in self.system.sup.children
                if c.name.startswith("web") and c.proc.poll() is None]
        port = self.front.routes.get(self.live.local_port)
        for c in webs:
            if port is not None and str(port) in c.argv:
                return c
        return webs[0] if webs else None

    def _sweeper_child(self) -> Child | None:
        """The engine process group holding the sweeper lease (else either engine)."""
        engines = [c for c in self.system.sup.children
                   if c.name.startswith("engine") and c.proc.poll() is None]
        try:
            holder = self.system.get("/engine")["sweeper"]["holder"]
            pid = int(holder.split(":")[1])
        except (BenchError, httpx.HTTPError, IndexError, ValueError):
            pid = None
        for c in engines:
            if pid is not None and pid in live_members(c.proc.pid):
                return c
        return engines[0] if engines else None

    def _db_cut(self) -> None:
        """Every connection to the run's database terminated at once (what a
        PostgreSQL restart does to its clients, AdminShutdown, without touching the
        server's other databases)."""
        import psycopg

        try:
            with psycopg.connect(**self.db.conninfo(), autocommit=True) as conn:
                n = conn.execute(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (self.db.name,)
                ).fetchone()[0]
        except psycopg.Error as exc:
            self.db_cuts.append({"at": self._since(), "error": str(exc)[:200]})
            return
        self.db_cuts.append({"at": self._since(), "connections": n})
        say(f"  t={self._since():.0f}s cut {n} database connection(s)")

    def _pg_restart(self) -> None:
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        argv = [a.format(version=version) for a in PG_RESTART]
        t = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=180)
        took = round(time.monotonic() - t, 1)
        self.pg_restarts.append({"at": self._since(), "seconds": took,
                                 "ok": proc.returncode == 0,
                                 "output": (proc.stdout + proc.stderr).strip()[-300:]})
        say(f"  t={self._since():.0f}s PostgreSQL restarted in {took} s"
            f"{'' if proc.returncode == 0 else ' — FAILED: ' + proc.stderr.strip()[-200:]}")

    def _pings(self) -> dict:
        """The simulator's ping counters: sent, answered, refused (HTTP/ws errors)."""
        try:
            h = self.system.health()
        except (httpx.HTTPError, ValueError):
            return {}
        return {k: h.get(k) for k in ("pings", "ping_acks", "ping_errors")}

    def _pg_failover(self) -> None:
        """``--pg-failovers``: kill the primary (SIGKILL of every one of its processes),
        promote the synchronous standby, and while a new standby is made from the new
        primary (where the old one was), time how long hadash takes to write again:
        its first ingested ping, sweeper renewal, event, and every engine loop's
        heartbeat on the promoted server. Every commit the canary had acknowledged
        must be there."""
        pair = self.db.pair
        self._rebuilt()  # the previous failover's new standby must be there first
        if pair.standby is None:  # its making failed (reported): no failover without one
            self.failovers.append({"at": self._since(), "from": pair.primary.name, "to": "",
                                   "error": "no standby to promote (the last one failed)"})
            return
        rec: dict[str, Any] = {"at": self._since(), "from": pair.primary.name,
                               "to": pair.standby.name}
        try:
            rec["replication_before"] = pair.replication()
        except Exception as exc:  # noqa: BLE001 — reported, and a violation below
            rec["replication_before"] = f"{type(exc).__name__}: {exc}"
        pings_before = self._pings()
        before = self._write_marks()
        kill_wall, t0 = time.time(), time.monotonic()
        rec.update(pair.kill_primary())
        try:
            rec["promote_s"] = round(pair.promote(), 2)
        except BenchError as exc:
            rec["error"] = str(exc)
            self.failovers.append(rec)
            say(f"  t={rec['at']:.0f}s PostgreSQL failover FAILED: {exc}")
            return
        rec["writable_after_s"] = round(time.monotonic() - t0, 2)
        rec["rebuild"] = {}

        def rebuild() -> None:
            try:
                rec["rebuild"].update(pair.rebuild_standby())
            except BenchError as exc:
                rec["rebuild"]["error"] = str(exc)
            rec["rebuilt_after_s"] = round(time.monotonic() - t0, 2)

        # The new standby is made while the run goes on (its faults, kills, restarts).
        self._rebuilding = threading.Thread(target=rebuild, daemon=True,
                                            name="chaos-pg-rebuild")
        self._rebuilding.start()
        rec["hadash"] = self._hadash_writes_again(before, kill_wall, t0, timeout=120)
        rec["connections_before"] = before["connections"]
        with contextlib.suppress(Exception):
            time.sleep(2)  # the stragglers reconnect
            rec["connections_after"] = self._write_marks()["connections"]
        if self.canary is not None:
            try:
                rec["canary_missing"] = self.canary.missing()
            except Exception as exc:  # noqa: BLE001
                rec["canary_missing_error"] = str(exc)
            rec["canary_acked"] = len(self.canary.acked)
        after = self._pings()
        rec["ping_errors"] = (after.get("ping_errors") or 0) - (pings_before.get(
            "ping_errors") or 0)
        self.failovers.append(rec)
        h = rec["hadash"]
        say(f"  t={rec['at']:.0f}s PostgreSQL failover {rec['from']} → {rec['to']}: "
            f"promoted in {rec['promote_s']} s ({rec['writable_after_s']} s after the kill); "
            f"hadash wrote again after {h.get('all_s')} s (pings {h.get('ping_s')} s, "
            f"sweeper {h.get('sweeper_s')} s, engine loops {h.get('engine_loops_s')} s); "
            "making a new standby")

    def _rebuilt(self) -> None:
        """Wait for the new standby of the last failover (if one is being made)."""
        if self._rebuilding is None:
            return
        self._rebuilding.join(300)
        self._rebuilding = None
        rec = self.failovers[-1]
        say(f"  t={self._since():.0f}s new standby {rec['rebuild'].get('standby')} in sync, "
            f"{rec.get('rebuilt_after_s')} s after the kill at t={rec['at']:.0f}s"
            f"{' — ' + rec['rebuild']['error'] if rec['rebuild'].get('error') else ''}")

    def _failover_figures(self, violations: list[str], w: Watch) -> dict:
        return _failover_figures_impl(self, violations, w)

    def _write_marks(self) -> dict:
        """What hadash had written last, read on the primary: the newest ping, the
        sweeper lease's expiry, every engine loop's heartbeat, the newest event id."""
        import psycopg

        with psycopg.connect(**self.db.conninfo(self.db.name), autocommit=True) as conn:
            ping = conn.execute("SELECT max(last_ping) FROM host").fetchone()[0]
            lease = conn.execute("SELECT expires FROM op_lease WHERE name = 'sweeper'"
                                 ).fetchone()
            loops = dict(conn.execute("SELECT id, heartbeat FROM op_engine_process"
                                      ).fetchall())
            event = conn.execute("SELECT coalesce(max(id), 0) FROM event").fetchone()[0]
            clients = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                                   "current_database()").fetchone()[0]
        return {"ping": ping, "sweeper": lease[0] if lease else None, "loops": loops,
                "event": event, "connections": clients}

    def _hadash_writes_again(self, before: dict, kill_wall: float, t0: float,
                             timeout: float) -> dict:
        """Poll the new primary (every 0.1 s) until hadash has written each kind of
        row again since the kill; seconds after the kill each was first seen."""
        import datetime as dt

        import psycopg

        from hadash.ha.runtime import SWEEPER_TTL

        kill = dt.datetime.fromtimestamp(kill_wall, dt.UTC)
        seen: dict[str, float] = {}
        loops_seen: dict[str, float] = {}
        # the loops alive at the kill (a loop killed earlier may still have its row)
        def killed(loop: str) -> bool:
            pid = loop.split(":")[1] if loop.count(":") >= 2 else ""
            return pid.isdigit() and int(pid) in self.killed

        loops = {i for i, beat in before["loops"].items()
                 if beat > kill - dt.timedelta(seconds=5) and not killed(i)}
        deadline = t0 + timeout
        conn = None
        errors = 0
        while time.monotonic() < deadline:
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(**self.db.conninfo(self.db.name),
                                           autocommit=True)
                now = round(time.monotonic() - t0, 2)
                marks = {
                    "ping_s": conn.execute("SELECT max(last_ping) > %s FROM host",
                                           (kill,)).fetchone()[0],
                    # the sweeper renews (expires = now + TTL) before every sweep
                    "sweeper_s": conn.execute(
                        "SELECT expires > %s FROM op_lease WHERE name = 'sweeper'",
                        (kill + SWEEPER_TTL,)).fetchone()[0],
                    "event_s": conn.execute("SELECT coalesce(max(id), 0) > %s FROM event",
                                            (before["event"],)).fetchone()[0],
                }
                for key, done in marks.items():
                    if done and key not in seen:
                        seen[key] = now
                for i, beat in conn.execute("SELECT id, heartbeat FROM op_engine_process"
                                            ).fetchall():
                    if beat > kill and i not in loops_seen:
                        loops_seen[i] = now
            except psycopg.Error:
                errors += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
            if {"ping_s", "sweeper_s"} <= set(seen) and loops <= set(loops_seen):
                break
            time.sleep(0.1)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()
        out: dict[str, Any] = dict(seen)
        missing = sorted(loops - set(loops_seen))
        out["engine_loops_s"] = max((loops_seen[i] for i in loops if i in loops_seen),
                                    default=None)
        out["engine_loops"] = len(loops)
        out["engine_loops_not_back"] = missing
        waited = [seen.get("ping_s"), seen.get("sweeper_s"), out["engine_loops_s"]]
        out["all_s"] = None if None in waited or missing else max(waited)
        out["probe_errors"] = errors
        return out

    def _housekeeping(self, *, all_restarts: bool = False) -> None:
        """Restart killed processes when due; note (and restart) any process that
        exited without being killed — the simulator is the truth: losing it ends
        the run."""
        now = time.monotonic()
        for entry in list(self.restarts):
            due, child, record = entry
            if all_restarts or now >= due:
                self.restarts.remove(entry)
                new = self.system.respawn(child)
                tap(new, self.logs, log_dir=self.log_dir)
                record["restarted_at"] = self._since()
        for c in list(self.system.sup.children):
            if c.proc.poll() is None or c.proc.pid in self.killed:
                continue
            if any(child is c for _, child, _ in self.restarts):
                continue
            if c.name == "fleet":
                raise BenchError(f"the simulator exited ({c.proc.returncode}):\n"
                                 + "\n".join(list(c.log)[-30:]))
            self.unexpected.append({"at": self._since(), "process": c.name,
                                    "code": c.proc.returncode,
                                    "last_lines": list(c.log)[-15:]})
            say(f"  t={self._since():.0f}s {c.name} exited by itself "
                f"({c.proc.returncode}); restarting it")
            tap(self.system.respawn(c), self.logs, log_dir=self.log_dir)

    def _progress(self, now: float) -> str:
        w, live = self.watch, self.live
        gaps = w.sweeper_gaps(self.t0_wall)
        with w.lock:
            double = len(w.double) + len(w.logged_double)
            overlap, faulty, items = len(w.overlap), w.faulty_hosts, w.open_items
        return (f"t={now:.0f}s faults {len(self.faults)} ({faulty} hosts faulty), kills "
                f"{len(self.kills)}, database cuts {len(self.db_cuts)}, PG restarts "
                f"{len(self.pg_restarts)}; open HA items "
                f"{items}; double runs {double}, overlapping starts {overlap}; dashboard "
                f"{len(live.received)} events ({live.state}, {live.drops} drops); longest "
                f"sweeper gap {gaps[0]['seconds'] if gaps else 0:.1f} s")

    # settling
    def _heal_all(self) -> None:
        for h in self.system.control.get("/hosts", params={"vms": "false"}).json():
            name = h["name"]
            for ok, fix in ((h["powered"], f"host {name} power on"),
                            (h["agent"], f"host {name} agent start"),
                            (h["network"], f"host {name} network on"),
                            (h["bmc"], f"bmc {name} ok"),
                            (not h["start_fail"], f"host {name} start-fail 0")):
                if not ok:
                    self._fault(fix)

    def _settle(self) -> dict:
        """Heal everything, then wait until the fleet is quiet: every host Up, no
        unfinished HA item, and every VM where the database says — the same for
        ``settle_stable`` s in a row (or ``--settle`` s have passed)."""
        t = time.monotonic()
        self._heal_all()
        self._housekeeping(all_restarts=True)
        for port in self.system.web_ports:
            with contextlib.suppress(TimeoutError, RuntimeError):
                wait_for_port(port, timeout=60)
        deadline = t + self.o["settle"]
        quiet_since = None
        last: dict = {}
        shown = time.monotonic()
        while time.monotonic() < deadline:
            self._housekeeping()
            try:
                last = self._final_state()
            except (BenchError, httpx.HTTPError) as exc:
                last = {"error": str(exc)}
            quiet = not last.get("error") and not last["hosts_not_up"] \
                and not last["open_items"] and not last["mismatch"]
            if quiet:
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since >= self.o["settle_stable"]:
                    break
            else:
                quiet_since = None
            if time.monotonic() - shown >= 15:
                shown = time.monotonic()
                say(f"  settling ({time.monotonic() - t:.0f} s): {self._settle_line(last)}")
            time.sleep(2)
        took = round(time.monotonic() - t, 1)
        settled = quiet_since is not None
        say(f"settle {'done' if settled else 'TIMED OUT'} after {took} s: "
            f"{self._settle_line(last)}")
        return {"seconds": took, "settled": settled, "state": last}

    @staticmethod
    def _settle_line(s: dict) -> str:
        if s.get("error"):
            return f"API error {s['error'][:200]}"
        if not s:
            return "no answer yet"
        return (f"{len(s['hosts_not_up'])} hosts not Up, {len(s['open_items'])} open HA "
                f"items, {len(s['mismatch'])} VMs not where the database says "
                f"({len(s['ha_not_running'])} HA VMs not running once)")

    def _final_state(self) -> dict:
        """The database (operator API) against the machines (simulator)."""
        system = self.system
        hosts = system.get("/hosts", limit=10000)
        vms = system.get("/vms", limit=10000)
        items = system.get("/ha-work", finished="false", limit=10000)
        truth = system.control.get("/hosts").json()
        on: dict[str, list[str]] = {}
        for h in truth:
            if h["powered"]:
                for v in h.get("vms", []):
                    if v["power_state"] == "PowerOn":
                        on.setdefault(v["name"], []).append(h["name"])
        mismatch, ha_not_running = [], []
        for vm in vms:
            where = sorted(on.get(vm["name"], []))
            running = vm["state"] == "Running"
            ok = where == [vm["host"]] if running else not where
            if not ok:
                mismatch.append({"vm": vm["name"], "state": vm["state"], "host": vm["host"],
                                 "powered_on_at": where})
            if vm["ha_enabled"] and not (running and where == [vm["host"]]):
                ha_not_running.append({"vm": vm["name"], "state": vm["state"],
                                       "host": vm["host"], "powered_on_at": where})
        linked = {h["name"]: h["connected"] for h in truth}
        return {"hosts_not_up": [{"host": h["name"], "status": h["status"],
                                  "agent_connected": linked.get(h["name"])}
                                 for h in hosts if h["status"] != "Up"],
                "open_items": [{"id": i["id"], "vm": i["vm"], "step": i["step"],
                                "taken_by": i["taken_by"]} for i in items],
                "mismatch": mismatch, "ha_not_running": ha_not_running,
                "ha_vms": sum(1 for v in vms if v["ha_enabled"])}

    def _catch_up(self, start_id: int) -> list[dict]:
        """Every event committed since the chaos began (the event table, through the
        operator API); the live client gets up to 15 s to receive the last of them
        (later events are not compared)."""
        events = self.system.events(start_id)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(e["id"] not in self.live.received
                                                  for e in events[-200:]):
            time.sleep(0.5)
        return events

    # the figures
    def _figures(self, info: dict, plan: list[Step], events: list[dict], settle: dict) -> dict:
        o, system, w, live = self.o, self.system, self.watch, self.live
        w.stop()
        live.stop()
        work = system.get("/ha-work", limit=10000)
        violations: list[str] = []

        # double runs
        with w.lock:
            sampled = sorted(w.double.values(), key=lambda d: d["first"])
            overlapping = sorted(w.overlap.values(), key=lambda d: d["first"])
            logged = list(w.logged_double)
        for d in (*sampled, *overlapping):
            d["first_s"] = round(d.pop("first") - self.t0_wall, 1)
            d["seen_s"] = round(d.pop("last") - self.t0_wall - d["first_s"], 1)
        for d in logged:
            d["at_s"] = round(d.pop("at") - self.t0_wall, 1)
        vms_twice = sorted({d["vm"] for d in sampled} | {d["vm"] for d in logged})
        if vms_twice:
            violations.append(f"{len(vms_twice)} VM(s) powered on on two hosts at once: "
                              + ", ".join(vms_twice[:10]))
        if overlapping:
            violations.append(f"{len(overlapping)} start(s) while the VM ran or started on "
                              "another host: " + ", ".join(
                                  f"{d['vm']} on {'+'.join(d['hosts'])}"
                                  for d in overlapping[:10]))

        # HA items: event chains (processed twice), and every HA VM running once
        chains = work_chains(events, work)
        if chains["broken"]:
            violations.append(f"{len(chains['broken'])} HA item(s) whose step events do "
                              "not form one chain (two workers on one item): " + "; ".join(
                                  b["why"] for b in chains["broken"][:5]))
        final = settle["state"] if not settle["state"].get("error") else {}
        lost, stuck, gave_up = classify(final.get("ha_not_running", []), work)
        if lost:
            violations.append(f"{len(lost)} HA VM(s) lost (not running, and no HA item "
                              "will start them): " + ", ".join(v["vm"] for v in lost[:10]))
        if stuck:
            violations.append(f"{len(stuck)} HA VM(s) not running with an unfinished item "
                              "after the settle: " + ", ".join(v["vm"] for v in stuck[:10]))
        if gave_up:
            violations.append(f"{len(gave_up)} HA VM(s) given up (item in Error, R12.5): "
                              + ", ".join(v["vm"] for v in gave_up[:10]))
        if not settle["settled"]:
            violations.append("the fleet did not settle: "
                              + self._settle_line(settle["state"]))

        # the dashboard
        db_ids = [e["id"] for e in events]
        missed = [i for i in db_ids if i not in live.received]
        if missed:
            violations.append(f"{len(missed)} event(s) never reached the live dashboard "
                              f"(ids {', '.join(map(str, missed[:10]))}"
                              f"{' …' if len(missed) > 10 else ''})")
        by_id = {e["id"]: e for e in events}
        # Delivery: from the moment the event was seen committed in the table (polled
        # every 0.1 s) to its arrival at the dashboard; and, as a second view, from
        # the event's own time (the engine's clock when the step began, often before
        # the commit: an investigation or an agent call lies in between).
        with w.lock:
            visible = dict(w.visible)
        latency = sorted((max(0.0, live.received[i] - visible[i]), i)
                         for i in db_ids if i in live.received and i in visible)
        lat = [x for x, _ in latency]
        stamped = sorted(live.received[i] - parse_time(by_id[i]["time"])
                         for i in db_ids if i in live.received)
        # Late deliveries next to a disturbance of the path: a web process killed (its
        # dashboards reconnect and resume), the database cut or restarted (the relay's
        # LISTEN connection goes with it).
        upsets = [(k["at"], k["at"]) for k in self.kills if k["process"].startswith("web")] \
            + [(c["at"], c["at"]) for c in self.db_cuts] \
            + [(p["at"] - p["seconds"], p["at"]) for p in self.pg_restarts] \
            + [(f["at"], f["at"] + (f.get("rebuilt_after_s") or 0)) for f in self.failovers]
        late = [{"id": i, "event": by_id[i]["event"], "subject": by_id[i]["subject_name"],
                 "seconds": round(x, 2), "committed_s": round(visible[i] - self.t0_wall, 1)}
                for x, i in latency if x > 1.0]
        for e in late:
            e["after_upset"] = any(a - 1.0 <= e["committed_s"] <= b + 5.0 for a, b in upsets)

        # PostgreSQL failovers (--pg-failovers): nothing committed may be missing
        failover = self._failover_figures(violations, w) if self.failovers or \
            o.get("pg_failovers") else None

        # the sweeper
        gaps = w.sweeper_gaps(self.t0_wall)
        longest = gaps[0] if gaps else None
        if longest and longest["seconds"] > o["max_sweep_gap"]:
            violations.append(f"the sweeper stopped for {longest['seconds']} s "
                              f"(over --max-sweep-gap {o['max_sweep_gap']:.0f} s)")
        takeovers = [e for e in events if e["event"] == "SweeperTakeover"]
        kinds = Counter(e["event"] for e in events)

        result = {
            "command": o["command"], "seed": self.seed, "machine": info,
            "fleet": {"hosts": o["hosts"], "vms": o["vms"], "ha_vms": final.get("ha_vms"),
                      "clusters": o["clusters"], "start_delay": o["start_delay"]},
            "processes": {"web": 2, "engine": 2, "channel_layer": "redis"},
            "config": CONFIG, "duration": o["duration"], "long": o["long"],
            "plan": [asdict(s) for s in plan],
            "faults": {"applied": len(self.faults),
                       "by_kind": dict(Counter(_fault_kind(f["do"]) for f in self.faults)),
                       "refused": self.fault_errors},
            "events_by_kind": dict(kinds.most_common()),
            "kills": self.kills, "db_cuts": self.db_cuts, "pg_restarts": self.pg_restarts,
            "pg_failover": failover, "pings": self.ping_counts,
            "unexpected_exits": self.unexpected,
            "double_runs": {"vms": vms_twice, "sampled": sampled, "simulator_log": logged,
                            "overlapping_starts": overlapping,
                            "truth_samples": w.truth["samples"],
                            "truth_blind_max_s": round(w.truth["blind_max"], 1)},
            "ha": {"items": chains["items"], "events": chains["events"],
                   "chains_broken": chains["broken"], "lost": lost, "stuck": stuck,
                   "gave_up": gave_up, "ha_vms_not_running": len(lost) + len(stuck)
                   + len(gave_up), "longest_hold": w.longest_hold()},
            "dashboard": {"events": len(db_ids), "received": len(live.received),
                          "missed": missed, "duplicates": live.duplicates,
                          "connects": live.connects, "drops": live.drops,
                          "reloads": live.reloads, "errors": dict(live.errors),
                          "latency_s": {"p50": _r(percentile(lat, 50)),
                                        "p99": _r(percentile(lat, 99)),
                                        "max": _r(lat[-1] if lat else None),
                                        "over_1s": len(late),
                                        "over_1s_after_upset": sum(e["after_upset"]
                                                                   for e in late),
                                        "measured": len(lat),
                                        "table_polls": w.table["samples"],
                                        "table_blind_max_s": round(w.table["blind_max"], 1)},
                          "since_event_time_s": {
                              "p50": _r(percentile(stamped, 50)),
                              "p99": _r(percentile(stamped, 99)),
                              "max": _r(stamped[-1] if stamped else None)},
                          "late": late[-50:],
                          "slowest": [{"id": i, "event": by_id[i]["event"],
                                       "subject": by_id[i]["subject_name"],
                                       "seconds": round(x, 2)}
                                      for x, i in reversed(latency[-5:])]},
            "sweeper": {"longest_gap": longest, "gaps_over_5s": [g for g in gaps
                                                                 if g["seconds"] > 5],
                        "renewals": len(w.renewals), "takeovers": len(takeovers),
                        "takeover_messages": [e["message"] for e in takeovers],
                        "engine_samples": w.engine["samples"],
                        "engine_blind_max_s": round(w.engine["blind_max"], 1)},
            "settle": {k: v for k, v in settle.items() if k != "state"}
            | {"final": {k: v for k, v in final.items() if k != "ha_vms"}},
            "logs": {name: dict(c) for name, c in sorted(self.logs.items())},
            "front": {"connections": self.front.connections, "refused": self.front.refused},
            "violations": violations,
        }
        return result


def _failover_figures_impl(chaos: Chaos, violations: list[str], w: Watch) -> dict:
    import psycopg

    fo = chaos.failovers
    db = chaos.db
    if len(fo) < (chaos.o.get("pg_failovers") or 0):
        violations.append(f"only {len(fo)} of {chaos.o['pg_failovers']} PostgreSQL "
                          "failovers were carried out (the run was shorter than planned?)")
    for f in fo:
        if f.get("error"):
            violations.append(f"failover at t={f['at']} s failed: {f['error'][:300]}")
        rep = f.get("replication_before")
        if not (isinstance(rep, list) and any(r["sync_state"] == "sync" for r in rep)):
            violations.append(f"failover at t={f['at']} s: no synchronous standby before "
                              f"the kill ({rep})")
        if f.get("canary_missing"):
            violations.append(f"failover at t={f['at']} s: {len(f['canary_missing'])} "
                              "acknowledged commit(s) of the canary missing on the promoted "
                              "server")
        h = f.get("hadash") or {}
        if not f.get("error") and h.get("all_s") is None:
            violations.append(f"failover at t={f['at']} s: hadash did not write again on "
                              f"the promoted server within the wait ({h})")
        if (f.get("rebuild") or {}).get("error"):
            violations.append(f"failover at t={f['at']} s: the new standby failed: "
                              f"{f['rebuild']['error'][:300]}")
    # Every event seen committed (on whichever primary) is in the final table.
    with w.lock:
        seen = set(w.visible)
    lost: list[int] = []
    final_missing: list[int] = []
    if seen:
        with psycopg.connect(**db.conninfo(db.name), autocommit=True) as conn:
            have = {r[0] for r in conn.execute("SELECT id FROM event WHERE id >= %s",
                                               (min(seen),)).fetchall()}
        lost = sorted(seen - have)
    if lost:
        violations.append(f"{len(lost)} event(s) seen committed before a failover are "
                          f"missing after it (ids {', '.join(map(str, lost[:10]))})")
    canary = chaos.canary
    if canary is not None:
        canary.stop()
        final_missing = canary.missing()
        if final_missing:
            violations.append(f"{len(final_missing)} acknowledged canary commit(s) missing "
                              "at the end")

    def worst(key: str) -> float | None:
        vals = [(f.get("hadash") or {}).get(key) for f in fo]
        vals = [v for v in vals if v is not None]
        return max(vals) if vals else None

    return {
        "failovers": fo, "mode": db.pair.describe(),
        "events_seen_committed": len(seen), "events_lost": lost,
        "canary": None if canary is None else {
            "acked": len(canary.acked), "failures": canary.failures,
            "missing": final_missing,
            "longest_gap_s": round(max((b - a for a, b in canary.gaps), default=0.0), 2)},
        "worst": {"promote_s": max((f.get("promote_s") or 0 for f in fo), default=None),
                  "writable_s": max((f.get("writable_after_s") or 0 for f in fo),
                                    default=None),
                  "hadash_all_s": worst("all_s"), "ping_s": worst("ping_s"),
                  "sweeper_s": worst("sweeper_s"), "engine_loops_s": worst("engine_loops_s"),
                  "event_s": worst("event_s"),
                  "rebuilt_s": max((f.get("rebuilt_after_s") or 0 for f in fo), default=None),
                  "ping_errors": max((f.get("ping_errors") or 0 for f in fo), default=None)},
    }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _fault_kind(do: str) -> str:
    words = do.split()
    return f"{words[0]} {' '.join(words[2:])}" if len(words) > 2 else do


def work_chains(events: list[dict], work: list[dict]) -> dict:
    """Every HA item's step events (WorkScheduled, WorkStep, WorkRetry) in id order
    must form one chain that ends at the item's step: each event starts where the
    previous one ended, and nothing follows a final step. A second worker acting on
    its stale copy of an item breaks the chain."""
    steps: dict[int, list[dict]] = {}
    for e in events:
        if e["subject"] == "work" and e["field"] == "step" and e["subject_id"]:
            steps.setdefault(e["subject_id"], []).append(e)
    items = {w["id"]: w for w in work}
    broken = []
    for item_id, chain in steps.items():
        why = ""
        if chain[0]["event"] == "WorkScheduled" and chain[0]["old"]:
            why = f"scheduled from {chain[0]['old']!r}"
        for a, b in zip(chain, chain[1:], strict=False):
            if a["new"] in FINAL_STEPS:
                why = why or f"event #{b['id']} {b['event']} after final step {a['new']}"
            elif b["old"] != a["new"]:
                why = why or (f"event #{b['id']} {b['event']} from {b['old']}, but #{a['id']} "
                              f"left it {a['new']}")
            if b["event"] == "WorkScheduled":
                why = why or f"scheduled twice (#{a['id']}, #{b['id']})"
        item = items.get(item_id)
        if item is not None and chain[-1]["new"] != item["step"]:
            why = why or (f"item is {item['step']} but its last event #{chain[-1]['id']} "
                          f"says {chain[-1]['new']}")
        if why:
            broken.append({"item": item_id, "vm": chain[0]["subject_name"],
                           "why": f"#{item_id} ({chain[0]['subject_name']}): {why}"})
    return {"items": len(steps), "events": sum(len(c) for c in steps.values()),
            "broken": broken}


def classify(not_running: list[dict], work: list[dict]) -> tuple[list, list, list]:
    """HA VMs not running once after the settle: (lost, stuck, gave up)."""
    latest: dict[str, dict] = {}
    unfinished: dict[str, dict] = {}
    for w in sorted(work, key=lambda w: w["id"]):
        if w["type"] != "HA":
            continue
        latest[w["vm"]] = w
        if w["step"] not in FINAL_STEPS:
            unfinished[w["vm"]] = w
    lost, stuck, gave_up = [], [], []
    for vm in not_running:
        item = unfinished.get(vm["vm"]) or latest.get(vm["vm"])
        row = dict(vm, item=None if item is None else {
            k: item[k] for k in ("id", "step", "reason", "tried", "taken_by", "last_error")})
        if vm["vm"] in unfinished:
            stuck.append(row)
        elif item is not None and item["step"] == "Error":
            gave_up.append(row)
        else:
            lost.append(row)
    return lost, stuck, gave_up


# --- the report -----------------------------------------------------------------------------

def report(r: dict[str, Any]) -> str:
    d, ha, live, sw = r["double_runs"], r["ha"], r["dashboard"], r["sweeper"]
    lat, stamp = live["latency_s"], live["since_event_time_s"]
    longest = sw["longest_gap"] or {}
    hold = ha["longest_hold"] or {}
    kills = Counter(f"{k['process'].rstrip('0123456789')}"
                    f"{' (' + k['role'] + ')' if k['role'] else ''}" for k in r["kills"])
    rows = [
        ["VMs powered on on two hosts at once", len(d["vms"]),
         f"{d['truth_samples']} samples of the simulator, longest blind "
         f"{d['truth_blind_max_s']} s; {len(d['simulator_log'])} logged by the simulator"],
        ["starts while the VM ran/started elsewhere", len(d["overlapping_starts"]), ""],
        ["HA items processed twice (broken chains)", len(ha["chains_broken"]),
         f"{ha['items']} items, {ha['events']} step events"],
        ["HA VMs lost / stuck / given up", f"{len(ha['lost'])} / {len(ha['stuck'])} / "
         f"{len(ha['gave_up'])}", f"of {r['fleet']['ha_vms']} HA VMs, after the settle"],
        ["events missed by the live dashboard", len(live["missed"]),
         f"{live['received']} of {live['events']} received; {live['drops']} drops, "
         f"{live['connects']} connects, {len(live['reloads'])} reloads"],
        ["event delivery p50 / p99 / max (s)", f"{fmt(lat['p50'], 3)} / {fmt(lat['p99'], 3)}"
         f" / {fmt(lat['max'], 2)}", f"committed → received; {lat['over_1s']} of "
         f"{lat['measured']} over 1 s ({lat.get('over_1s_after_upset', 0)} of them within "
         "5 s of a web kill or database cut)"],
        ["  the same from the event's time", f"{fmt(stamp['p50'], 3)} / "
         f"{fmt(stamp['p99'], 3)} / {fmt(stamp['max'], 2)}",
         "the engine stamps a step when it begins"],
        ["longest sweeper gap (s)", fmt(longest.get("seconds"), 1),
         f"{sw['takeovers']} takeovers; {len(sw['gaps_over_5s'])} gaps over 5 s"],
        ["longest HA item hold (s)", fmt(hold.get("seconds"), 1),
         f"{hold.get('vm', '')} #{hold.get('item', '')} by {hold.get('by', '')}"
         if hold else ""],
        ["settle", f"{r['settle']['seconds']} s", "settled" if r["settle"]["settled"]
         else "TIMED OUT"],
    ]
    lines = [
        f"seed {r['seed']}; {r['fleet']['hosts']} hosts, {r['fleet']['vms']} VMs "
        f"({r['fleet']['ha_vms']} HA), 2 web + 2 engine processes, Redis channel layer; "
        f"{r['duration']:.0f} s of chaos",
        f"faults applied: {r['faults']['applied']} ("
        + ", ".join(f"{v} {k}" for k, v in sorted(r["faults"]["by_kind"].items())) + ")",
        "kills: " + (", ".join(f"{v} {k}" for k, v in sorted(kills.items())) or "none")
        + f"; database cuts: {len(r['db_cuts'])}"
        + f"; PostgreSQL restarts: {len(r['pg_restarts'])}"
        + (f"; PostgreSQL failovers: {len(r['pg_failover']['failovers'])}"
           if r.get("pg_failover") else "")
        + (f" ({', '.join(str(p['seconds']) + ' s' for p in r['pg_restarts'])})"
           if r["pg_restarts"] else "")
        + f"; processes that exited by themselves: {len(r['unexpected_exits'])}",
        "hadash did: " + ", ".join(f"{r['events_by_kind'].get(k, 0)} {k}" for k in (
            "PingTimeout", "HostDown", "HostFenced", "FenceFailed", "WorkScheduled",
            "HaStarted", "HaStartFailed", "SweeperTakeover")),
        "tracebacks in the logs: " + ", ".join(
            f"{name} {c.get('tracebacks', 0)}" for name, c in r["logs"].items()),
        "",
        table(["check", "result", "detail"], rows),
        "",
    ]
    if r.get("pg_failover"):
        lines += failover_report(r["pg_failover"], r.get("pings") or {}) + [""]
    if longest:
        lines.append(f"longest sweeper gap: {longest['seconds']} s at t={longest['after_s']} s "
                     f"({longest['from'] or '-'} → {longest['to'] or '-'})")
    for m in sw["takeover_messages"][:10]:
        lines.append(f"  SweeperTakeover: {m}")
    for s in live["slowest"][:3]:
        lines.append(f"slow event #{s['id']} {s['event']} {s['subject']}: {s['seconds']} s")
    lines.append("")
    if r["violations"]:
        lines.append(f"INVARIANTS VIOLATED ({len(r['violations'])}):")
        lines += [f"  - {v}" for v in r["violations"]]
    else:
        lines.append("SPEC §6 held: no VM ran twice, no HA item was lost or processed twice, "
                     "the dashboard missed no event, every HA VM runs exactly once.")
    return "\n".join(lines)


def failover_report(f: dict[str, Any], pings: dict) -> list[str]:
    """The PostgreSQL failovers (--pg-failovers): one row each, seconds after the
    kill of the primary."""
    rows = []
    for x in f["failovers"]:
        h = x.get("hadash") or {}
        rows.append([f"t={x['at']:.0f}s {x['from']}→{x['to']}", fmt(x.get("promote_s"), 2),
                     fmt(x.get("writable_after_s"), 2), fmt(h.get("ping_s"), 1),
                     fmt(h.get("sweeper_s"), 1), fmt(h.get("engine_loops_s"), 1),
                     fmt(h.get("event_s"), 1), fmt(x.get("rebuilt_after_s"), 1),
                     x.get("ping_errors", ""), len(x.get("canary_missing") or []),
                     f"{x.get('connections_before', '–')} / {x.get('connections_after', '–')}"])
    c = f.get("canary") or {}
    sent = (pings.get("end") or {}).get("pings", 0) - (pings.get("start") or {}).get("pings", 0)
    refused = (pings.get("end") or {}).get("ping_errors", 0) \
        - (pings.get("start") or {}).get("ping_errors", 0)
    return [
        f"PostgreSQL: {f['mode']}",
        table(["failover", "promote s", "writable s", "ping s", "sweeper s", "engine s",
               "event s", "new standby s", "pings refused", "acked lost",
               "connections before / after"], rows),
        "(seconds after the kill of the primary: promoted, hadash's first ingested ping, "
        "sweeper renewal, every engine loop's heartbeat, event on the promoted server; "
        "the new standby in sync)",
        f"acknowledged commits lost: canary {len(c.get('missing') or [])} of "
        f"{c.get('acked')} (longest write gap {c.get('longest_gap_s')} s); events seen "
        f"committed then missing: {len(f['events_lost'])} of {f['events_seen_committed']}; "
        f"pings refused over the run: {refused} of {sent}",
    ]


def as_json(r: dict[str, Any]) -> str:
    return json.dumps(r, indent=2, default=str)


__all__ = ["Front", "LiveClient", "Watch", "make_plan", "report", "run", "work_chains"]
