"""``bench detect``: detection and recovery latency for a simulated fleet, in real time.

The whole system runs (:class:`bench.system.System`) with ``ping.interval`` set through
the operator API before the fleet connects. When every host is Up and every VM is
registered and Running, hosts are powered off one at a time through the simulator's
control API (each in another cluster, the next only after the previous one recovered):

* **detection** — power-off → the host shows Down in the operator API (polled every
  100 ms). Reported since the power-off and since the host's last ping (its
  ``last_ping``, which stops moving at the power-off): the target, ping.interval ×
  ping.timeout + 1 s, is about the latter; from the power-off up to one ping interval
  less has passed since the last ping. The HostDown event's own timestamp is reported
  too (the engine stamps it with the time the investigation started).
* **recovery** — Down → every HA VM the host ran has an HaStarted event (Running on
  another host; checked through the API at the end), from the events' timestamps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from .common import (
    BenchDatabase,
    BenchError,
    fmt,
    interruptible,
    machine_info,
    median,
    say,
    table,
    throwaway_database,
)
from .system import System, parse_time


def run(o: dict[str, Any]) -> dict[str, Any]:
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def pick_victims(hosts: list[dict], n: int, prefer: set[str]) -> list[str]:
    """``n`` hosts spread over the fleet, each from another cluster when possible,
    among those in ``prefer`` (hosts running HA VMs) when there are enough."""
    if len([h for h in hosts if h["name"] in prefer]) >= n:
        hosts = [h for h in hosts if h["name"] in prefer]
    by_cluster: dict[str, list[str]] = {}
    for h in sorted(hosts, key=lambda h: h["name"]):
        by_cluster.setdefault(h["cluster"], []).append(h["name"])
    clusters = sorted(by_cluster)
    picked: list[str] = []
    i = 0
    while len(picked) < n:
        names = by_cluster[clusters[i % len(clusters)]]
        k = i // len(clusters)
        if k < len(names):
            picked.append(names[(k * 7 + len(names) // 2) % len(names)])
        i += 1
        if i > n * len(clusters) + len(hosts):
            break
    return picked


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    config = {"ping.interval": str(o["ping_interval"])}
    if o["ping_timeout"] is not None:
        config["ping.timeout"] = str(o["ping_timeout"])
    if o["ha_workers"] is not None:
        config["ha.workers"] = str(o["ha_workers"])
    info = machine_info(db)
    system = System(db, tmp, verbose=o["verbose"], config=config)
    failures: list[dict] = []
    with system:
        system.start(hosts=o["hosts"], vms=o["vms"], ha_ratio=o["ha_ratio"],
                     clusters=o["clusters"], start_delay=o["start_delay"])
        cfg = {c["name"]: c["value"] for c in system.get("/config")}
        interval = float(cfg["ping.interval"])
        timeout_factor = float(cfg["ping.timeout"])
        target = interval * timeout_factor + 1.0
        limit = o["timeout"] or 300 + 0.1 * o["vms"]
        ready = system.wait_ready(limit)
        settle = o["settle"] if o["settle"] is not None else 2 * interval
        say(f"fleet ready in {ready:.0f} s; settling {settle:.0f} s")
        time.sleep(settle)
        health = system.health()
        say(f"simulator: {health.get('pings_per_s')} pings/s, ping lateness "
            f"{health.get('ping_late_ms')}, RSS {health.get('rss_mb')} MB")
        with_ha = {v["host"] for v in system.get("/vms", ha_enabled="true", limit=10000)}
        victims = pick_victims(system.get("/hosts", limit=10000), o["failures"], with_ha)
        for n, victim in enumerate(victims, 1):
            failures.append(one_failure(system, victim, interval, timeout_factor, n,
                                        len(victims)))
        engine = system.get("/engine")
        health_after = system.health()
    since_off = [f["detect_since_poweroff_s"] for f in failures]
    since_ping = [f["detect_since_last_ping_s"] for f in failures]
    recovery = [f["recovery_s"] for f in failures if f["recovery_s"] is not None]
    return {
        "benchmark": "detect", "machine": info, "command": o["command"],
        "hosts": o["hosts"], "vms": o["vms"], "ha_ratio": o["ha_ratio"],
        "clusters": o["clusters"], "start_delay": o["start_delay"], "config": cfg,
        "ready_s": round(ready, 1), "target_detect_s": target,
        "failures": failures,
        "summary": {
            "detect_since_poweroff": {"median": median(since_off), "worst": max(since_off)},
            "detect_since_last_ping": {"median": median(since_ping), "worst": max(since_ping)},
            "recovery": {"median": median(recovery), "worst": max(recovery, default=None)},
            "detect_target_met": max(since_ping) <= target,
        },
        "simulator": {"before": health, "after": health_after},
        "engine": engine,
    }


def one_failure(system: System, victim: str, interval: float, timeout_factor: float,
                n: int, total: int) -> dict[str, Any]:
    system.wait_caught_up(120)
    vms = system.host_vms(victim)
    ha = {v["name"] for v in vms if v["ha_enabled"] and v["state"] == "Running"}
    backlog = system.backlog()
    after = system.last_event_id()
    say(f"failure {n}/{total}: power off {victim} ({len(vms)} VMs, {len(ha)} HA) …")
    t_off = system.fault(f"host {victim} power off")
    bound = interval * timeout_factor + 60
    t_seen_down = system.wait_host_status(victim, "Down", bound)
    host = system.get(f"/hosts/{victim}")
    last_ping = parse_time(host["last_ping"]) if host.get("last_ping") else t_off
    down_events = system.events(after, subject="host", subject_name=victim, event="HostDown")
    t_down_event = parse_time(down_events[0]["time"]) if down_events else None
    started = system.wait_started(ha, after, timeout=120 + 10 * len(ha), victim=victim)
    t_started = [parse_time(e["time"]) for e in started.values()]
    t_recovered = max(t_started) if t_started else None
    wrong = []
    for name in sorted(ha):
        vm = system.get(f"/vms/{name}")
        if vm["state"] != "Running" or vm["host"] in (victim, None):
            wrong.append(f"{name}: {vm['state']} on {vm['host']}")
    if wrong:
        raise BenchError(f"HA VMs of {victim} not Running elsewhere: {'; '.join(wrong[:5])}")
    # Recovery is measured from the moment Down was committed: the poll saw it at
    # t_seen_down; the event's stamp is when the investigation started (earlier).
    t_down = t_seen_down
    result = {
        "host": victim,
        "vms": len(vms),
        "ha_vms": len(ha),
        "detect_since_poweroff_s": round(t_seen_down - t_off, 2),
        "detect_since_last_ping_s": round(t_seen_down - last_ping, 2),
        "poweroff_after_last_ping_s": round(t_off - last_ping, 2),
        "down_event_since_last_ping_s": round(t_down_event - last_ping, 2)
        if t_down_event else None,
        "recovery_s": round(t_recovered - t_down, 2) if t_recovered else None,
        "recovery_since_down_event_s": round(t_recovered - t_down_event, 2)
        if t_recovered and t_down_event else None,
        "first_start_s": round(min(t_started) - t_down, 2) if t_started else None,
        "backlog_at_poweroff": backlog,
    }
    say(f"  {victim}: Down {result['detect_since_poweroff_s']} s after power-off "
        f"({result['detect_since_last_ping_s']} s after its last ping); {len(ha)} HA VMs "
        f"Running elsewhere {fmt(result['recovery_s'], 2)} s after Down")
    return result


def report(r: dict[str, Any]) -> str:
    cfg = r["config"]
    s = r["summary"]
    lines = [
        f"detection and recovery: {r['hosts']} hosts, {r['vms']} VMs (HA ratio "
        f"{r['ha_ratio']}), {r['clusters']} clusters; ping.interval {cfg['ping.interval']}, "
        f"ping.timeout {cfg['ping.timeout']}, ha.workers {cfg['ha.workers']}, VM start "
        f"{r['start_delay']} s; fleet ready after {r['ready_s']} s",
    ]
    rows = [[f["host"], f["ha_vms"], fmt(f["poweroff_after_last_ping_s"], 2),
             fmt(f["detect_since_poweroff_s"], 2), fmt(f["detect_since_last_ping_s"], 2),
             fmt(f["down_event_since_last_ping_s"], 2), fmt(f["recovery_s"], 2),
             fmt(f["first_start_s"], 2), f.get("backlog_at_poweroff", "–")]
            for f in r["failures"]]
    lines.append(table(["host", "HA VMs", "power-off after last ping s",
                        "Down since power-off s", "Down since last ping s",
                        "HostDown stamp since last ping s", "recovery since Down s",
                        "first VM started s", "ping backlog at power-off"], rows))
    lines.append("")
    lines.append(table(
        ["", "median s", "worst s", "target s"],
        [["detection since power-off", fmt(s["detect_since_poweroff"]["median"], 2),
          fmt(s["detect_since_poweroff"]["worst"], 2), "–"],
         ["detection since last ping", fmt(s["detect_since_last_ping"]["median"], 2),
          fmt(s["detect_since_last_ping"]["worst"], 2), fmt(r["target_detect_s"], 1)],
         ["recovery (Down → all HA VMs Running elsewhere)", fmt(s["recovery"]["median"], 2),
          fmt(s["recovery"]["worst"], 2), "–"]]))
    lines.append(f"detection target (ping.interval × ping.timeout + 1 s = "
                 f"{r['target_detect_s']:.1f} s since the last ping): "
                 f"{'met' if s['detect_target_met'] else 'NOT met'} by the worst case")
    return "\n".join(lines)
