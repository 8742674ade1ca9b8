"""``bench ping``: agent ping ingestion over real HTTP / websockets on PostgreSQL, with
the raw PostgreSQL update rate of the same rows as the ceiling, in the same run.

1. a fresh database, migrated; ``hosts`` Up hosts with 10 Running VMs each, seeded
   through the ORM (:mod:`bench.seed`);
2. daphne web process(es) on free ports (``hadash.asgi``, as in production);
3. for each transport, web-process count and ``--agents`` count, the load generator
   (:mod:`bench.loadgen`, ``--loadgen-processes`` processes of its own) sends steady
   10-VM pings for a warm-up and then ``seconds``; a websocket run is bracketed by the
   bare ceiling: the same sockets' pings answered by a bare Channels consumer on the
   same daphne (:mod:`bench.asgi_experiment`, ``/bench/bare/ws``), right before and
   after, and the table shows real ÷ bare;
4. the ceiling (:mod:`bench.pgceiling`): the same UPDATEs from psycopg, one transaction
   per ping and batched, over 1 and 2 connections;
5. everything stopped, the database dropped (also on Ctrl-C or an error).
"""

from __future__ import annotations

import json
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
    # hadash.asgi's application plus the bench-only bare consumer (bench.asgi_experiment)
    app = "bench.asgi_experiment:application"
    if o["experiment"]:
        extra["HADASH_BENCH_EXPERIMENTS"] = ",".join(o["experiment"])
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
                for agents in (o.get("agents") or [None]):
                    used = webs[:n_web]
                    sub = hosts if agents is None else hosts[:agents]
                    pg_name = db.name if db.vendor == "postgresql" else ""
                    bare = []
                    with_bare = transport == "ws" and o.get("bare", True)
                    if with_bare:
                        bare.append(load(sup, tmp, o, sub, transport, used, pg_name,
                                         agents=agents, bare=True, label="bare, before"))
                    result = load(sup, tmp, o, sub, transport, used, pg_name, agents=agents)
                    if with_bare:
                        bare.append(load(sup, tmp, o, sub, transport, used, pg_name,
                                         agents=agents, bare=True, label="bare, after"))
                        result["bare"] = bare
                        result["bare_pings_per_s"] = round(
                            sum(b["pings_per_s"] for b in bare) / len(bare), 1)
                        result["real_over_bare"] = round(
                            result["pings_per_s"] / result["bare_pings_per_s"], 3) \
                            if result["bare_pings_per_s"] else None
                    runs.append(result)
                    say(f"  {transport} × {n_web} web, {result['mode']}: "
                        f"{result['pings_per_s']:.0f} pings/s "
                        f"(median 1-s bucket {fmt(result['median_bucket_per_s'], 0)}), p50 "
                        f"{fmt(result['p50_ms'])} ms, p99 {fmt(result['p99_ms'])} ms, "
                        f"{result['errors']} errors; CPU {cpu_line(result['cpu'])}"
                        + (f"; bare {result['bare_pings_per_s']:.0f} pings/s, real ÷ bare "
                           f"{result['real_over_bare']}" if with_bare else ""))
                    if result["errors"]:
                        say(f"  errors, e.g.: {result['error_samples']}")
                    if result.get("socket_open_retries"):
                        say(f"  {result['socket_open_retries']} socket opens had to be "
                            f"retried, e.g.: {result['socket_open_errors']}")
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


def cpu_line(cpu: dict) -> str:
    webs = [k for k in cpu if k.startswith("web") and k != "web"]
    parts = [f"web {cpu.get('web', 0):.2f}"
             + (f" ({' + '.join(f'{cpu[k]:.2f}' for k in sorted(webs))})"
                if len(webs) > 1 else "")]
    parts += [f"{k} {cpu[k]:.2f}" for k in ("postgres", "loadgen", "other") if k in cpu]
    return ", ".join(parts) + " cores"


def load(sup: Supervisor, tmp: Path, o: dict, hosts: list[dict], transport: str,
         webs: list, db_name: str, *, agents: int | None = None, bare: bool = False,
         label: str = "") -> dict[str, Any]:
    """One measurement: ``loadgen_processes`` load generators (each a share of the
    hosts, the in-flight pings and the rate) started together through a go file; CPU
    of every web process, PostgreSQL, the load generators and the rest of the machine
    over the measured window."""
    from .common import CpuMeter
    from .loadgen import BARE_PATH, WS_PATH, merge

    n_lg = max(1, min(o.get("loadgen_processes") or 1, len(hosts)))
    connections = agents or o["connections"]
    tag = (f"{transport}-{len(webs)}-{agents or 'all'}-{'bare' if bare else 'real'}"
           f"-{len(sup.children)}")
    go = tmp / f"go-{tag}.json"
    go.unlink(missing_ok=True)
    procs, outs = [], []
    for i in range(n_lg):
        out = tmp / f"load-{tag}-{i}.json"
        outs.append(out)
        cfg = {
            "urls": [f"http://127.0.0.1:{port}" for _, port in webs],
            "transport": transport,
            "path": BARE_PATH if bare else WS_PATH,
            # host j keeps urls[j % webs]: a process takes every n_lg-th host
            "hosts": [{"token": h["token"], "vm_names": h["vm_names"]} for h in hosts[i::n_lg]],
            "connections": max(1, round(connections * (i + 1) / n_lg)
                               - round(connections * i / n_lg)),
            "rate": o["rate"] / n_lg if o["rate"] else 0,
            "warmup": o["warmup"],
            "seconds": o["seconds"],
            "go": str(go),
            "out": str(out),
        }
        if len(webs) > 1 and n_lg > 1:  # keep the hosts spread evenly over the webs
            cfg["urls"] = [cfg["urls"][(i + k) % len(webs)] for k in range(len(webs))]
        cfg_file = tmp / f"load-{tag}-{i}.cfg.json"
        cfg_file.write_text(json.dumps(cfg))
        procs.append(sup.python(f"loadgen-{tag}-{i}", "-m", "bench.loadgen", str(cfg_file)))
    mode = f"open loop at {o['rate']:g}/s" if o["rate"] else f"{connections} in flight"
    say(f"load{' (' + label + ')' if label else ''}: {transport} pings"
        f"{' to the bare consumer' if bare else ''}, {len(hosts)} hosts, {len(webs)} web "
        f"process(es), {mode}, {n_lg} load generator(s), {o['warmup']} s warm-up + "
        f"{o['seconds']} s …")
    limit = o["warmup"] + o["seconds"] + 180 + len(hosts) / 50
    deadline = time.monotonic() + limit
    shown = [0] * n_lg

    def pump() -> None:
        for k, lg in enumerate(procs):
            shown[k] = forward(lg.log, shown[k])
            if time.monotonic() > deadline:
                raise BenchError(f"the load generator did not finish within {limit:.0f} s:\n"
                                 + "\n".join(lg.log[-20:]))

    while not all(any(line == "loadgen: ready" for line in lg.log) for lg in procs):
        for lg in procs:
            if lg.proc.poll() is not None:
                raise BenchError(f"the load generator failed ({lg.proc.returncode}):\n"
                                 + "\n".join(lg.log[-30:]))
        pump()
        time.sleep(0.1)
    start = time.time() + 0.5
    part = go.with_suffix(".part")
    part.write_text(json.dumps({"start": start}))
    part.rename(go)
    meter = CpuMeter(groups={**{f"web{k + 1}": [w.proc.pid] for k, (w, _) in enumerate(webs)},
                             "loadgen": [lg.proc.pid for lg in procs]},
                     pg_database=db_name)
    time.sleep(max(0.0, start + o["warmup"] - time.time()))
    meter.start()
    time.sleep(max(0.0, start + o["warmup"] + o["seconds"] - time.time()))
    cpu = meter.stop()
    cpu["web"] = round(sum(v for k, v in cpu.items() if k.startswith("web")), 3)
    while any(lg.proc.poll() is None for lg in procs):
        pump()
        time.sleep(0.2)
    time.sleep(0.2)  # let the output pump catch up
    pump()
    for lg, out in zip(procs, outs, strict=True):
        if lg.proc.returncode != 0 or not out.exists():
            raise BenchError(f"the load generator failed ({lg.proc.returncode}):\n"
                             + "\n".join(lg.log[-30:]))
    result = merge([json.loads(out.read_text()) for out in outs])
    result["web_processes"] = len(webs)
    result["agents"] = agents
    result["cpu"] = cpu
    if bare:
        say(f"  bare ({label}): {result['pings_per_s']:.0f} pings/s, p50 "
            f"{fmt(result['p50_ms'])} ms, p99 {fmt(result['p99_ms'])} ms, "
            f"{result['errors']} errors; CPU {cpu_line(cpu)}")
    return result


def forward(log: list[str], shown: int) -> int:
    """Pass the load generator's progress lines on (its output is not echoed)."""
    for line in log[shown:]:
        if line.startswith("loadgen:"):
            say("  " + line)
    return len(log)


def target_text(r: dict[str, Any]) -> str:
    rates = {x["rate_target"] for x in r["runs"] if x.get("rate_target")}
    if len(rates) == 1:
        return f"{max(rates):,.0f}/s"
    return f"{TARGET:,.0f}/s"


def sustains(x: dict[str, Any]) -> bool:
    """Closed loop: answers at least TARGET pings/s. Open loop: keeps up with its rate
    (at least TARGET/s) — answers ≥ 98% of what the fleet sends and no queue builds
    up (median latency under a second)."""
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
        webs = sorted(k for k in cpu if k.startswith("web") and k != "web")
        rows.append([
            x["transport"], x["web_processes"], x["hosts"], x["mode"],
            fmt(x["pings_per_s"], 0), fmt(x["median_bucket_per_s"], 0), fmt(x["p50_ms"]),
            fmt(x["p99_ms"]), x["errors"],
            fmt(x.get("bare_pings_per_s"), 0),
            fmt(x.get("real_over_bare"), 2),
            fmt(cpu.get("web"), 2) + (f" ({' + '.join(fmt(cpu[k], 2) for k in webs)})"
                                      if len(webs) > 1 else ""),
            fmt(cpu.get("postgres"), 2), fmt(cpu.get("loadgen"), 2),
            fmt(cpu.get("machine"), 2), fmt(cpu.get("other"), 2),
            "yes" if sustains(x) else "no",
        ])
    lines.append(table(
        ["transport", "web procs", "agents", "load", "pings/s", "median 1-s", "p50 ms",
         "p99 ms", "errors", "bare pings/s", "real ÷ bare", "CPU web", "CPU pg",
         "CPU loadgen", "CPU machine", "CPU other", f"sustains {target_text(r)}"], rows))
    lines.append("CPU: cores busy during the measured window (2.0 = both cores of this "
                 "machine); 'other' is everything else running on the machine meanwhile. "
                 "'median 1-s' is the median of the per-second counts. 'bare': the same "
                 "daphne answering the same sockets' pings from a bare Channels consumer "
                 "(bench.asgi_experiment), measured right before and after (mean).")
    bares = [(x, b) for x in r["runs"] for b in x.get("bare", [])]
    if bares:
        lines.append("")
        lines.append("bare Channels consumer, same run:")
        lines.append(table(
            ["web procs", "agents", "load", "when", "pings/s", "p50 ms", "p99 ms", "errors",
             "CPU web", "CPU loadgen", "CPU other"],
            [[x["web_processes"], b["hosts"], b["mode"], "before" if i % 2 == 0 else "after",
              fmt(b["pings_per_s"], 0), fmt(b["p50_ms"]), fmt(b["p99_ms"]), b["errors"],
              fmt(b["cpu"].get("web"), 2), fmt(b["cpu"].get("loadgen"), 2),
              fmt(b["cpu"].get("other"), 2)]
             for x in r["runs"] for i, b in enumerate(x.get("bare", []))]))
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
