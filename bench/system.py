"""The whole system for a benchmark, as in production: a fresh database, daphne (web,
agent protocol, websocket pings), a django-q cluster running the engine loops, and the
fleet simulator — separate processes on free loopback ports, talking HTTP only. Faults
go in through the simulator's control API; outcomes are read through the operator API.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from hadash.supervisor import Child, Supervisor, daphne_argv, free_port, wait_for_port

from .common import (
    BenchDatabase,
    BenchError,
    bench_env,
    group_memory,
    manage,
    say,
    wait_until,
)


def parse_time(value: str) -> float:
    """An API timestamp as a POSIX time (the server runs on this machine: same clock)."""
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


class System:
    def __init__(self, db: BenchDatabase, tmp: Path, *, verbose: bool = False,
                 config: dict[str, str] | None = None, engine_loops: int = 2,
                 env: dict[str, str] | None = None):
        self.db = db
        self.tmp = tmp
        self.config = dict(config or {})
        # env: more environment for every process (e.g. REDIS_URL for the channel layer)
        self.env = bench_env(db.url, str(tmp), HADASH_ENGINE_LOOPS=str(engine_loops),
                             **(env or {}))
        # Secrets (R30): SECRET_KEY and the join key come with os.environ (settings.py
        # exports those it read from var/secrets.env; pytest makes its own); the
        # simulator's control token is this system's own.
        self.env["HADASH_FLEET_TOKEN"] = secrets.token_urlsafe(32)
        self.sup = Supervisor(echo=verbose, grace=8.0, base_env=self.env)
        self.api: httpx.Client | None = None
        self.control: httpx.Client | None = None
        self.token = ""
        self.web_port = 0  # where clients (API, simulator) reach the web
        self.web_ports: list[int] = []  # each web process's own port
        self.fleet_port = 0
        self.hosts = 0
        self.vms = 0
        # Peak memory of each process (group), by name: taken by memory() and, at the
        # latest, by stop() (bench.common.group_memory).
        self.memory: dict[str, dict[str, Any]] = {}

    # --- start / stop ------------------------------------------------------------------
    def start(self, *, hosts: int, vms: int, ha_ratio: float, clusters: int,
              start_delay: float, host_cpus: int | None = None,
              host_memory_mb: int | None = None, web_processes: int = 1,
              engine_processes: int = 1,
              front: Callable[[list[int]], int] | None = None) -> None:
        """``web_processes`` daphnes (named web, or web1, web2 …) and
        ``engine_processes`` qclusters (engine, or engine1 …). With ``front``, clients
        reach the web through it: it gets the web processes' ports and returns the
        port to use instead (a load balancer)."""
        self.hosts, self.vms = hosts, vms
        say("migrating …")
        manage(self.env, "migrate", "--noinput", "-v0")
        self.token = manage(self.env, "apitoken", "bench", "--create").strip().splitlines()[-1]
        self.web_port, self.fleet_port = free_port(), free_port()
        self.web_ports = [self.web_port] + [free_port() for _ in range(web_processes - 1)]
        # HADASH_BENCH_WEB_POOL=N: the web process with HADASH_DB_POOL=N (docs/deploy.md)
        pool = os.environ.get("HADASH_BENCH_WEB_POOL")
        for i, port in enumerate(self.web_ports):
            web = self.sup.python(f"web{i + 1}" if web_processes > 1 else "web",
                                  *daphne_argv(port),
                                  env={"HADASH_DB_POOL": pool} if pool else None)
            wait_for_port(port, proc=web.proc, timeout=60)
        if front is not None:
            self.web_port = front(list(self.web_ports))
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.web_port}/api/v1",
                                headers={"Authorization": f"Bearer {self.token}"},
                                timeout=30, trust_env=False)
        for key, value in self.config.items():
            self.set_config(key, value)
        say(f"daphne on {self.web_port}; config {self.config or 'defaults'}")
        manage(self.env, "engine", "start")
        for i in range(engine_processes):
            self.sup.manage(f"engine{i + 1}" if engine_processes > 1 else "engine", "qcluster")
        argv = ["fleet", "simulate", "--server", f"http://127.0.0.1:{self.web_port}",
                "--listen", f"127.0.0.1:{self.fleet_port}", "--hosts", str(hosts),
                "--vms", str(vms), "--ha-ratio", str(ha_ratio), "--clusters", str(clusters),
                "--start-delay", str(start_delay), "--api-token", self.token,
                "--transport", "ws", "--seed", "1", "--status-interval", "10"]
        if host_cpus:
            argv += ["--host-cpus", str(host_cpus)]
        if host_memory_mb:
            argv += ["--host-memory-mb", str(host_memory_mb)]
        self.sup.manage(*argv)
        wait_for_port(self.fleet_port, proc=self.sup.children[-1].proc, timeout=120)
        self.control = httpx.Client(
            base_url=f"http://127.0.0.1:{self.fleet_port}/control", timeout=30,
            trust_env=False,
            headers={"Authorization": f"Bearer {self.env['HADASH_FLEET_TOKEN']}"})
        say(f"qcluster started; simulator: {hosts} hosts, {vms} VMs (HA ratio {ha_ratio}), "
            f"{clusters} cluster(s), VM start {start_delay} s, control port {self.fleet_port}")

    def sample_memory(self) -> dict[str, dict[str, Any]]:
        """Each running process group's memory now (peak RSS so far, RSS, PSS), by the
        child's name (web, engine, fleet …); kept in ``self.memory``, the larger peak
        winning for a process group sampled before. A benchmark's report shows it."""
        for child in self.sup.children:
            if child.proc is None or child.proc.poll() is not None:
                continue
            m = group_memory(child.proc.pid)
            if not m["processes"]:
                continue
            before = self.memory.get(child.name)
            if before and before["peak_rss_mb"] > m["peak_rss_mb"]:
                # a process of the group exited since (a recycled worker): keep its peak
                m = {**m, "peak_rss_mb": before["peak_rss_mb"],
                     "peak_rss_max_mb": max(before["peak_rss_max_mb"], m["peak_rss_max_mb"])}
            self.memory[child.name] = m
        return self.memory

    def stop(self) -> None:
        try:
            self.sample_memory()
        except Exception as exc:  # noqa: BLE001 - never lose the run over a statistic
            say(f"could not read the processes' memory: {exc}")
        if self.memory:
            say("peak RSS (Σ VmHWM over each process group): " + ", ".join(
                f"{k} {v['peak_rss_mb']:.0f} MB ({v['processes']} processes)"
                for k, v in self.memory.items()))
        for client in (self.api, self.control):
            if client is not None:
                client.close()
        codes = self.sup.stop()
        say(f"stopped {', '.join(f'{k} ({v})' for k, v in codes.items())}")

    def __enter__(self) -> System:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def respawn(self, child: Child) -> Child:
        """Start a process of the system again after it died (or was killed): the same
        command line and environment, under the same name, in place of the old one."""
        if child in self.sup.children:
            self.sup.children.remove(child)
        return self.sup.start(child.name, child.argv, child.env)

    # --- health --------------------------------------------------------------------------
    def alive(self) -> None:
        """BenchError if a process of the system exited."""
        dead = self.sup.first_exited()
        if dead is not None:
            raise BenchError(f"{dead.name} exited with {dead.proc.returncode}; its last lines:\n"
                             + "\n".join(dead.log[-40:]))

    # --- the operator API and the control API -------------------------------------------
    def get(self, path: str, **params) -> Any:
        r = self.api.get(path, params=params or None)
        if r.status_code != 200:
            raise BenchError(f"GET {path} {params}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def set_config(self, key: str, value: str) -> None:
        r = self.api.put(f"/config/{key}", json={"value": str(value)})
        if r.status_code != 200:
            raise BenchError(f"PUT /config/{key} {value!r}: HTTP {r.status_code} {r.text[:300]}")

    def post(self, path: str) -> Any:
        r = self.api.post(path, json={})
        if r.status_code not in (200, 201):
            raise BenchError(f"POST {path}: HTTP {r.status_code} {r.text[:300]}")
        return r.json()

    def fault(self, do: str) -> float:
        """Apply a fault; returns the time (POSIX) the simulator answered."""
        r = self.control.post("/faults", json={"do": do})
        t = time.time()
        if r.status_code != 200:
            raise BenchError(f"fault {do!r}: HTTP {r.status_code} {r.text[:300]}")
        return t

    def health(self) -> dict:
        return self.control.get("/health").json()

    def last_event_id(self) -> int:
        rows = self.get("/events", latest="true", limit=1)
        return rows[-1]["id"] if rows else 0

    def events(self, after: int, **filters) -> list[dict]:
        out: list[dict] = []
        while True:
            rows = self.get("/events", after=after, limit=5000, **filters)
            out.extend(rows)
            if len(rows) < 5000:
                return out
            after = rows[-1]["id"]

    def count_at_least(self, path: str, n: int, **filters) -> bool:
        """Whether a list endpoint has at least ``n`` rows (one row fetched)."""
        return bool(self.get(path, limit=1, offset=n - 1, **filters)) if n > 0 else True

    # --- readiness -------------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> float:
        """Until the simulator registered every VM, every host is Up and every VM
        Running; returns the seconds it took."""
        t0 = time.monotonic()

        def registration() -> str:
            reg = self.health().get("registration", {})
            state = reg.get("state")
            if state == "failed":
                raise BenchError(f"the simulator's registration failed: {reg.get('error')}")
            vms = reg.get("vms") or {}
            bmcs = reg.get("hosts") or {}
            hosts = self.health().get("hosts_connected")
            return (f"{hosts}/{self.hosts} hosts connected, registration {state}: BMC "
                    f"settings {bmcs.get('done', 0)}/{bmcs.get('of', self.hosts)}, VMs "
                    f"{vms.get('done', 0)}/{vms.get('of', self.vms)}")

        def registered() -> bool:
            reg = self.health().get("registration", {})
            if reg.get("state") == "failed":
                raise BenchError(f"the simulator's registration failed: {reg.get('error')}")
            return reg.get("state") in ("done", "done with failures")

        wait_until("the simulator to register its hosts and VMs", registered, timeout,
                   every=1.0, progress=registration, progress_every=10, alive=self.alive)
        reg = self.health().get("registration", {})
        if reg.get("state") != "done":
            say(f"registration: {reg}")
        say(f"registered in {time.monotonic() - t0:.0f} s: {reg.get('vms')}")
        left = max(30.0, timeout - (time.monotonic() - t0))

        def counts() -> str:
            up = len(self.get("/hosts", status="Up", limit=10000))
            return f"{up}/{self.hosts} hosts Up"

        # VMs the simulator could not register (it says how many failed) never run.
        vms = (reg.get("vms") or {}).get("registered", self.vms)
        try:
            wait_until(f"all {self.hosts} hosts Up", lambda: self.count_at_least(
                "/hosts", self.hosts, status="Up"), min(left, 120.0), every=1.0,
                progress=counts, progress_every=10, alive=self.alive)
        except BenchError:
            # A loaded machine may leave a few hosts reconnecting: go on with 99 %.
            wait_until(f"99 % of {self.hosts} hosts Up", lambda: self.count_at_least(
                "/hosts", int(self.hosts * 0.99), status="Up"), left, every=1.0,
                progress=counts, progress_every=10, alive=self.alive)
            say(f"going on with {counts()} (the others are not failed on purpose)")
        wait_until(f"all {vms} registered VMs Running", lambda: self.count_at_least(
            "/vms", vms, state="Running"), left, every=2.0, alive=self.alive,
            progress=lambda: "waiting", progress_every=20)
        self.wait_caught_up(left)
        return time.monotonic() - t0

    def backlog(self) -> int:
        """Pings the simulator sent that the server has not answered yet (websocket
        pings are answered once ingested: this is the ingestion backlog)."""
        h = self.health()
        return max(0, h["pings"] - h["ping_acks"] - h["ping_errors"])

    def wait_caught_up(self, timeout: float, interval: float | None = None) -> None:
        """Until the server answers pings as fast as they come: a backlog of at most
        about one second of pings, twice in a row. A backlog makes every host look
        alive for as long as its old pings are still being ingested (and stamped
        last_ping at ingestion time), which would distort detection."""
        rate = max(1.0, self.health().get("pings_per_s") or 1.0)
        ok = {"n": 0}

        def caught_up() -> bool:
            ok["n"] = ok["n"] + 1 if self.backlog() <= max(20.0, rate) else 0
            return ok["n"] >= 2

        wait_until("the server to catch up with the pings", caught_up, timeout, every=2.0,
                   progress=lambda: f"backlog {self.backlog()} pings ({rate:.0f} pings/s)",
                   progress_every=10, alive=self.alive)

    def host_vms(self, host: str) -> list[dict]:
        return self.get("/vms", host=host, limit=10000)

    def wait_host_status(self, host: str, status: str, timeout: float,
                         every: float = 0.1) -> float:
        """Poll until ``host`` shows ``status``; the POSIX time it was first seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.get(f"/hosts/{host}")["status"] == status:
                return time.time()
            time.sleep(every)
        self.alive()
        raise BenchError(f"{host} did not become {status} within {timeout:.0f} s "
                         f"(now {self.get(f'/hosts/{host}')['status']})")

    def wait_started(self, names: set[str], after: int, timeout: float,
                     every: float = 0.2, victim: str = "") -> dict[str, dict]:
        """Until every VM in ``names`` runs on another host than ``victim``; for each,
        the event that made it Running there (normally HaStarted; sometimes the
        agent's report wins the race, R9's out-of-band start), by VM name."""
        seen: dict[str, dict] = {}
        cursor = after
        deadline = time.monotonic() + timeout
        last_progress = time.monotonic()
        while True:
            for e in self.events(cursor, event="HaStarted"):
                cursor = max(cursor, e["id"])
                if e["subject_name"] in names and e["subject_name"] not in seen:
                    seen[e["subject_name"]] = e
                    last_progress = time.monotonic()
            missing = names - set(seen)
            if missing and time.monotonic() - last_progress > 2.0:
                # No HaStarted for a while: look at the VMs themselves.
                for name in sorted(missing):
                    vm = self.get(f"/vms/{name}")
                    if vm["state"] != "Running" or vm["host"] in (victim, None):
                        continue
                    running = [e for e in self.events(after, subject="vm", subject_name=name)
                               if e.get("field") == "state" and e.get("new") == "Running"]
                    if running:
                        seen[name] = running[-1]
                last_progress = time.monotonic()
                missing = names - set(seen)
            if not missing:
                return seen
            if time.monotonic() > deadline:
                described = []
                for name in sorted(missing)[:5]:
                    vm = self.get(f"/vms/{name}")
                    work = self.get("/ha-work", vm=name, limit=3)
                    described.append(f"{name} ({vm['state']} on {vm['host']}; HA work: "
                                     + ", ".join(f"#{w['id']} {w['reason']} {w['step']}"
                                                 for w in work) + ")")
                raise BenchError(f"only {len(seen)}/{len(names)} HA VMs of {victim} run "
                                 f"elsewhere after {timeout:.0f} s; not: "
                                 + "; ".join(described))
            self.alive()
            time.sleep(every)
