"""Measure the simulator's ping lateness under control load (issue 12, target 2).

    DEBUG=1 flock /work/brief/bench.lock .venv/bin/python -m fleet.simulator.lateness \\
        --hosts 1000 --vms 10000 --processes auto --seconds 180 --hammer 4

Starts the whole system as the benches do (bench.system.System: a throw-away
PostgreSQL database, daphne, a qcluster, ``manage.py simulate`` with registration
through the operator API — one VM a request, the worst case for control load), waits
until most hosts connected, then for ``--seconds`` polls ``/control/health`` every 2 s
while ``--hammer`` threads load the control API, the BMCs and the agents' HTTP server
(``GET /control/hosts`` with every VM list, ``GET /control/health``, a harmless
``bmc H ok`` fault, a Redfish ``GET`` of the system). Prints one line a poll and a JSON
summary: the worst p99 and max of the simulator's own lateness report (each host
against its own grid), pings/s, hosts connected, and the machine's load.

``--processes`` goes to the simulator through ``$HADASH_SIM_PROCESSES`` (0: the agents
in the main process's loop, as before ping processes existed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time


def cpu_times() -> tuple[float, float]:
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hosts", type=int, default=1000)
    p.add_argument("--vms", type=int, default=10000)
    p.add_argument("--ping-interval", type=int, default=2)
    p.add_argument("--processes", default="auto")
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--hammer", type=int, default=4, help="control-load threads (0: none)")
    p.add_argument("--connected", type=float, default=0.95,
                   help="share of hosts connected before measuring (0.95)")
    p.add_argument("--database", default=os.environ.get(
        "HADASH_BENCH_PG", "postgres://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--verbose", action="store_true")
    o = p.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
    os.environ["HADASH_SIM_PROCESSES"] = str(o.processes)
    import django

    django.setup()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    import httpx

    from bench.common import interruptible, machine_info, say, throwaway_database
    from bench.system import System

    polls: list[dict] = []
    stop = threading.Event()
    calls = {"n": 0, "errors": 0}

    def hammer(system: System, seed: int) -> None:
        rng = random.Random(seed)
        base = f"http://127.0.0.1:{system.fleet_port}"
        with httpx.Client(base_url=base, timeout=30, trust_env=False, headers={
                "Authorization": f"Bearer {system.env['HADASH_FLEET_TOKEN']}"}) as c:
            while not stop.is_set():
                host = f"kvm-{rng.randrange(1, o.hosts + 1):0{max(3, len(str(o.hosts)))}d}"
                try:
                    kind = rng.randrange(4)
                    if kind == 0:
                        r = c.get("/control/hosts")
                    elif kind == 1:
                        r = c.get("/control/health")
                    elif kind == 2:
                        r = c.post("/control/faults", json={"do": f"bmc {host} ok"})
                    else:
                        r = c.get(f"/bmc/{host}/redfish/v1/Systems/{host}",
                                  auth=("admin", "hadash-sim"))
                    calls["n"] += 1
                    calls["errors"] += r.status_code != 200
                except httpx.HTTPError:
                    calls["errors"] += 1

    opts = {"database": o.database, "allow_sqlite": False}
    with interruptible(), throwaway_database(opts) as (db, tmp):
        info = machine_info(db)
        system = System(db, tmp, verbose=o.verbose,
                        config={"ping.interval": str(o.ping_interval)})
        with system:
            system.start(hosts=o.hosts, vms=o.vms, ha_ratio=0.5, clusters=10,
                         start_delay=1.0)
            t0 = time.monotonic()
            while True:
                h = system.health()
                if h["hosts_connected"] >= o.connected * o.hosts:
                    break
                if time.monotonic() - t0 > 240:
                    say(f"only {h['hosts_connected']} hosts connected after 240 s; measuring")
                    break
                time.sleep(2)
            say(f"{h['hosts_connected']} hosts connected after {time.monotonic() - t0:.0f} s;"
                f" measuring {o.seconds:.0f} s with {o.hammer} control-load threads")
            threads = [threading.Thread(target=hammer, args=(system, i), daemon=True)
                       for i in range(o.hammer)]
            for t in threads:
                t.start()
            busy0, total0 = cpu_times()
            end = time.monotonic() + o.seconds
            while time.monotonic() < end:
                time.sleep(2)
                h = system.health()
                late = h["ping_late_ms"]
                with open("/proc/loadavg") as f:
                    load = float(f.read().split()[0])
                reg = h.get("registration", {})
                row = {"t": round(time.monotonic() - t0, 1), "pings_per_s": h["pings_per_s"],
                       "connected": h["hosts_connected"], "p50": late["p50"],
                       "p99": late["p99"], "max": late["max"], "load1": load,
                       "registration": f"{reg.get('state')} "
                       f"vms {(reg.get('vms') or {}).get('done', 0)}",
                       "control_calls": calls["n"]}
                polls.append(row)
                say(json.dumps(row))
            stop.set()
            busy1, total1 = cpu_times()
            final = system.health()
            for t in threads:
                t.join(35)
    summary = {
        "command": " ".join(sys.argv), "machine": info, "hosts": o.hosts, "vms": o.vms,
        "ping_interval": o.ping_interval, "processes": o.processes,
        "measured_s": o.seconds, "control_calls": calls["n"],
        "control_errors": calls["errors"],
        "machine_cpu_busy": round((busy1 - busy0) / max(total1 - total0, 1e-9), 3),
        "load1_max": max((r["load1"] for r in polls), default=None),
        "p99_worst_ms": max((r["p99"] or 0 for r in polls), default=None),
        "max_worst_ms": max((r["max"] or 0 for r in polls), default=None),
        "p50_median_ms": sorted(r["p50"] or 0 for r in polls)[len(polls) // 2] if polls
        else None,
        "pings_per_s_min": min((r["pings_per_s"] for r in polls), default=None),
        "connected_min": min((r["connected"] for r in polls), default=None),
        "final_health": {k: final.get(k) for k in (
            "pings", "ping_acks", "ping_late_ms", "hosts_connected", "registration",
            "rss_mb", "processes", "rss_mb_processes", "processes_restarted")},
    }
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
