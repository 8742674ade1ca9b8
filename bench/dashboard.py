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
# Issue 10 item 6: the lists, problems first, 50 a page (bench.seed names hosts
# bench-0001 … and VMs bench-0001-vm00 …).
LIST_PAGES = ("/hosts", "/hosts?page=10", "/hosts?q=bench-05&cluster=c3", "/vms",
              "/vms?page=100", "/vms?q=vm03&ha=on", "/vms?state=Stopped")
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
    password = "bench-" + str(time.time_ns())
    manage(env, "shell", "-c",
           "from django.contrib.auth import get_user_model as g; "
           f"g().objects.create_superuser('bench', password='{password}')")
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
            with httpx.Client(base_url=base, cookies=cookies, timeout=30) as http:
                http.get("/")  # warm
                for _ in range(o["requests"]):
                    t0 = time.perf_counter()
                    r = http.get("/")
                    served.append((time.perf_counter() - t0) * 1000)
                    if r.status_code != 200:
                        raise BenchError(f"GET / answered {r.status_code}")
                size = len(r.content)
                lists = {}
                for path in LIST_PAGES:
                    http.get(path)  # warm
                    times = []
                    for _ in range(o["requests"]):
                        t0 = time.perf_counter()
                        r = http.get(path)
                        times.append((time.perf_counter() - t0) * 1000)
                        if r.status_code != 200:
                            raise BenchError(f"GET {path} answered {r.status_code}")
                    lists[path] = {"median": statistics.median(times),
                                   "p95": percentile(times, 95)}
                say(f"timed {len(LIST_PAGES)} list pages × {o['requests']}")
            page.add_init_script(PROBE)
            page.goto(f"{base}/")
            page.wait_for_selector("#conn-status[data-state=live]", timeout=30_000)
            tiles = page.locator("#fleet-map .tile").count()
            say(f"{tiles} tiles on the page; {o['rate']} events/s for {o['seconds']} s")
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
            browser.close()
    seconds = probe["ms"] / 1000
    long_ms = sum(probe["long"])
    return {
        "machine": machine_info(db), "hosts": o["hosts"], "vms": o["hosts"] * o["vms_per_host"],
        "tiles": tiles, "page_bytes": size,
        "served_ms": {"median": statistics.median(served), "p95": percentile(served, 95),
                      "max": max(served)},
        "lists_ms": lists,
        "events_emitted": int(emitted or 0), "events_received": probe["received"],
        "rate": o["rate"], "fps": probe["frames"] / seconds,
        "long_tasks": len(probe["long"]), "long_task_ms": long_ms,
        "busy_share": long_ms / probe["ms"],
    }


def report(r: dict[str, Any]) -> str:
    s = r["served_ms"]
    rows = [
        ["overview served (GET /), median", f"{s['median']:.0f} ms", "< 300 ms"],
        ["overview served, p95 / max", f"{s['p95']:.0f} / {s['max']:.0f} ms", ""],
        ["page size", f"{r['page_bytes'] / 1024:.0f} KiB ({r['tiles']} tiles)", ""],
        ["events committed / shown live", f"{r['events_emitted']} / {r['events_received']}",
         "all"],
        ["frames per second while events arrive", f"{r['fps']:.0f}", "≈ 60"],
        ["long tasks (> 50 ms)", f"{r['long_tasks']} ({r['long_task_ms']:.0f} ms in all)", ""],
    ]
    for path, t in (r.get("lists_ms") or {}).items():
        rows.append([f"GET {path}, median / p95", f"{t['median']:.0f} / {t['p95']:.0f} ms",
                     "< 300 ms"])
    return (f"{machine_line(r['machine'])}\n{r['hosts']} hosts, {r['vms']} VMs, "
            f"{r['rate']:.0f} events/s\n" + table(["measure", "value", "target"], rows))


def as_json(r: dict[str, Any]) -> str:
    return json.dumps(r, default=str, indent=2)
