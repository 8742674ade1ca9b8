"""``bench agent-crash``: a VM that crashes on a host with a real agent — running again
how fast (issue 12 target 2: ≤ 2 s)?

The real fleet of tests/realfleet (bench/realfleet.py): network-namespace hosts, each
with its own libvirtd, diskless TCG qemu guests and hadash-agent (websocket pings),
against a real daphne and django-q engine (2 loops) on a throw-away PostgreSQL
database, ``ping.interval`` 2. Every host runs one HA guest. Each round kills one HA
guest's qemu with SIGKILL (the guests in turn) and waits until the VM runs again (the
operator API says Running/PowerOn and a new qemu process of it runs, on whichever host
HA chose). Then it reads the story from the VM's own events and the agents' logs:

- **kill**: when this process sent SIGKILL (the clock of this machine, which every
  process shares);
- **agent saw it**: the agent's log line for libvirt's lifecycle event (its own stamp);
- **PowerOff stored**: the VM's PowerStateChanged → PowerOff event (the agent's report
  ingested; the VM incident opens in the same transaction);
- the HA item's steps (WorkStep events: investigated, stopped, HaStarting placed);
- **Running**: the VM's HaStarted event (the target's agent answered the start: libvirt
  started the domain), or the state change that made it Running;
- **incident downtime**: the incident's IncidentVm ``downtime_seconds`` through the API
  (R18: from the VM's last power confirmation before the crash — up to a ping interval
  before the kill — to Running again).

Needs root, Linux, libvirt and qemu (docs/testing.md, "The real-fleet tier"); says
clearly what is missing otherwise.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import signal
import statistics
import time
from typing import Any

from .common import BenchError, fmt, interruptible, machine_busy, machine_info, say, table
from .common import throwaway_database as _throwaway

TARGET_SECONDS = 2.0
START_LINE = re.compile(r"server: start (\S+) → PowerOn \(.*, ([\d.]+) s\)")
LOG_STAMP = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def problem() -> str | None:
    """Why this machine cannot run the benchmark (None: it can)."""
    from .realfleet import requirements_problem

    return requirements_problem()


def run(o: dict[str, Any]) -> dict[str, Any]:
    if not o["database"].startswith(("postgres://", "postgresql://")):
        raise BenchError("bench agent-crash runs on PostgreSQL (--database postgres://…)")
    why = problem()
    if why:
        raise BenchError(f"bench agent-crash needs a real fleet (root, libvirt, qemu; "
                         f"docs/testing.md, 'The real-fleet tier'): {why}")
    from .realfleet import (
        SUBNET,
        Reaper,
        become_subreaper,
        fleet_lock,
        subnet_problem,
        sweep,
    )

    with interruptible(), fleet_lock():
        sweep()
        trouble = subnet_problem()
        if trouble:
            raise BenchError(f"bench agent-crash: {trouble}")
        become_subreaper(True)
        reaper = Reaper()
        reaper.start()
        try:
            with _throwaway(o, "; real fleet") as (db, tmp):
                info = machine_info(db)
                rounds = _run(o, db, tmp, SUBNET)
        finally:
            reaper.stop()
            become_subreaper(False)
    return {"benchmark": "agent-crash", "machine": info, "command": o["command"],
            "hosts": o["hosts"], "rounds": rounds, "target_seconds": TARGET_SECONDS}


def _run(o: dict, db, tmp, subnet: str) -> list[dict]:
    from hadash.supervisor import Supervisor, free_port

    from .realfleet import (
        BMC,
        SERVER_IP,
        Booting,
        Fleet,
        Guest,
        enrol_and_register,
        start_hadash,
    )

    fleet = Fleet(tmp / "hosts", hosts=o["hosts"], echo=o["verbose"])
    fleet.join_key = secrets.token_urlsafe(32)
    guests = {f"vm-{i}": Guest(f"vm-{i}", h.name) for i, h in enumerate(fleet.hosts, 1)}
    sup = Supervisor(echo=o["verbose"], grace=8.0)
    api = None
    t0 = time.monotonic()
    try:
        fleet.build()
        port = free_port(SERVER_IP)
        fleet.server_url = f"http://{SERVER_IP}:{port}"
        booting = Booting(fleet, guests)
        booting.start()
        env = {**os.environ, "DATABASE_URL": db.url, "HADASH_VAR_DIR": str(tmp),
               "SECRET_KEY": secrets.token_urlsafe(50), "HADASH_AGENT_KEY": fleet.join_key,
               "HADASH_AGENT_NETWORKS": f"{subnet}.0/24", "HADASH_ENGINE_LOOPS": "2",
               "HADASH_LOG": os.environ.get("HADASH_BENCH_LOG", "INFO"),
               "ALLOWED_HOSTS": f"{SERVER_IP},localhost,127.0.0.1"}
        env.pop("DEBUG", None)
        env.pop("CI", None)
        sup.base_env = env
        say(f"{o['hosts']} hosts booting; migrating the database …")
        api = start_hadash(sup, env, port)
        bmc = BMC(fleet, "admin", secrets.token_urlsafe(16))
        fleet.bmc = bmc
        bmc.start()
        booting.join()
        if booting.error:
            raise BenchError(f"cannot boot the hosts: {booting.error}")
        enrol_and_register(api, fleet, bmc, guests)
        say(f"set up in {time.monotonic() - t0:.0f} s: {len(guests)} HA guests, one per host")
        rounds = []
        names = sorted(guests)
        for i in range(o["kills"]):
            time.sleep(o["settle"])
            rounds.append(one_round(api, fleet, names[i % len(names)], i + 1))
            _check_alive(sup, fleet)
        return rounds
    except (RuntimeError, TimeoutError) as exc:
        for child in [*sup.children, *fleet.sup.children]:
            say(f"---- {child.name} (last lines)\n" + "\n".join(child.log[-30:]))
        raise BenchError(str(exc)) from exc
    finally:
        if api is not None:
            api.close()
        sup.stop()
        left = fleet.teardown()
        if left:
            say(f"left behind: {left}")


def _check_alive(sup, fleet) -> None:
    dead = sup.first_exited()
    if dead is not None:
        raise BenchError(f"{dead.name} exited with {dead.proc.returncode}:\n"
                         + "\n".join(dead.log[-30:]))


def _qemu(fleet, guest: str) -> list[tuple[str, int]]:
    from .realfleet import qemu_processes

    inodes = {h.netns_inode: h.name for h in fleet.hosts}
    return sorted(qemu_processes(inodes).get(guest, []))


def _get(api, path: str, **params) -> Any:
    r = api.get(path, params=params or None)
    if r.status_code != 200:
        raise BenchError(f"GET {path}: HTTP {r.status_code} {r.text[:300]}")
    return r.json()


def _stamp(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def one_round(api, fleet, name: str, n: int) -> dict:
    vm = _get(api, f"/vms/{name}")
    if vm["state"] != "Running":
        raise BenchError(f"{name} is {vm['state']} before round {n}")
    found = _qemu(fleet, name)
    if [h for h, _ in found] != [vm["host"]]:
        raise BenchError(f"{name}: qemu processes {found}, the API says {vm['host']}")
    host, pid = found[0]
    rows = _get(api, "/events", latest="true", limit=1)
    after = rows[-1]["id"] if rows else 0
    agent = fleet.host(host).agent
    log_from = len(agent.log) if agent else 0
    logs_from = {h.name: len(h.agent.log) for h in fleet.hosts if h.agent is not None}
    busy0 = machine_busy()
    t_kill = time.time()
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    where = None
    while time.monotonic() < deadline:
        v = _get(api, f"/vms/{name}")
        if v["state"] == "Running" and v["power_state"] == "PowerOn" and v["host"]:
            procs = _qemu(fleet, name)
            if [h for h, _ in procs] == [v["host"]] and procs[0][1] != pid:
                where = v["host"]
                break
        time.sleep(0.1)
    if where is None:
        raise BenchError(f"round {n}: {name} not running again 90 s after the kill")
    busy1 = machine_busy()
    events = [e for e in _get(api, "/events", after=after, limit=500)
              if e["subject_name"] == name]
    stamps: dict[str, float] = {}

    def first(key: str, pred) -> None:
        e = next((e for e in events if pred(e)), None)
        if e is not None:
            stamps[key] = _stamp(e["time"])

    first("poweroff", lambda e: e["event"] == "PowerStateChanged"
          and e.get("new") in ("PowerOff", "PowerReportMissing"))
    first("investigated", lambda e: e["event"] == "WorkStep" and "stopping it" in e["message"])
    first("stopped", lambda e: e["event"] == "HaStopped")
    first("placed", lambda e: e["event"] == "HaStarting")
    first("running", lambda e: e["event"] in ("HaStarted", "OutOfBandStart")
          or (e.get("field") == "state" and e.get("new") == "Running"))
    running_by = next((e["event"] for e in events if e["event"] in ("HaStarted",
                                                                    "OutOfBandStart")), "?")
    if agent is not None:
        for line in agent.log[log_from:]:
            m = LOG_STAMP.search(line)
            if m and f"libvirt: {name} " in line:
                stamps["agent_event"] = dt.datetime.strptime(
                    m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                break
    start_s = None  # the target agent's own account of the start (libvirt)
    for h in fleet.hosts:
        if h.agent is None:
            continue
        for line in h.agent.log[logs_from.get(h.name, 0):]:
            m = START_LINE.search(line)
            if m and m.group(1) == name:
                start_s = float(m.group(2))
                stamp = LOG_STAMP.search(line)
                if stamp:
                    stamps["agent_started"] = dt.datetime.strptime(
                        stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    downtime = None
    incidents = _get(api, "/incidents", kind="vm", limit=5)
    for inc in incidents:
        detail = _get(api, f"/incidents/{inc['id']}")
        row = next((x for x in detail.get("vms", []) if x["vm"] == name), None)
        if row and row.get("running_at") and _stamp(row["running_at"]) >= t_kill - 1:
            downtime = row["downtime_seconds"]
            break
    since = {k: round(v - t_kill, 3) for k, v in sorted(stamps.items(), key=lambda kv: kv[1])}
    cpus = os.cpu_count() or 1
    load = round((busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1e-6) * cpus, 2)
    result = {"round": n, "vm": name, "from": host, "to": where, "since_kill": since,
              "agent_start_s": start_s,
              "running_by": running_by, "incident_downtime_s": downtime,
              "machine_cores_busy": load}
    run_s = since.get("running")
    agent_s = since.get("agent_event")
    say(f"round {n}: {name} on {host} killed → Running on {where} "
        f"{fmt(run_s, 2)} s (from the agent's event {fmt(_diff(run_s, agent_s), 2)} s; "
        f"incident downtime {fmt(downtime, 2)} s); {since}")
    return result


def _diff(a, b):
    return None if a is None or b is None else round(a - b, 3)


def report(r: dict[str, Any]) -> str:
    lines = [f"A VM crashes on a host with a real agent (kill -9 of its qemu; {r['hosts']} "
             "real hosts): seconds from the kill to each step, from the VM's own events"]
    keys = ["agent_event", "poweroff", "investigated", "stopped", "placed", "running"]
    heads = ["agent saw it", "PowerOff stored", "investigated", "HaStopped", "HaStarting",
             "Running"]
    rows = []
    for x in r["rounds"]:
        s = x["since_kill"]
        rows.append([x["round"], x["vm"], f"{x['from']} → {x['to']}",
                     *[fmt(s.get(k), 2) for k in keys],
                     fmt(_diff(s.get("running"), s.get("agent_event")), 2),
                     fmt(x.get("agent_start_s"), 2),
                     fmt(x["incident_downtime_s"], 2), fmt(x["machine_cores_busy"], 2)])
    lines.append(table(["#", "VM", "host", *heads, "agent event → Running",
                        "start in the agent (libvirt)",
                        "incident downtime", "machine busy (cores)"], rows))
    kill = [x["since_kill"]["running"] for x in r["rounds"] if "running" in x["since_kill"]]
    agent = [d for x in r["rounds"] if (d := _diff(x["since_kill"].get("running"),
                                                   x["since_kill"].get("agent_event")))
             is not None]
    down = [x["incident_downtime_s"] for x in r["rounds"] if x["incident_downtime_s"]
            is not None]
    summary = []
    for label, values in (("kill → Running", kill), ("agent's event → Running", agent),
                          ("incident downtime", down)):
        if values:
            summary.append([label, len(values), fmt(statistics.median(values), 2),
                            fmt(min(values), 2), fmt(max(values), 2)])
    lines.append(table(["", "rounds", "median s", "best s", "worst s"], summary))
    if kill:
        worst = max(kill)
        lines.append(f"target: running again ≤ {r['target_seconds']:g} s after the crash, "
                     f"worst {worst:.2f} s: {'met' if worst <= r['target_seconds'] else 'NOT met'}")
    return "\n".join(lines)

