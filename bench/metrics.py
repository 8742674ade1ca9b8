"""/metrics benchmark (R21): how long a real daphne takes to serve GET /metrics at
1,000 hosts / 10,000 VMs with an incident history, beside the same server's ceiling.

    python manage.py bench metrics [--hosts 1000 --vms-per-host 10 --incidents 2000
                                    --requests 20]

A fresh database (PostgreSQL by default) is seeded through the ORM (bench.seed ping,
then incidents with their VMs, unfinished HA items and counters), one daphne serves
it. Measured: GET /metrics with the bearer token, ``requests`` times one after the
other (median, p95, max). Ceiling, in the same run on the same server: GET /metrics
with a wrong token — the same routing, middleware and process, answered with the
401 before any query — so the difference is what collecting costs.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from hadash.supervisor import Supervisor, daphne_argv, free_port, wait_for_port

from .common import (
    BenchDatabase,
    BenchError,
    bench_env,
    interruptible,
    machine_info,
    manage,
    percentile,
    run_python,
    say,
    table,
    throwaway_database,
)

TOKEN = "bench-metrics-token"

# Incidents (host and VM ones, finished and open), each host incident with 5 VMs back
# Running, a few unfinished HA items, and counters — so every family has samples.
HISTORY = """
import datetime as dt, os, random, sys, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django.setup()
from django.db import transaction
from django.utils import timezone
from hadash.models import HaWork, Incident, IncidentVm
from metrics.counters import inc
from vms.models import VMInstance
n = int(sys.argv[1]); rnd = random.Random(1); now = timezone.now()
vms = list(VMInstance.objects.order_by("id").values_list("id", "name")[:200])
with transaction.atomic():
    incidents = []
    for i in range(n):
        t0 = now - dt.timedelta(hours=rnd.uniform(1, 24 * 30))
        host = i % 2 == 0
        done = i >= 10
        detected = t0 + dt.timedelta(seconds=rnd.uniform(20, 40) if host else rnd.uniform(1, 5))
        incidents.append(Incident(
            kind="host" if host else "vm", state="Resolved" if done else "Open",
            host_name=f"bench-{i:04d}", title=f"bench incident {i}", cluster="c1",
            started_at=t0, detected_at=detected,
            declared_at=detected + dt.timedelta(seconds=10) if host else None,
            fenced_at=detected + dt.timedelta(seconds=rnd.uniform(11, 20)) if host else None,
            resolved_at=t0 + dt.timedelta(seconds=90) if done else None, updated=now))
    made = Incident.objects.bulk_create(incidents, batch_size=2000)
    rows = []
    for inc_ in made:
        for j in range(5 if inc_.kind == "host" else 1):
            rows.append(IncidentVm(
                incident=inc_, vm_name=f"vm-{inc_.pk}-{j}", outcome="restarted",
                down_since=inc_.started_at,
                running_at=inc_.started_at + dt.timedelta(seconds=rnd.uniform(30, 240))))
    IncidentVm.objects.bulk_create(rows, batch_size=5000)
    for vm_id, name in vms[:100]:
        HaWork.objects.create(instance_id=vm_id, vm_type="User", type="HA", reason="HostDown",
                              step="Investigating", state="Running", update_count=0,
                              time_to_try=now, created=now, updated=now)
    inc("pings_ingested", 10_000_000); inc("fences", 400, outcome="ok")
    inc("restarts", 4000, outcome="ok"); inc("notifications", 900, outcome="sent")
print(len(made), len(rows))
"""


def run(o: dict[str, Any]) -> dict[str, Any]:
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def _timed(http: httpx.Client, n: int, headers: dict, status: int) -> tuple[list, int]:
    times = []
    size = 0
    for _ in range(n):
        t0 = time.perf_counter()
        r = http.get("/metrics", headers=headers)
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != status:
            raise BenchError(f"GET /metrics answered {r.status_code}, not {status}: "
                             f"{r.text[:300]}")
        size = len(r.content)
    return times, size


def _summary(times: list[float]) -> dict[str, float]:
    return {"median": statistics.median(times), "p95": percentile(times, 95),
            "max": max(times)}


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    env = bench_env(db.url, str(tmp), HADASH_METRICS_TOKEN=TOKEN)
    say(f"migrating {db.vendor} database {db.name}")
    manage(env, "migrate", "--noinput", "-v0")
    say(f"seeding {o['hosts']} hosts × {o['vms_per_host']} VMs, {o['incidents']} incidents")
    run_python(env, "-m", "bench.seed", "ping", "--hosts", str(o["hosts"]),
               "--vms-per-host", str(o["vms_per_host"]), "--out", str(tmp / "hosts.json"))
    made = run_python(env, "-c", HISTORY, str(o["incidents"])).split()
    port = free_port()
    with Supervisor(echo=False, grace=5, base_env=env) as sup:
        web = sup.python("web", *daphne_argv(port))
        wait_for_port(port, proc=web.proc, timeout=60)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            good = {"Authorization": f"Bearer {TOKEN}"}
            bad = {"Authorization": "Bearer wrong"}
            _timed(http, 2, good, 200)  # warm: imports, connection
            _timed(http, 2, bad, 401)
            say(f"timing GET /metrics × {o['requests']}, and the 401 ceiling × "
                f"{o['requests']}, interleaved")
            served, ceiling = [], []
            for _ in range(o["requests"]):
                t, size = _timed(http, 1, good, 200)
                served += t
                c, _ = _timed(http, 1, bad, 401)
                ceiling += c
            text = http.get("/metrics", headers=good).text
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    return {
        "machine": machine_info(db), "command": o.get("command", "bench metrics"),
        "hosts": o["hosts"], "vms": o["hosts"] * o["vms_per_host"],
        "incidents": int(made[0]), "incident_vms": int(made[1]),
        "served_ms": _summary(served), "ceiling_ms": _summary(ceiling),
        "bytes": size, "samples": len(lines), "requests": o["requests"],
    }


def report(r: dict[str, Any]) -> str:
    s, c = r["served_ms"], r["ceiling_ms"]
    rows = [
        ["GET /metrics served, median", f"{s['median']:.1f} ms",
         f"{c['median']:.1f} ms"],
        ["p95 / max", f"{s['p95']:.1f} / {s['max']:.1f} ms",
         f"{c['p95']:.1f} / {c['max']:.1f} ms"],
        ["response", f"{r['bytes'] / 1024:.1f} KiB, {r['samples']} samples", "401 JSON"],
    ]
    return (f"{r['hosts']} hosts, {r['vms']} VMs, "
            f"{r['incidents']} incidents ({r['incident_vms']} incident VMs), "
            f"{r['requests']} requests each\n"
            + table(["measure", "/metrics (token)", "ceiling (401, same server)"], rows))


def as_json(r: dict[str, Any]) -> str:
    return json.dumps(r, default=str, indent=2)
