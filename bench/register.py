"""Registration benchmark (issue 12, target 4): VMs registered through the real
operator API of a real daphne, one `POST /api/v1/vms` each (the old way, a sample) and
`POST /api/v1/vms/bulk` in chunks and in one request.

    python manage.py bench register [--hosts 1000 --vms 10000 --chunk 2000 --single 200]

A fresh database (PostgreSQL by default) gets ``hosts`` Up hosts and no VMs
(bench.seed ping); one daphne serves it. Measured, one after the other on the same
database, each with its own VM names (spread round-robin over the hosts, every other
one HA-enabled):

* ``single``: ``--single`` VMs, one `POST /api/v1/vms` after the other;
* ``chunks``: ``--vms`` VMs in requests of ``--chunk``, one after the other;
* ``one request``: ``--vms`` VMs in one request (skipped above the API's cap, 20,000).

Each row: requests, wall seconds from the first request sent to the last answer
(client-side JSON encoding not included), VMs/s, the web process's CPU and
PostgreSQL's (share of one core), everything else on the machine (``CPU other``), and
the web process's peak RSS after that row (the web opens a PostgreSQL connection per
request, whose backend exits within the row: its CPU lands in ``CPU other``, so
``CPU postgres`` is a lower bound). The queries one bulk request makes are
counted in a separate process on the same database with the same code
(hadash.api.bulk.register inside a transaction that is rolled back): PostgreSQL here
has no pg_stat_statements to count them in the server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx

from hadash.supervisor import Supervisor, daphne_argv, free_port, wait_for_port

from .common import (
    BenchDatabase,
    BenchError,
    CpuMeter,
    bench_env,
    group_memory,
    interruptible,
    machine_info,
    manage,
    run_python,
    say,
    table,
    throwaway_database,
)

MAX_BULK = 20_000  # hadash.api.serializers.MAX_BULK

# Queries of one bulk registration, counted in-process (same database, same code),
# rolled back so the database is as it was.
QUERIES = """
import json, os, sys, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django.setup()
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from hadash.api import bulk
hosts = [h["name"] for h in json.load(open(sys.argv[1]))][:1000]; out = {}
for n in map(int, sys.argv[2:]):
    items = [{"name": f"q{n}-vm-{i:06d}", "host": hosts[i % len(hosts)], "cpus": 1,
              "memory_mb": 1024, "ha_enabled": i % 2 == 0} for i in range(n)]
    with CaptureQueriesContext(connection) as q:
        try:
            with transaction.atomic():
                bulk.register({"vms": items}, now=timezone.now())
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
    out[n] = len(q.captured_queries)
print(json.dumps(out))
"""


def run(o: dict[str, Any]) -> dict[str, Any]:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def _items(prefix: str, n: int, hosts: list[str]) -> list[dict]:
    return [{"name": f"{prefix}-{i:06d}", "host": hosts[i % len(hosts)], "cpus": 1,
             "memory_mb": 1024, "ha_enabled": i % 2 == 0, "priority": "medium"}
            for i in range(n)]


def _measure(http: httpx.Client, label: str, bodies: list[bytes], path: str, vms: int,
             meter: CpuMeter, web_pgid: int) -> dict[str, Any]:
    """Send ``bodies`` one after the other; the row of the table."""
    meter.start()
    t0 = time.perf_counter()
    slowest = 0.0
    for body in bodies:
        t1 = time.perf_counter()
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
        slowest = max(slowest, time.perf_counter() - t1)
        if r.status_code != 201:
            raise BenchError(f"{label}: POST {path} answered {r.status_code}: {r.text[:500]}")
    seconds = time.perf_counter() - t0
    cpu = meter.stop()
    mem = group_memory(web_pgid)
    row = {"mode": label, "vms": vms, "requests": len(bodies), "seconds": round(seconds, 3),
           "vms_per_s": round(vms / seconds, 1), "slowest_request_s": round(slowest, 3),
           "cpu_web": cpu.get("web"), "cpu_postgres": cpu.get("postgres"),
           "cpu_other": cpu.get("other"), "web_peak_rss_mb": mem["peak_rss_mb"],
           "web_rss_mb": mem["rss_mb"]}
    say(f"{label}: {vms} VMs in {len(bodies)} request(s), {seconds:.2f} s, "
        f"{vms / seconds:.0f} VMs/s; CPU web {cpu.get('web')}, postgres "
        f"{cpu.get('postgres')}, other {cpu.get('other')}; web peak RSS "
        f"{mem['peak_rss_mb']} MB")
    return row


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    env = bench_env(db.url, str(tmp))
    say(f"migrating {db.vendor} database {db.name}")
    manage(env, "migrate", "--noinput", "-v0")
    token = manage(env, "apitoken", "bench", "--create").strip().splitlines()[-1]
    say(f"seeding {o['hosts']} hosts (no VMs)")
    run_python(env, "-m", "bench.seed", "ping", "--hosts", str(o["hosts"]),
               "--vms-per-host", "0", "--out", str(tmp / "hosts.json"))
    hosts = [h["name"] for h in json.loads((tmp / "hosts.json").read_text())]
    port = free_port()
    rows: list[dict[str, Any]] = []
    with Supervisor(echo=o.get("verbose", False), grace=5, base_env=env) as sup:
        web = sup.python("web", *daphne_argv(port))
        wait_for_port(port, proc=web.proc, timeout=60)
        meter = CpuMeter(groups={"web": [web.proc.pid]}, pg_database=db.name)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", trust_env=False,
                          timeout=httpx.Timeout(600.0),
                          headers={"Authorization": f"Bearer {token}"}) as http:
            # Warm: imports, the first connection, the serializers.
            warm = json.dumps({"vms": _items("warm", 2, hosts)}).encode()
            r = http.post("/vms/bulk", content=warm, headers={"Content-Type": "application/json"})
            if r.status_code != 201:
                raise BenchError(f"warm-up POST /vms/bulk answered {r.status_code}: "
                                 f"{r.text[:500]}")
            rss0 = group_memory(web.proc.pid)
            if o["single"]:
                bodies = [json.dumps(i).encode() for i in _items("single", o["single"], hosts)]
                rows.append(_measure(http, "single (POST /vms each)", bodies, "/vms",
                                     o["single"], meter, web.proc.pid))
            if o["chunk"] and o["vms"]:
                items = _items("chunked", o["vms"], hosts)
                bodies = [json.dumps({"vms": items[i:i + o["chunk"]]}).encode()
                          for i in range(0, len(items), o["chunk"])]
                rows.append(_measure(http, f"chunks of {o['chunk']}", bodies, "/vms/bulk",
                                     o["vms"], meter, web.proc.pid))
            if o["vms"] and o["vms"] <= MAX_BULK and not o["no_one_request"]:
                body = json.dumps({"vms": _items("one", o["vms"], hosts)}).encode()
                rows.append(_measure(http, "one request", [body], "/vms/bulk", o["vms"],
                                     meter, web.proc.pid))
            elif o["vms"] > MAX_BULK:
                say(f"one request: skipped, {o['vms']} VMs is above the API's cap "
                    f"({MAX_BULK})")
            total = http.get("/vms", params={"limit": 1}).headers.get("X-Total-Count")
        sup.stop()
    sizes = sorted({n for n in (o["chunk"], min(o["vms"], MAX_BULK)) if n})
    queries = json.loads(run_python(env, "-c", QUERIES, str(tmp / "hosts.json"),
                                    *map(str, sizes)).strip().splitlines()[-1]) \
        if sizes else {}
    return {
        "machine": machine_info(db), "command": o.get("command", "bench register"),
        "benchmark": "register", "hosts": o["hosts"], "vms": o["vms"],
        "rows": rows, "web_rss_before_mb": rss0["rss_mb"],
        "web_peak_rss_before_mb": rss0["peak_rss_mb"], "queries": queries,
        "vms_in_database": int(total or 0),
    }


def report(r: dict[str, Any]) -> str:
    rows = [[x["mode"], f"{x['vms']:,}", x["requests"], f"{x['seconds']:.2f}",
             f"{x['vms_per_s']:,.0f}", f"{x['slowest_request_s']:.2f}", x["cpu_web"],
             x["cpu_postgres"], x["cpu_other"], f"{x['web_peak_rss_mb']:.0f}"]
            for x in r["rows"]]
    q = ", ".join(f"{int(n):,} VMs: {c} queries" for n, c in r["queries"].items())
    return (f"Registration through the operator API: {r['hosts']:,} hosts, one daphne "
            f"(web RSS before: {r['web_rss_before_mb']:.0f} MB)\n"
            + table(["mode", "VMs", "requests", "seconds", "VMs/s", "slowest request s",
                     "CPU web", "CPU postgres", "CPU other", "web peak RSS MB"], rows)
            + (f"\nqueries per bulk request (in-process, same code, rolled back): {q}"
               if q else "")
            + f"\nVMs in the database at the end: {r['vms_in_database']:,}")
