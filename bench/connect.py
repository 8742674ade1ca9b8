"""``bench connect``: agent connects per second against one daphne (issue 12).

    python manage.py bench connect [--hosts 1000] [--clients 20] [--vms-per-host 10]

A fresh database (PostgreSQL by default) and one daphne. Measured, one after the other:

* ``enrol``: ``--hosts`` new hosts each ``POST /api/agent/v1/connect`` with the join key
  (PROTOCOL.md, R29), ``--clients`` requests in flight (closed loop, one aiohttp session
  with keep-alive, as the simulator's agents). Each report lists ``--vms-per-host`` VMs
  the server does not know yet (discovery: unmanaged VMs);
* the VMs are then registered through ``POST /api/v1/vms/bulk`` (on the reporting host,
  so a reconnect confirms them), and, unless ``--no-restart``, the web process is
  restarted (its per-process caches are gone, as after a deploy);
* ``reconnect``: the same hosts connect again with their own tokens — what a whole
  fleet does after a restart of the web process.

Each row: connects, wall seconds from the first request sent to the last answer,
connects/s, latency median / p99 / max, CPU of the web process and of PostgreSQL
(share of one core; a backend that exits within the row is not seen, its CPU lands in
"other"), the load average at the end of the row. The queries one connect makes are
counted in a separate process on the same database with the same view
(hosts.agent.views.connect, rolled back).
"""

from __future__ import annotations

import asyncio
import json
import os
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
    fmt,
    interruptible,
    machine_info,
    manage,
    median,
    percentile,
    run_python,
    say,
    table,
    throwaway_database,
)

# Queries of one connect, counted in-process (same database, same view), rolled back.
QUERIES = """
import inspect, json, os, sys, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django.setup()
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection, transaction
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from hosts.agent import views
from vms import discovery
body = json.loads(sys.argv[1]); token = sys.argv[2]; out = {}
rf = RequestFactory()
def post(credential, b):
    r = rf.post("/api/agent/v1/connect", data=json.dumps(b), content_type="application/json",
                HTTP_AUTHORIZATION=f"Bearer {credential}")
    view = views.connect
    return async_to_sync(view)(r) if inspect.iscoroutinefunction(view) else view(r)
class Rollback(Exception):
    pass
try:
    with transaction.atomic():
        new = dict(body, name=body["name"] + "-q")
        new["vms"] = [dict(v, name=v["name"] + "-q") for v in body["vms"]]
        with CaptureQueriesContext(connection) as q:
            r = post(settings.HADASH_AGENT_KEY, new)
        assert r.status_code == 200, r.content
        out["enrol"] = len(q.captured_queries)
        discovery.forget()  # a restarted web process
        with CaptureQueriesContext(connection) as q:
            r = post(token, body)
        assert r.status_code == 200, r.content
        out["reconnect"] = len(q.captured_queries)
        raise Rollback
except Rollback:
    pass
print(json.dumps(out))
"""


def run(o: dict[str, Any]) -> dict[str, Any]:
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def _body(i: int, vms: int) -> dict[str, Any]:
    name = f"cb-{i:05d}"
    return {
        "name": name, "type": "Routing", "hypervisor": "Simulated",
        "cluster": f"cluster-{i % 10:02d}", "cpus": 64, "memory_mb": 262144,
        "address": f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}",
        "agent_url": f"http://127.0.0.1:9/agents/{name}",
        "vms": [{"name": f"{name}-vm-{k:02d}", "power_state": "PowerOn"} for k in range(vms)],
        "agent": {"name": "hadash-bench", "version": "1.1",
                  "hypervisor_uri": "simulated://" + name},
    }


async def _connects(url: str, jobs: list[tuple[dict, str]], clients: int,
                    label: str) -> tuple[float, list[float], list[dict]]:
    """POST every (body, credential) with ``clients`` in flight; (seconds, latencies,
    answers in the order of ``jobs``)."""
    import aiohttp

    answers: list[dict] = [{}] * len(jobs)
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(jobs)):
        queue.put_nowait(i)
    done = [0]
    bodies = [json.dumps(b).encode() for b, _ in jobs]

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            body, credential = jobs[i]
            t = time.perf_counter()
            async with session.post(url, data=bodies[i], headers={
                    "Authorization": f"Bearer {credential}",
                    "Content-Type": "application/json"}) as r:
                data = await r.json(content_type=None)
                if r.status != 200:
                    raise BenchError(f"{label}: {body['name']}: connect answered {r.status}: "
                                     f"{str(data)[:300]}")
            latencies.append(time.perf_counter() - t)
            answers[i] = data
            done[0] += 1

    async def progress(t0: float) -> None:
        while True:
            await asyncio.sleep(5)
            s = time.perf_counter() - t0
            say(f"  … {label}: {done[0]}/{len(jobs)} in {s:.0f} s ({done[0] / s:.1f}/s, "
                f"load {os.getloadavg()[0]:.1f})")

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        ticker = asyncio.create_task(progress(t0))
        try:
            await asyncio.gather(*(client(session) for _ in range(clients)))
        finally:
            ticker.cancel()
        seconds = time.perf_counter() - t0
    return seconds, latencies, answers


def _measure(url: str, label: str, jobs: list[tuple[dict, str]], clients: int,
             meter: CpuMeter) -> tuple[dict[str, Any], list[dict]]:
    meter.start()
    seconds, lat, answers = asyncio.run(_connects(url, jobs, clients, label))
    cpu = meter.stop()
    load = os.getloadavg()
    n = len(jobs)
    row = {"phase": label, "connects": n, "clients": clients, "seconds": round(seconds, 2),
           "per_s": round(n / seconds, 1),
           "p50_ms": round(1000 * (median(lat) or 0), 1),
           "p99_ms": round(1000 * (percentile(lat, 99) or 0), 1),
           "max_ms": round(1000 * max(lat), 1),
           "cpu_web": cpu.get("web"), "cpu_postgres": cpu.get("postgres"),
           "cpu_other": cpu.get("other"), "cpu_machine": cpu.get("machine"),
           "load": [round(x, 1) for x in load]}
    say(f"{label}: {n} connects in {seconds:.1f} s, {n / seconds:.1f}/s, p50 "
        f"{row['p50_ms']} ms, p99 {row['p99_ms']} ms; CPU web {cpu.get('web')}, postgres "
        f"{cpu.get('postgres')}, other {cpu.get('other')}; load {load[0]:.1f}")
    return row, answers


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    from django.conf import settings

    env = bench_env(db.url, str(tmp))
    join_key = env.get("HADASH_AGENT_KEY") or settings.HADASH_AGENT_KEY
    say(f"migrating {db.vendor} database {db.name}")
    manage(env, "migrate", "--noinput", "-v0")
    api_token = manage(env, "apitoken", "bench", "--create").strip().splitlines()[-1]
    hosts, nvms, clients = o["hosts"], o["vms_per_host"], o["clients"]
    bodies = [_body(i, nvms) for i in range(hosts)]
    warm = [_body(hosts + i, nvms) for i in range(2)]
    rows: list[dict[str, Any]] = []
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/agent/v1/connect"
    with Supervisor(echo=o.get("verbose", False), grace=5, base_env=env) as sup:
        web = sup.python("web", *daphne_argv(port))
        wait_for_port(port, proc=web.proc, timeout=60)
        meter = CpuMeter(groups={"web": [web.proc.pid]}, pg_database=db.name)
        # Warm: imports, the first connection.
        _, _, warmed = asyncio.run(_connects(url, [(b, join_key) for b in warm], 1,
                                             "warm-up"))
        warm_jobs = [(b, a["token"]) for b, a in zip(warm, warmed, strict=True)]
        say(f"enrolling {hosts} hosts ({nvms} unknown VMs each), {clients} in flight")
        row, answers = _measure(url, "enrol", [(b, join_key) for b in bodies], clients, meter)
        rows.append(row)
        tokens = [a["token"] for a in answers]
        if nvms:
            say(f"registering {hosts * nvms} VMs (POST /api/v1/vms/bulk)")
            items = [{"name": n, "host": b["name"], "cpus": 1, "memory_mb": 1024,
                      "ha_enabled": k % 2 == 0}
                     for b in bodies for k, n in enumerate(v["name"] for v in b["vms"])]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", trust_env=False,
                              timeout=httpx.Timeout(600.0),
                              headers={"Authorization": f"Bearer {api_token}"}) as http:
                for i in range(0, len(items), 2000):
                    r = http.post("/vms/bulk", json={"vms": items[i:i + 2000]})
                    if r.status_code != 201:
                        raise BenchError(f"POST /vms/bulk answered {r.status_code}: "
                                         f"{r.text[:500]}")
        if not o["no_restart"]:
            say("restarting the web process")
            sup.stop()
            sup.children.clear()
            web = sup.python("web", *daphne_argv(port))
            wait_for_port(port, proc=web.proc, timeout=60)
            meter = CpuMeter(groups={"web": [web.proc.pid]}, pg_database=db.name)
            asyncio.run(_connects(url, warm_jobs, 1, "warm-up"))
        jobs = [(b, t) for b, t in zip(bodies, tokens, strict=True)]
        row, answers = _measure(url, "reconnect" + ("" if o["no_restart"] else
                                                    " (after a web restart)"),
                                jobs, clients, meter)
        rows.append(row)
        if any(a.get("token") != t for a, (_, t) in zip(answers, jobs, strict=True)):
            raise BenchError("a reconnect did not echo the host's token (R29)")
        sup.stop()
    queries = json.loads(run_python(env, "-c", QUERIES, json.dumps(bodies[0]), tokens[0])
                         .strip().splitlines()[-1])
    return {"machine": machine_info(db), "command": o.get("command", "bench connect"),
            "benchmark": "connect", "hosts": hosts, "vms_per_host": nvms,
            "clients": clients, "rows": rows, "queries": queries}


def report(r: dict[str, Any]) -> str:
    rows = [[x["phase"], f"{x['connects']:,}", x["clients"], f"{x['seconds']:.1f}",
             f"{x['per_s']:.1f}", x["p50_ms"], x["p99_ms"], x["max_ms"], fmt(x["cpu_web"], 2),
             fmt(x["cpu_postgres"], 2), fmt(x["cpu_other"], 2),
             " ".join(str(v) for v in x["load"])]
            for x in r["rows"]]
    q = r.get("queries") or {}
    return (f"Agent connects (POST /api/agent/v1/connect): {r['hosts']:,} hosts, "
            f"{r['vms_per_host']} VMs reported each, one daphne\n"
            + table(["phase", "connects", "in flight", "seconds", "connects/s", "p50 ms",
                     "p99 ms", "max ms", "CPU web", "CPU postgres", "CPU other",
                     "load 1/5/15 min"], rows)
            + (f"\nqueries per connect (in-process, same view, rolled back): enrol "
               f"{q.get('enrol')}, reconnect {q.get('reconnect')}" if q else ""))
