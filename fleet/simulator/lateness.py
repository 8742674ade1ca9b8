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

``--stub N`` measures the simulator alone: instead of hadash, N stub server processes
(one port, SO_REUSEPORT) answer ``connect``, websocket pings (a pong each),
``POST /ping`` and the operator API calls of registration (after ``--stub-delay``
seconds each, 20 in flight: about 1,000 registration requests a second, far more control
work than a real server lets through), so neither daphne nor PostgreSQL limits or
disturbs the run; ``--ping-interval`` is then the stub's interval.
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


def stub_server(port: int, interval: float, delay: float) -> None:
    """A stand-in for hadash's agent protocol and the registration API (``--stub``)."""
    import asyncio

    from aiohttp import web

    pong = json.dumps({"type": "pong", "ping_interval": interval})
    ids = {"n": 0}

    async def connect(request: web.Request) -> web.Response:
        body = await request.json()
        ids["n"] += 1
        return web.json_response({"token": "t-" + body["name"], "server_token": "s-" +
                                  body["name"], "host_id": ids["n"],
                                  "ping_interval": interval})

    async def ws(request: web.Request) -> web.WebSocketResponse:
        w = web.WebSocketResponse(compress=False)
        await w.prepare(request)
        async for _ in w:
            await w.send_str(pong)
        return w

    async def ping(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ping_interval": interval})

    async def api(request: web.Request) -> web.Response:
        await request.read()
        await asyncio.sleep(delay)
        if request.method == "GET":
            return web.json_response([])
        return web.json_response({"ok": True}, status=201 if request.method == "POST" else 200)

    app = web.Application()
    app.router.add_post("/api/agent/v1/connect", connect)
    app.router.add_get("/api/agent/v1/ws", ws)
    app.router.add_post("/api/agent/v1/ping", ping)
    app.router.add_route("*", "/api/v1/{tail:.*}", api)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                reuse_port=True)


def run_stub(o: argparse.Namespace) -> dict:
    """The simulator against ``--stub`` stub processes (no hadash)."""
    import socket
    import subprocess
    from pathlib import Path

    import httpx

    root = Path(__file__).resolve().parents[2]

    def free_port() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    server_port, sim_port = free_port(), free_port()
    token = "lateness-check"
    procs = [subprocess.Popen([sys.executable, "-m", "fleet.simulator.lateness", "--serve-stub",
                               str(server_port), str(o.ping_interval), str(o.stub_delay)],
                              cwd=root) for _ in range(o.stub)]
    time.sleep(2)
    env = {**os.environ, "HADASH_SIM_STATE_FILE": "", "HADASH_SIM_PROCESSES": str(o.processes)}
    log = open(f"/tmp/lateness-sim-{sim_port}.log", "w")  # noqa: SIM115
    procs.append(subprocess.Popen(
        [sys.executable, "manage.py", "simulate", "--server", f"http://127.0.0.1:{server_port}",
         "--listen", f"127.0.0.1:{sim_port}", "--hosts", str(o.hosts), "--vms", str(o.vms),
         "--api-token", "stub", "--token", token, "--seed", "1", "--status-interval", "10",
         "--connect-concurrency", "50"], cwd=root, env=env, stdout=log,
        stderr=subprocess.STDOUT))
    polls: list[dict] = []
    stop = threading.Event()
    calls = {"n": 0, "errors": 0}
    base = f"http://127.0.0.1:{sim_port}"
    headers = {"Authorization": f"Bearer {token}"}
    try:
        t0 = time.monotonic()
        client = httpx.Client(base_url=base, timeout=30, trust_env=False, headers=headers)
        while True:
            time.sleep(2)
            try:
                h = client.get("/control/health").json()
            except httpx.HTTPError:
                continue
            if h["hosts_connected"] >= o.connected * o.hosts or time.monotonic() - t0 > 240:
                break
        print(f"{h['hosts_connected']} hosts connected after {time.monotonic() - t0:.0f} s",
              file=sys.stderr)
        threads = [threading.Thread(target=hammer, args=(base, headers, o, stop, calls, i),
                                    daemon=True) for i in range(o.hammer)]
        for t in threads:
            t.start()
        polls = poll(lambda: client.get("/control/health").json(), o, t0, calls)
        stop.set()
        final = client.get("/control/health").json()
    finally:
        procs[-1].terminate()
        try:
            procs[-1].wait(10)
        except subprocess.TimeoutExpired:
            procs[-1].kill()
        for proc in procs[:-1]:
            proc.terminate()
            proc.wait(10)
    return {"polls": polls, "final": final, "calls": calls, "log": log.name}


def hammer(base: str, headers: dict, o: argparse.Namespace, stop: threading.Event,
           calls: dict, seed: int) -> None:
    """Control load: the control API, faults that change nothing, the BMCs."""
    import httpx

    rng = random.Random(seed)
    width = max(3, len(str(o.hosts)))
    with httpx.Client(base_url=base, timeout=30, trust_env=False, headers=headers) as c:
        while not stop.is_set():
            host = f"kvm-{rng.randrange(1, o.hosts + 1):0{width}d}"
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


def poll(health, o: argparse.Namespace, t0: float, calls: dict) -> list[dict]:
    """``/control/health`` every 2 s for ``--seconds``: one row a poll."""
    polls = []
    end = time.monotonic() + o.seconds
    while time.monotonic() < end:
        time.sleep(2)
        h = health()
        late = h["ping_late_ms"]
        with open("/proc/loadavg") as f:
            load = float(f.read().split()[0])
        reg = h.get("registration", {})
        row = {"t": round(time.monotonic() - t0, 1), "pings_per_s": h["pings_per_s"],
               "connected": h["hosts_connected"], "p50": late["p50"], "p99": late["p99"],
               "max": late["max"], "load1": load,
               "registration": f"{reg.get('state')} vms {(reg.get('vms') or {}).get('done', 0)}",
               "control_calls": calls["n"]}
        polls.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return polls


def summarize(o: argparse.Namespace, polls: list[dict], final: dict, calls: dict,
              busy: float, info: dict) -> dict:
    return {
        "command": " ".join(sys.argv), "machine": info, "hosts": o.hosts, "vms": o.vms,
        "ping_interval": o.ping_interval, "processes": o.processes, "stub": o.stub,
        "measured_s": o.seconds, "control_calls": calls["n"],
        "control_errors": calls["errors"], "machine_cpu_busy": busy,
        "load1_max": max((r["load1"] for r in polls), default=None),
        "p99_worst_ms": max((r["p99"] or 0 for r in polls), default=None),
        "max_worst_ms": max((r["max"] or 0 for r in polls), default=None),
        "p50_median_ms": sorted(r["p50"] or 0 for r in polls)[len(polls) // 2] if polls
        else None,
        "pings_per_s_median": sorted(r["pings_per_s"] for r in polls)[len(polls) // 2]
        if polls else None,
        "connected_min": min((r["connected"] for r in polls), default=None),
        "final_health": {k: final.get(k) for k in (
            "pings", "ping_acks", "ping_late_ms", "hosts_connected", "registration",
            "rss_mb", "processes", "rss_mb_processes", "processes_restarted")},
    }


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-stub":
        stub_server(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]))
        return 0
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
    p.add_argument("--stub", type=int, default=0,
                   help="N stub server processes instead of hadash (0: the real system)")
    p.add_argument("--stub-delay", type=float, default=0.02,
                   help="seconds a stub registration request takes (0.02)")
    o = p.parse_args()
    if o.stub:
        busy0, total0 = cpu_times()
        out = run_stub(o)
        busy1, total1 = cpu_times()
        busy = round((busy1 - busy0) / max(total1 - total0, 1e-9), 3)
        summary = summarize(o, out["polls"], out["final"], out["calls"], busy,
                            {"nproc": os.cpu_count(), "date": time.strftime(
                                "%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        summary["simulator_log"] = out["log"]
        print(json.dumps(summary, indent=1))
        return 0

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
    os.environ["HADASH_SIM_PROCESSES"] = str(o.processes)
    import django

    django.setup()
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)

    from bench.common import interruptible, machine_info, say, throwaway_database
    from bench.system import System

    stop = threading.Event()
    calls = {"n": 0, "errors": 0}

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
            base = f"http://127.0.0.1:{system.fleet_port}"
            headers = {"Authorization": f"Bearer {system.env['HADASH_FLEET_TOKEN']}"}
            threads = [threading.Thread(target=hammer, args=(base, headers, o, stop, calls, i),
                                        daemon=True) for i in range(o.hammer)]
            for t in threads:
                t.start()
            busy0, total0 = cpu_times()
            polls = poll(system.health, o, t0, calls)
            stop.set()
            busy1, total1 = cpu_times()
            final = system.health()
            for t in threads:
                t.join(35)
    busy = round((busy1 - busy0) / max(total1 - total0, 1e-9), 3)
    summary = summarize(o, polls, final, calls, busy, info)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
