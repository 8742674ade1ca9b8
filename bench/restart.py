"""``bench restart``: HA restart throughput — one failed host's HA VMs Running
elsewhere — for each ``ha.workers`` value.

The simulated fleet has one victim host per ``ha.workers`` value plus ``spare-hosts``,
each running ``vms`` HA-enabled VMs (the simulator places its demo VMs round-robin, so
every host gets the same number), with room for all of them. The victims not yet
failed are Disabled, so restarted VMs land only on the spares; a victim is Enabled
again just before it is powered off (a Disabled host would be disconnected without
investigation, R3); ha.max.hosts.down.ratio is 1 so the earlier victims, still Down,
do not engage the mass-failure brake (R14). For each value: ``PUT
/api/v1/config/ha.workers``, power the victim off, and time from the moment the
operator API shows it Down to the last HaStarted event of its VMs. ``--start-delay``
is how long the simulator takes to start a VM (0: instant starts, the target's case;
1.0 shows the concurrency); a list runs the whole benchmark once per value, each with
a fresh system.

``--failed-hosts N`` (a rack, issue 12 target 3): N victims per ``ha.workers`` value
power off together (their faults sent back to back). Detection is then the HostDown
events' own stamps (first and last of the N), and every VM's Running time is the
stamp of the event that made it Running elsewhere (HaStarted, or the state change of
a power report), so polling adds nothing. The CPU of the web, engine and simulator
processes and of PostgreSQL's backends is measured from the first HostDown to the
last VM Running, and the engine's in-flight HA items are sampled every 0.2 s (busy
worker slots), to say what bounds the rate.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from .common import (
    BenchDatabase,
    BenchError,
    CpuMeter,
    fmt,
    interruptible,
    machine_info,
    say,
    table,
    throwaway_database,
)
from .system import System, parse_time

TARGET_VMS = 100
TARGET_SECONDS = 5.0  # 100 HA VMs Running elsewhere within 5 s of detection, 20 workers
RACK_HOSTS, RACK_VMS, RACK_SECONDS = 10, 100, 30.0  # issue 12 target 3: 1-second starts


def run(o: dict[str, Any]) -> dict[str, Any]:
    runs: list[dict] = []
    info: dict[str, Any] = {}
    with interruptible():
        for delay in o["start_delays"]:
            with throwaway_database(o, f"; VM start {delay} s") as (db, tmp):
                info = info or machine_info(db)
                runs.extend(_run(o, db, tmp, delay))
    return {"benchmark": "restart", "machine": info, "command": o["command"],
            "vms": o["vms"], "failed_hosts": o.get("failed_hosts", 1), "runs": runs,
            "engine_processes": o.get("engine_processes") or 1,
            "target": {"vms": TARGET_VMS, "seconds": TARGET_SECONDS, "workers": 20,
                       "start_delay": 0.0}}


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path, delay: float) -> list[dict]:
    workers = o["workers"]
    per_run = o.get("failed_hosts", 1)
    victims_n = len(workers) * per_run
    hosts = victims_n + o["spare_hosts"]
    per_host = o["vms"]
    # Previous victims stay Down: the mass-failure brake (R14) must not count them.
    config = {"ping.interval": "2", "ping.timeout": "2", "ha.workers": str(workers[0]),
              "ha.max.hosts.down.ratio": "1"}
    system = System(db, tmp, verbose=o["verbose"], config=config)
    results: list[dict] = []
    with system:
        # Room for everything on every host: capacity is not what is measured.
        system.start(hosts=hosts, vms=hosts * per_host, ha_ratio=1.0, clusters=1,
                     start_delay=delay, host_cpus=100_000, host_memory_mb=100_000_000,
                     engine_processes=o.get("engine_processes") or 1)
        system.wait_ready(o["timeout"] or 300 + 0.1 * hosts * per_host)
        names = [h["name"] for h in system.get("/hosts", limit=10000)]
        victims = names[:victims_n]
        for v in victims:
            system.post(f"/hosts/{v}/disable")
        say(f"victims {', '.join(victims)} disabled until their turn; "
            f"{hosts - victims_n} spare hosts")
        for i, w in enumerate(workers):
            group = victims[i * per_run:(i + 1) * per_run]
            if per_run == 1:
                results.append(one_run(o, system, group[0], w, delay))
            else:
                results.append(rack_run(o, system, db, group, w, delay))
    return results


def one_run(o: dict, system: System, victim: str, workers: int, delay: float) -> dict:
    system.set_config("ha.workers", str(workers))
    system.post(f"/hosts/{victim}/enable")
    time.sleep(2.5)  # the engine loops re-read ha.workers every second
    ha = {v["name"] for v in system.host_vms(victim)
          if v["ha_enabled"] and v["state"] == "Running"}
    after = system.last_event_id()
    say(f"ha.workers {workers}: power off {victim} ({len(ha)} HA VMs, VM start {delay} s) …")
    system.fault(f"host {victim} power off")
    t_down = system.wait_host_status(victim, "Down", 60)
    limit = o["timeout"] or 120 + 2 * len(ha) * max(delay, 0.05) / workers
    t0 = time.monotonic()
    started = system.wait_started(ha, after, timeout=limit, victim=victim)
    times = sorted(parse_time(e["time"]) for e in started.values())
    other = sorted({e["event"] for e in started.values()} - {"HaStarted"})
    paths = {}
    if other:
        say(f"  note: {sum(e['event'] != 'HaStarted' for e in started.values())} VMs became "
            f"Running through {', '.join(other)} (not HaStarted)")
        # Their whole story since the power-off, so the path can be told afterwards.
        for name in sorted(n for n, e in started.items() if e["event"] != "HaStarted"):
            paths[name] = [e["event"] for e in system.events(after, subject="vm",
                                                             subject_name=name)]
            say(f"    {name}: {' → '.join(paths[name])}")
    wrong = [n for n in ha if system.get(f"/vms/{n}")["host"] in (victim, None)]
    if wrong:
        raise BenchError(f"{len(wrong)} VMs of {victim} are not Running elsewhere: "
                         f"{wrong[:5]}")
    total = times[-1] - t_down
    # Steady-state rate: from the first start to the last (excludes the claim of the
    # first items and investigation ramp-up).
    span = times[-1] - times[0]
    result = {
        "start_delay": delay, "workers": workers, "host": victim, "vms": len(ha),
        "seconds": round(total, 2),
        "first_start_s": round(times[0] - t_down, 2),
        "vms_per_s": round(len(ha) / total, 1) if total > 0 else None,
        "steady_vms_per_s": round((len(ha) - 1) / span, 1) if span > 0 else None,
        "waited_s": round(time.monotonic() - t0, 1),
        "running_by": {ev: sum(e["event"] == ev for e in started.values())
                       for ev in sorted({e["event"] for e in started.values()})},
        "other_paths": paths,
    }
    say(f"  {len(ha)} VMs Running elsewhere {total:.2f} s after Down "
        f"({fmt(result['vms_per_s'])} VMs/s)")
    return result


def rack_run(o: dict, system: System, db: BenchDatabase, victims: list[str], workers: int,
             delay: float) -> dict:
    """Power off ``victims`` together; from their HostDown stamps to every HA VM of
    theirs Running elsewhere, by the VMs' own events."""
    system.set_config("ha.workers", str(workers))
    for v in victims:
        system.post(f"/hosts/{v}/enable")
    time.sleep(2.5)  # the engine loops re-read ha.workers every second
    ha: set[str] = set()
    for v in victims:
        ha |= {x["name"] for x in system.host_vms(v)
               if x["ha_enabled"] and x["state"] == "Running"}
    after = system.last_event_id()
    say(f"ha.workers {workers}: power off {len(victims)} hosts {victims[0]}…{victims[-1]} "
        f"({len(ha)} HA VMs, VM start {delay} s) …")
    procs = {c.name: c.proc.pid for c in system.sup.children}
    meter = CpuMeter(groups={name: [pid] for name, pid in procs.items()},
                     pg_database=db.name if db.vendor == "postgresql" else "")
    meter.start()
    t_fault = time.time()
    for v in victims:
        system.fault(f"host {v} power off")
    limit = o["timeout"] or 120 + 2 * len(ha) * max(delay, 0.05) / workers
    # Busy worker slots (HA items taken and unfinished) while the rack recovers.
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        if db.vendor != "postgresql":
            return
        import psycopg

        with psycopg.connect(**db.conninfo(db.name), autocommit=True) as conn:
            while not stop.wait(0.2):
                samples.append((time.time(), _in_flight(conn)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        started = _wait_running(system, ha, after, limit)
    finally:
        stop.set()
        sampler.join(2)
    t_seen = time.time()
    cpu = meter.stop()
    downs = {e["subject_name"]: parse_time(e["time"])
             for e in system.events(after, subject="host", event="HostDown")
             if e["subject_name"] in victims}
    if len(downs) != len(victims):
        raise BenchError(f"HostDown events for {sorted(downs)} only, of {victims}")
    done = set(started)
    by_vm: dict[str, str | None] = {}
    while True:
        page = system.get("/vms", limit=10000, offset=len(by_vm))
        by_vm.update((x["name"], x["host"]) for x in page)
        if len(page) < 10000:
            break
    wrong = [n for n in done if by_vm.get(n) in (*victims, None)]
    if wrong:
        raise BenchError(f"{len(wrong)} VMs of the rack are not Running elsewhere: "
                         f"{wrong[:5]}")
    times = sorted(parse_time(e["time"]) for e in started.values())
    first_down, last_down = min(downs.values()), max(downs.values())
    total = times[-1] - first_down
    span = times[-1] - times[0]
    window = [n for t, n in samples if first_down <= t <= times[-1]]
    busy = {"max": max(window, default=None),
            "mean": round(sum(window) / len(window), 1) if window else None}
    result = {
        "start_delay": delay, "workers": workers, "hosts": victims, "vms": len(ha),
        "running": len(done), "timeout_s": round(limit),
        "seconds": round(total, 2),
        "first_start_s": round(times[0] - first_down, 2),
        "last_down_s": round(last_down - first_down, 2),
        "fault_to_first_down_s": round(first_down - t_fault, 2),
        "vms_per_s": round(len(done) / total, 1) if total > 0 else None,
        "steady_vms_per_s": round((len(done) - 1) / span, 1) if span > 0 else None,
        "busy_slots": busy,
        "cpu": cpu, "cpu_window_s": round(t_seen - t_fault, 1),
        "running_by": {ev: sum(e["event"] == ev for e in started.values())
                       for ev in sorted({e["event"] for e in started.values()})},
    }
    say(f"  {len(done)} VMs Running elsewhere {total:.2f} s after the first HostDown "
        f"(first {result['first_start_s']:.2f} s, {fmt(result['vms_per_s'])} VMs/s; "
        f"busy slots mean {busy['mean']} max {busy['max']}; CPU {cpu})")
    return result


def _wait_running(system: System, names: set[str], after: int, timeout: float) -> dict:
    """Until every VM of ``names`` has a HaStarted (or OutOfBandStart: its host's report
    won the race) event after event ``after``; the earliest, by VM name. Reads all of
    them again each time: with many workers, events commit out of id order, so a
    cursor would skip some (System.wait_started then asks VM by VM)."""
    deadline = time.monotonic() + timeout
    while True:
        events = [e for kind in ("HaStarted", "OutOfBandStart")
                  for e in system.events(after, event=kind)]
        events.sort(key=lambda e: (e["time"], e["id"]), reverse=True)
        seen = {e["subject_name"]: e for e in events if e["subject_name"] in names}
        if len(seen) == len(names):
            return seen
        if time.monotonic() > deadline:
            # Reported as such (the other ha.workers values still run), not an error.
            say(f"  only {len(seen)}/{len(names)} VMs of the rack Running elsewhere after "
                f"{timeout:.0f} s")
            return seen
        system.alive()
        time.sleep(1.0)


def _in_flight(conn) -> int:
    """HA items taken and not finished: the worker slots in use (one cheap query on
    the bench's own connection, not through the web server it would load)."""
    from hadash.choices import FINAL_STEPS

    row = conn.execute("SELECT count(*) FROM op_ha_work WHERE taken IS NOT NULL "
                       "AND NOT (step = ANY(%s))", [list(FINAL_STEPS)]).fetchone()
    return int(row[0])


def rack_report(r: dict[str, Any]) -> str:
    n = r["failed_hosts"]
    lines = [f"A rack fails: {n} hosts with {r['vms']} HA VMs each power off together; from "
             "the first HostDown event to each VM's own Running event (HaStarted) on "
             f"another host; {r.get('engine_processes', 1)} engine process(es)"]
    rows = []
    for x in r["runs"]:
        target = ""
        if x["start_delay"] >= 1.0 and n >= RACK_HOSTS and r["vms"] >= RACK_VMS:
            ok = x["seconds"] <= RACK_SECONDS
            target = f"≤ {RACK_SECONDS:.0f} s: {'met' if ok else 'NOT met'}"
        c = x["cpu"]
        vms = x["vms"] if x.get("running", x["vms"]) == x["vms"] else \
            f"{x['running']} of {x['vms']} (gave up at {x['timeout_s']} s)"
        if x.get("running", x["vms"]) < x["vms"]:
            target = f"≤ {RACK_SECONDS:.0f} s: NOT met"
        rows.append([fmt(x["start_delay"], 1), x["workers"], vms, fmt(x["seconds"], 2),
                     fmt(x["first_start_s"], 2), fmt(x["last_down_s"], 2),
                     fmt(x["vms_per_s"], 1), fmt(x["steady_vms_per_s"], 1),
                     f"{x['busy_slots']['mean']} / {x['busy_slots']['max']}",
                     fmt(c.get("engine"), 2), fmt(c.get("web"), 2), fmt(c.get("fleet"), 2),
                     fmt(c.get("postgres"), 2), fmt(c.get("other"), 2), target])
    lines.append(table(["VM start s", "ha.workers", "VMs", "first Down → all Running s",
                        "→ first Running s", "last Down s", "VMs/s", "VMs/s first→last",
                        "busy slots mean / max", "CPU engine", "CPU web", "CPU sim",
                        "CPU postgres", "CPU other", "target"], rows))
    lines.append("CPU in cores (2.0 = both cores) from the faults to the last VM seen "
                 "Running; busy slots = HA items taken and unfinished, sampled every 0.2 s "
                 "from the database.")
    odd = [f"ha.workers {x['workers']}: {k} via {ev}" for x in r["runs"]
           for ev, k in x.get("running_by", {}).items() if ev != "HaStarted"]
    if odd:
        lines.append("VMs that became Running through another event than HaStarted: "
                     + "; ".join(odd))
    return "\n".join(lines)


def report(r: dict[str, Any]) -> str:
    if r.get("failed_hosts", 1) > 1:
        return rack_report(r)
    lines = [f"HA restart throughput: one failed host with {r['vms']} HA VMs, time from "
             "Down (seen in the API) to the last of them Running elsewhere (its HaStarted "
             "event)"]
    rows = []
    for x in r["runs"]:
        target = ""
        if x["start_delay"] == 0 and x["workers"] == 20:
            ok = x["seconds"] <= TARGET_SECONDS * x["vms"] / TARGET_VMS
            target = f"≤ {TARGET_SECONDS:.0f} s: {'met' if ok else 'NOT met'}"
        rows.append([fmt(x["start_delay"], 1), x["workers"], x["vms"], fmt(x["seconds"], 2),
                     fmt(x["first_start_s"], 2), fmt(x["vms_per_s"], 1),
                     fmt(x["steady_vms_per_s"], 1), target])
    lines.append(table(["VM start s", "ha.workers", "VMs", "Down → all Running s",
                        "Down → first Running s", "VMs/s", "VMs/s first→last", "target"],
                       rows))
    base = {x["start_delay"]: x for x in r["runs"] if x["workers"] == min(
        y["workers"] for y in r["runs"] if y["start_delay"] == x["start_delay"])}
    ratios = []
    for x in r["runs"]:
        b = base.get(x["start_delay"])
        if b and b is not x and b["vms_per_s"] and x["vms_per_s"]:
            ratios.append(f"start {x['start_delay']:g} s: {x['workers']} workers "
                          f"{x['vms_per_s'] / b['vms_per_s']:.1f}× the throughput of "
                          f"{b['workers']}")
    if ratios:
        lines.append("; ".join(ratios))
    odd = [f"ha.workers {x['workers']}: {n} via {ev}" for x in r["runs"]
           for ev, n in x.get("running_by", {}).items() if ev != "HaStarted"]
    if odd:
        lines.append("VMs that became Running through another event than HaStarted (the "
                     "target's power report won the race with the worker): " + "; ".join(odd))
    return "\n".join(lines)
