"""``bench ping``: agent ping ingestion over real HTTP / websockets on PostgreSQL, with
the raw PostgreSQL update rate of the same rows as the ceiling, in the same run.

1. a fresh database, migrated; ``hosts`` Up hosts with 10 Running VMs each, seeded
   through the ORM (:mod:`bench.seed`);
2. daphne web process(es) on free ports (``hadash.asgi``, as in production);
3. for each transport and web-process count, the load generator (:mod:`bench.loadgen`,
   its own process) sends steady 10-VM pings for a warm-up and then ``seconds``;
4. the ceiling (:mod:`bench.pgceiling`): the same UPDATEs from psycopg, one transaction
   per ping and batched, over 1 and 2 connections;
5. everything stopped, the database dropped (also on Ctrl-C or an error).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from hadash.supervisor import Supervisor, free_port, wait_for_port

from .common import (
    BenchDatabase,
    BenchError,
    bench_env,
    fmt,
    interruptible,
    machine_info,
    manage,
    run_python,
    say,
    table,
    throwaway_database,
)

TARGET = 1000.0  # pings/s: 10,000 hosts at ping.interval 10


def run(o: dict[str, Any]) -> dict[str, Any]:
    with interruptible(), throwaway_database(o) as (db, tmp):
        return _run(o, db, tmp)


def _run(o: dict[str, Any], db: BenchDatabase, tmp: Path) -> dict[str, Any]:
    extra: dict[str, str] = {}
    if o["conn_max_age"] is not None:
        extra["HADASH_BENCH_CONN_MAX_AGE"] = str(o["conn_max_age"])
    if extra:
        extra["DJANGO_SETTINGS_MODULE"] = "bench.settings_override"
    if o["db_pool"] is not None:
        extra["HADASH_DB_POOL"] = str(o["db_pool"])  # hadash.settings' own pool
    app = "hadash.asgi:application"
    if o["experiment"]:
        extra["HADASH_BENCH_EXPERIMENTS"] = ",".join(o["experiment"])
        app = "bench.asgi_experiment:application"
    env = bench_env(db.url, str(tmp), **extra)
    say("migrating …")
    manage(env, "migrate", "--noinput", "-v0")
    say(f"seeding {o['hosts']} hosts × 10 Running VMs …")
    hosts_file = tmp / "hosts.json"
    say("  " + run_python(env, "-m", "bench.seed", "ping", "--hosts", str(o["hosts"]),
                          "--vms-per-host", "10", "--out", str(hosts_file)).strip())
    hosts = json.loads(hosts_file.read_text())
    if o["fillfactor"] is not None:
        set_fillfactor(db, o["fillfactor"])
    vacuum(db)
    info = machine_info(db)
    runs: list[dict] = []
    sup = Supervisor(echo=o["verbose"], grace=5.0, base_env=env)
    try:
        webs = []
        for i in range(max(o["web_processes"])):
            port = free_port()
            web = sup.python(f"web{i + 1}", "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                             app)
            webs.append((web, port))
        for web, port in webs:
            wait_for_port(port, proc=web.proc, timeout=60)
        say(f"daphne × {len(webs)} on ports {', '.join(str(p) for _, p in webs)}")
        for transport in o["transports"]:
            for n_web in o["web_processes"]:
                used = webs[:n_web]
                result = load(sup, tmp, o, hosts, transport, used,
                              db.name if db.vendor == "postgresql" else "")
                runs.append(result)
                say(f"  {transport} × {n_web} web: {result['pings_per_s']:.0f} pings/s "
                    f"(median 1-s bucket {fmt(result['median_bucket_per_s'], 0)}), p50 "
                    f"{fmt(result['p50_ms'])} ms, p99 {fmt(result['p99_ms'])} ms, "
                    f"{result['errors']} errors; CPU web {result['cpu'].get('web', 0):.2f}, "
                    f"postgres {result['cpu'].get('postgres', 0):.2f}, loadgen "
                    f"{result['cpu'].get('loadgen', 0):.2f} cores")
                if result["errors"]:
                    say(f"  errors, e.g.: {result['error_samples']}")
                if result.get("socket_open_retries"):
                    say(f"  {result['socket_open_retries']} socket opens had to be retried, "
                        f"e.g.: {result['socket_open_errors']}")
                for web, _ in webs:
                    if web.proc.poll() is not None:
                        raise BenchError(f"{web.name} exited with {web.proc.returncode}:\n"
                                         + "\n".join(web.log[-30:]))
    finally:
        codes = sup.stop()
        say(f"stopped {', '.join(codes)}")
    ceiling: list[dict] = []
    if db.vendor == "postgresql" and o["ceiling_seconds"] > 0:
        from .pgceiling import measure

        vacuum(db)  # the same table state as the web server started from
        rows = [(h["id"], h["vm_ids"]) for h in hosts]
        conninfo = db.conninfo(db.name)
        for mode in ("per-ping", "batched"):
            for conns in (1, 2):
                say(f"PostgreSQL ceiling: {mode}, {conns} connection(s), "
                    f"{o['ceiling_seconds']} s …")
                c = measure(conninfo, rows, mode=mode, connections=conns,
                            seconds=o["ceiling_seconds"], batch=o["batch"],
                            warmup=o.get("ceiling_warmup", 2.0))
                ceiling.append(c)
                say(f"  {c['pings_per_s']:.0f} pings/s (CPU postgres {c['cpu']['postgres']:.2f},"
                    f" client {c['cpu']['client']:.2f}, other {c['cpu']['other']:.2f})")
    return {"benchmark": "ping", "machine": info, "command": o["command"],
            "hosts": o["hosts"], "variant": variant(o), "runs": runs,
            "ceiling": ceiling, "target_pings_per_s": TARGET}


def vacuum(db: BenchDatabase) -> None:
    """VACUUM ANALYZE the tables pings write, so every measurement starts from the same
    state (statistics present, dead row versions from the previous phase gone)."""
    if db.vendor != "postgresql":
        return
    import psycopg

    with psycopg.connect(**db.conninfo(db.name), autocommit=True) as conn:
        for table_name in ("host", "vm_instance"):
            conn.execute(f"VACUUM ANALYZE {table_name}")


def set_fillfactor(db: BenchDatabase, percent: int) -> None:
    """Experiment: leave room in every heap page of ``host`` and ``vm_instance`` so a
    ping's UPDATE of unindexed columns can be a HOT update (no index maintenance)."""
    if db.vendor != "postgresql":
        raise BenchError("--fillfactor is a PostgreSQL experiment")
    import psycopg

    say(f"experiment: fillfactor {percent} on host and vm_instance (VACUUM FULL)")
    with psycopg.connect(**db.conninfo(db.name), autocommit=True) as conn:
        for table_name in ("host", "vm_instance"):
            conn.execute(f"ALTER TABLE {table_name} SET (fillfactor = {int(percent)})")
            conn.execute(f"VACUUM FULL ANALYZE {table_name}")


def variant(o: dict) -> str:
    parts = [f"proposed change '{e}' (bench.asgi_experiment)" for e in o["experiment"]]
    if o["fillfactor"] is not None:
        parts.append(f"fillfactor {o['fillfactor']} on host and vm_instance")
    if o["conn_max_age"] is not None:
        parts.append(f"CONN_MAX_AGE={o['conn_max_age']}")
    if o["db_pool"] is not None:
        parts.append(f"psycopg pool of {o['db_pool']}")
    return ", ".join(parts)


def load(sup: Supervisor, tmp: Path, o: dict, hosts: list[dict], transport: str,
         webs: list, db_name: str) -> dict[str, Any]:
    out = tmp / f"load-{transport}-{len(webs)}.json"
    cfg = {
        "urls": [f"http://127.0.0.1:{port}" for _, port in webs],
        "transport": transport,
        "hosts": [{"token": h["token"], "vm_names": h["vm_names"]} for h in hosts],
        "connections": o["connections"],
        "rate": o["rate"],
        "warmup": o["warmup"],
        "seconds": o["seconds"],
        "cpu_groups": {"web": [w.proc.pid for w, _ in webs]},
        "pg_database": db_name,
        "out": str(out),
    }
    cfg_file = tmp / f"load-{transport}-{len(webs)}.cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    mode = f"open loop at {o['rate']}/s" if o["rate"] else f"{o['connections']} in flight"
    say(f"load: {transport} pings, {len(hosts)} hosts, {len(webs)} web process(es), {mode}, "
        f"{o['warmup']} s warm-up + {o['seconds']} s …")
    lg = sup.python(f"loadgen-{transport}-{len(webs)}", "-m", "bench.loadgen", str(cfg_file))
    limit = o["warmup"] + o["seconds"] + 120 + len(hosts) / 50
    deadline = time.monotonic() + limit
    shown = 0
    while lg.proc.poll() is None:
        if time.monotonic() > deadline:
            raise BenchError(f"the load generator did not finish within {limit:.0f} s:\n"
                             + "\n".join(lg.log[-20:]))
        try:
            lg.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        shown = forward(lg.log, shown)
    time.sleep(0.2)  # let the output pump catch up
    forward(lg.log, shown)
    if lg.proc.returncode != 0 or not out.exists():
        raise BenchError(f"the load generator failed ({lg.proc.returncode}):\n"
                         + "\n".join(lg.log[-30:]))
    return json.loads(out.read_text())


def forward(log: list[str], shown: int) -> int:
    """Pass the load generator's progress lines on (its output is not echoed)."""
    for line in log[shown:]:
        if line.startswith("loadgen:"):
            say("  " + line)
    return len(log)


def sustains(x: dict[str, Any]) -> bool:
    """Closed loop: answers at least TARGET pings/s. Open loop at TARGET/s or more:
    keeps up — answers ≥ 98% of what the fleet sends and no queue builds up (median
    latency under a second)."""
    if x.get("rate_target"):
        return (x["rate_target"] >= TARGET and x["pings_per_s"] >= 0.98 * x["rate_target"]
                and x["p50_ms"] is not None and x["p50_ms"] < 1000)
    return bool(x["median_bucket_per_s"] and x["median_bucket_per_s"] >= TARGET)


def report(r: dict[str, Any]) -> str:
    lines = [f"ping ingestion: {r['hosts']} hosts × 10 VMs, steady reports"
             + (f"; experiment: {r['variant']}" if r["variant"] else "")]
    rows = []
    for x in r["runs"]:
        cpu = x["cpu"]
        rows.append([
            x["transport"], x["web_processes"], x["mode"], fmt(x["pings_per_s"], 0),
            fmt(x["median_bucket_per_s"], 0), fmt(x["p50_ms"]), fmt(x["p99_ms"]), x["errors"],
            fmt(cpu.get("web"), 2), fmt(cpu.get("postgres"), 2), fmt(cpu.get("loadgen"), 2),
            fmt(cpu.get("machine"), 2), fmt(cpu.get("other"), 2),
            "yes" if sustains(x) else "no",
        ])
    lines.append(table(
        ["transport", "web procs", "load", "pings/s", "median 1-s", "p50 ms", "p99 ms",
         "errors", "CPU web", "CPU pg", "CPU loadgen", "CPU machine", "CPU other",
         "sustains 1,000/s"], rows))
    lines.append("CPU: cores busy during the measured window (2.0 = both cores of this "
                 "machine); 'other' is everything else running on the machine meanwhile. "
                 "'median 1-s' is the median of the per-second counts.")
    if r["ceiling"]:
        lines.append("")
        lines.append("PostgreSQL ceiling (same rows, psycopg, no web server):")
        crow = [[c["mode"], c["connections"], c["batch"], fmt(c["pings_per_s"], 0),
                 fmt(c["cpu"].get("postgres"), 2), fmt(c["cpu"].get("client"), 2),
                 fmt(c["cpu"].get("other"), 2)] for c in r["ceiling"]]
        lines.append(table(["writes", "connections", "pings/txn", "pings/s", "CPU pg",
                            "CPU client", "CPU other"], crow))
        per1 = next((c["pings_per_s"] for c in r["ceiling"]
                     if c["mode"] == "per-ping" and c["connections"] == 1), None)
        bat1 = next((c["pings_per_s"] for c in r["ceiling"]
                     if c["mode"] == "batched" and c["connections"] == 1), None)
        lines.append("")
        lines.append("ingestion against the ceiling:")
        rrows = []
        for x in r["runs"]:
            rrows.append([
                x["transport"], x["web_processes"], fmt(x["pings_per_s"], 0),
                f"{x['pings_per_s'] / per1:.2f}" if per1 else "–",
                f"{x['pings_per_s'] / bat1:.3f}" if bat1 else "–",
                f"{x['pings_per_s'] / TARGET:.2f}",
            ])
        lines.append(table(["transport", "web procs", "pings/s", "÷ per-ping ceiling (1 conn)",
                            "÷ batched ceiling (1 conn)", "÷ target 1,000/s"], rrows))
    return "\n".join(lines)
