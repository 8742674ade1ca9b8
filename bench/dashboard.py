"""Dashboard benchmark (issue 4): the overview with 1,000 hosts and 10,000 VMs —
how fast it is served, and how smooth it stays while 100 events a second arrive; and
the host and VM list pages (issue 10 item 6): first, middle and filtered pages.

    python manage.py bench dashboard [--hosts 1000 --vms-per-host 10 --rate 100 --seconds 20]

A fresh database (PostgreSQL by default) is seeded through the ORM (bench.seed), a
real daphne serves it, an admin logs in with Debian's Chromium driven by Playwright.
Served time: GET / with the session cookie, repeated (median, p95). Smoothness: in the
page, frames counted with requestAnimationFrame and long tasks (> 50 ms) with a
PerformanceObserver while a separate process commits `rate` events per second.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from hadash.supervisor import Supervisor, free_port, wait_for_port

from .common import (
    BenchDatabase,
    BenchError,
    CpuMeter,
    bench_env,
    interruptible,
    machine_info,
    machine_line,
    manage,
    percentile,
    run_python,
    say,
    table,
    throwaway_database,
)

CHROMIUM = "/usr/bin/chromium"


def list_pages(hosts: int, vms: int) -> tuple[str, ...]:
    """Issue 10 item 6: the lists, problems first, 50 a page (bench.seed names hosts
    bench-0001 … and VMs bench-0001-vm00 …): first, middle, last and filtered pages.
    Issue 12: the operator API's lists too (bearer token), 50 a page and the default
    page (1,000 rows)."""
    width = max(4, len(str(hosts)))
    some = f"bench-{max(1, hosts // 2):0{width}d}"
    return ("/hosts", f"/hosts?page={max(1, hosts // 100)}", "/hosts?q=bench-05&cluster=c3",
            "/vms", f"/vms?page={max(1, -(-vms // 50))}", "/vms?q=vm03&ha=on",
            "/vms?state=Stopped",
            "/api/v1/hosts?limit=50", f"/api/v1/hosts?cluster=c3&limit=50&offset="
            f"{max(0, hosts // 20)}", "/api/v1/hosts?status=Down&limit=50",
            "/api/v1/vms?limit=50", f"/api/v1/vms?ha_enabled=true&limit=50&offset="
            f"{max(0, vms // 4)}", f"/api/v1/vms?host={some}&limit=50",
            "/api/v1/hosts", "/api/v1/vms")


# Queries per request, counted in a process of its own (django.test.Client against the
# benchmark database, logged in as the bench user) — daphne's own are not visible.
QUERIES = """
import json, os, sys, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django.setup()
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
c = Client(HTTP_AUTHORIZATION="Bearer " + sys.argv[1])
c.force_login(get_user_model().objects.get(username="bench"))
out = {}
for path in sys.argv[2:]:
    c.get(path)
    with CaptureQueriesContext(connection) as q:
        r = c.get(path)
    out[path] = len(q.captured_queries) if r.status_code == 200 else None
print(json.dumps(out))
"""
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

EMITTER = """
import sys, time, django, os
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django.setup()
from django.db import transaction
from hadash.events import record_event
from hosts.models import Host
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
hosts = list(Host.objects.order_by("id")[:50])
start = time.monotonic(); n = 0
while time.monotonic() - start < seconds:
    due = start + n / rate
    if due > time.monotonic():
        time.sleep(due - time.monotonic())
    h = hosts[n % len(hosts)]
    with transaction.atomic():
        record_event("host", h, event="BenchEvent", message=f"bench event {n} on {h.name}")
    n += 1
print(n)
"""

PROBE = """
window.__bench = {frames: 0, long: [], start: performance.now()};
(function tick() { window.__bench.frames++; requestAnimationFrame(tick); })();
try {
  new PerformanceObserver(list => { for (const e of list.getEntries())
    window.__bench.long.push(e.duration); }).observe({entryTypes: ["longtask"]});
} catch (e) {}
"""


def run(o: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        raise BenchError(f"{CHROMIUM} is missing (apt-get install chromium)")
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    env = bench_env(db.url, str(tmp))
    say(f"migrating {db.vendor} database {db.name}")
    manage(env, "migrate", "--noinput", "-v0")
    say(f"seeding {o['hosts']} hosts × {o['vms_per_host']} VMs")
    run_python(env, "-m", "bench.seed", "ping", "--hosts", str(o["hosts"]),
               "--vms-per-host", str(o["vms_per_host"]), "--out", str(tmp / "hosts.json"))
    vms = o["hosts"] * o["vms_per_host"]
    # A fleet that has run a while (issue 12): 3 events per VM, 2 incidents per host,
    # a finished HA item per 10 VMs, resolved alerts.
    history = run_python(env, "-m", "bench.seed", "history", "--events", str(3 * vms),
                         "--incidents", str(2 * o["hosts"]), "--ha-items", str(vms // 10),
                         "--alerts", str(o["hosts"] // 5)).strip()
    say(history)
    password = "bench-" + str(time.time_ns())
    api_token = manage(env, "shell", "-c",
                       "from django.contrib.auth import get_user_model as g; "
                       "from hadash.models import ApiToken; "
                       f"u = g().objects.create_superuser('bench', password='{password}'); "
                       "print(ApiToken.issue(u)[1])").strip().splitlines()[-1]
    pages = list_pages(o["hosts"], vms)
    queries = json.loads(run_python(env, "-c", QUERIES, api_token, "/", "/summary.json",
                                    *pages).strip().splitlines()[-1])
    port = free_port()
    with Supervisor(echo=False, grace=5, base_env=env) as sup:
        web = sup.python("web", "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                         "hadash.asgi:application")
        wait_for_port(port, proc=web.proc, timeout=60)
        base = f"http://127.0.0.1:{port}"
        from playwright.sync_api import sync_playwright

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            ctx = browser.new_context(viewport={"width": 1400, "height": 900})
            page = ctx.new_page()
            page.goto(f"{base}/login/")
            page.fill("#id_username", "bench")
            page.fill("#id_password", password)
            page.click("button[type=submit], input[type=submit]")
            page.wait_for_url(f"{base}/", timeout=30_000)
            cookies = {c["name"]: c["value"] for c in ctx.cookies()}
            say(f"timing GET / × {o['requests']}")
            served = []
            meter = CpuMeter({"web": [web.proc.pid]}, db.name)
            meter.start()
            with httpx.Client(base_url=base, cookies=cookies, timeout=30,
                              headers={"Authorization": f"Bearer {api_token}"}) as http:
                http.get("/")  # warm
                for _ in range(o["requests"]):
                    t0 = time.perf_counter()
                    r = http.get("/")
                    served.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        raise BenchError(f"GET / answered {r.status_code}")
                size = len(r.content)
                summary_ms = []
                for _ in range(o["requests"]):
                    t0 = time.perf_counter()
                    r = http.get("/summary.json")
                    summary_ms.append((time.perf_counter() - t0) * 1000)
                version = r.json().get("hosts_version", "")
                summary_same_ms = []
                for _ in range(o["requests"]):
                    t0 = time.perf_counter()
                    r = http.get(f"/summary.json?hosts={version}")
                    summary_same_ms.append((time.perf_counter() - t0) * 1000)
                lists = {}
                for path in pages:
                    http.get(path)  # warm
                    times = []
                    for _ in range(o["requests"]):
                        t0 = time.perf_counter()
                        r = http.get(path)
                        times.append((time.perf_counter() - t0) * 1000)
                        if r.status_code != 200:
                            raise BenchError(f"GET {path} answered {r.status_code}")
                    lists[path] = {"median": statistics.median(times),
                                   "p95": percentile(times, 95), "bytes": len(r.content),
                                   "queries": queries.get(path)}
                say(f"timed {len(pages)} list pages × {o['requests']}")
            served_cpu = meter.stop()
            page.add_init_script(PROBE)
            page.goto(f"{base}/")
            page.wait_for_selector("#conn-status[data-state=live]", timeout=30_000)
            tiles = page.locator("#fleet-map .tile").count()
            say(f"{tiles} tiles on the page; {o['rate']} events/s for {o['seconds']} s")
            meter = CpuMeter({"web": [web.proc.pid]}, db.name)
            meter.start()
            page.evaluate("() => { window.__bench.frames = 0; window.__bench.long = [];"
                          " window.__bench.start = performance.now();"
                          " window.__bench.count0 = window.hadashLive.count; }")
            emitted = run_python(env, "-c", EMITTER, str(o["rate"]), str(o["seconds"]),
                                 timeout=o["seconds"] + 120).strip()
            time.sleep(1.5)
            probe = page.evaluate(
                "() => ({frames: window.__bench.frames, long: window.__bench.long,"
                " ms: performance.now() - window.__bench.start,"
                " received: window.hadashLive.count - window.__bench.count0})")
            events_cpu = meter.stop()
            browser.close()
    seconds = probe["ms"] / 1000
    long_ms = sum(probe["long"])
    return {
        "machine": machine_info(db), "hosts": o["hosts"], "vms": o["hosts"] * o["vms_per_host"],
        "tiles": tiles, "page_bytes": size,
        "served_ms": {"median": statistics.median(served), "p95": percentile(served, 95),
                      "max": max(served)},
        "summary_ms": {"median": statistics.median(summary_ms),
                       "p95": percentile(summary_ms, 95)},
        "summary_same_ms": {"median": statistics.median(summary_same_ms),
                            "p95": percentile(summary_same_ms, 95)},
        "queries": {"/": queries.get("/"), "/summary.json": queries.get("/summary.json")},
        "lists_ms": lists, "history": history,
        "cpu_served": served_cpu, "cpu_events": events_cpu,
        "events_emitted": int(emitted or 0), "events_received": probe["received"],
        "rate": o["rate"], "fps": probe["frames"] / seconds,
        "long_tasks": len(probe["long"]), "long_task_ms": long_ms,
        "busy_share": long_ms / probe["ms"],
    }


def report(r: dict[str, Any]) -> str:
    s = r["served_ms"]
    q = r.get("queries") or {}
    rows = [
        ["overview served (GET /), median", f"{s['median']:.0f} ms", "< 300 ms"],
        ["overview served, p95 / max", f"{s['p95']:.0f} / {s['max']:.0f} ms", ""],
        ["overview queries per request", q.get("/"), ""],
    ]
    for key, what in (("summary_ms", "summary.json (all host rows), median / p95"),
                      ("summary_same_ms", "summary.json (rows unchanged), median / p95")):
        if key in r:
            rows.append([what, f"{r[key]['median']:.0f} / {r[key]['p95']:.0f} ms", ""])
    rows += [
        ["page size", f"{r['page_bytes'] / 1024:.0f} KiB ({r['tiles']} tiles)", ""],
        ["events committed / shown live", f"{r['events_emitted']} / {r['events_received']}",
         "all"],
        ["frames per second while events arrive", f"{r['fps']:.0f}", "≈ 60"],
        ["long tasks (> 50 ms)", f"{r['long_tasks']} ({r['long_task_ms']:.0f} ms in all)", ""],
    ]
    for path, t in (r.get("lists_ms") or {}).items():
        extra = f" ({t['queries']} queries, {t['bytes'] // 1024} KiB)" if "bytes" in t else ""
        rows.append([f"GET {path}, median / p95",
                     f"{t['median']:.0f} / {t['p95']:.0f} ms{extra}", "≤ 200 ms"])
    cpu = ""
    for key, what in (("cpu_served", "timed requests"), ("cpu_events", "events window")):
        c = r.get(key)
        if c:
            cpu += (f"\nCPU during the {what} (cores): web {c.get('web', 0):.2f}, postgres "
                    f"{c.get('postgres', 0):.2f}, machine {c.get('machine', 0):.2f}, other "
                    f"{c.get('other', 0):.2f}")
    return (f"{machine_line(r['machine'])}\n{r['hosts']} hosts, {r['vms']} VMs, "
            f"{r['rate']:.0f} events/s; history: {r.get('history', '')}\n"
            + table(["measure", "value", "target"], rows) + cpu)


def as_json(r: dict[str, Any]) -> str:
    return json.dumps(r, default=str, indent=2)
