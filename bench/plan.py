"""Failover plan benchmark (R22, R24).

    python manage.py bench plan [--sizes 100,1000,10000 --vms-per-host 10
                                 --db-hosts 1000 --evacuation 100]

1. **Recomputation in memory** — `vms.failover.compute` on a copy of one cluster of N
   hosts × 10 VMs (half of them HA; hosts of 64 cpus / 256 GiB, load varied), the
   worst case: every host in one cluster. Median of 3 runs (1 run at ≥ 10,000 hosts).
   This is the part R22's "under a second" is about: the placement of every host's HA
   VMs, plus k = 2, 3.
2. **Recomputation from the database** — a fresh database (PostgreSQL by default) seeded
   with bench.seed (--db-hosts hosts × 10 VMs over 10 clusters, like the other
   benchmarks), then in one process: the sweep's change check (`fingerprints`), and a
   full recomputation of every cluster as the sweep does it (`clusters.plans.recompute`:
   load, compute, store). Median of 3.
3. **Evacuation spread** — 100 VMs of one host migrated over 10 hosts of mixed sizes and
   loads (seeded random), with the placement code of the release before R24 (least
   loaded: fewest allocated cpus, then memory, then name; a migration under way not
   counted on its target, so ha.workers = 5 parallel workers pick from the same state)
   and with today's (R24 spread; a migration under way counts). Max / min VMs per
   target, and the largest share of a target's cpus taken by the evacuation.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from typing import Any

from .common import (
    bench_env,
    interruptible,
    machine_info,
    manage,
    run_python,
    say,
    table,
    throwaway_database,
)

DB_SCRIPT = """
import json, os, statistics, time, django
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hadash.settings")
django.setup()
from django.utils import timezone
from clusters import plans
from hadash import config
from vms import failover
cfg = config.snapshot()
fp, full, rows = [], [], None
for _ in range(3):
    t0 = time.perf_counter(); failover.fingerprints(cfg=cfg); fp.append(time.perf_counter() - t0)
    t0 = time.perf_counter(); rows = plans.recompute(now=timezone.now(), cfg=cfg)
    full.append(time.perf_counter() - t0)
print(json.dumps({"fingerprint_ms": statistics.median(fp) * 1000,
                  "recompute_ms": statistics.median(full) * 1000,
                  "clusters": len(rows), "compute_ms": sum(r.took_ms for r in rows),
                  "capacities": sorted({r.capacity for r in rows})}))
"""


def synthetic(hosts: int, vms_per_host: int, seed: int = 1):
    """One cluster: hosts of 64 cpus / 256 GiB with 10 VMs of 1–4 cpus, half HA."""
    from vms.failover import ClusterState, HostCopy, VmCopy

    rnd = random.Random(seed)
    hs, vs = [], []
    for i in range(hosts):
        hs.append(HostCopy(i + 1, f"h{i + 1:05d}", "Up", "Enabled", 64, 262144, ()))
        for j in range(vms_per_host):
            c = rnd.choice([1, 2, 2, 4])
            vs.append(VmCopy(len(vs) + 1, f"h{i + 1:05d}-v{j:02d}", i + 1, c, c * 4096,
                             j % 2 == 0, rnd.choice([1, 2, 2, 3])))
    return ClusterState("bench", hs, vs)


def time_compute(hosts: int, vms_per_host: int) -> dict[str, Any]:
    from vms import failover

    runs = 1 if hosts >= 10000 else 3
    times, plan = [], None
    for _ in range(runs):
        state = synthetic(hosts, vms_per_host)  # a fresh copy: no cached rankings
        t0 = time.perf_counter()
        plan = failover.compute(state)
        times.append((time.perf_counter() - t0) * 1000)
    return {"hosts": hosts, "vms": hosts * vms_per_host, "ha_vms": plan.ha_vms,
            "ms": statistics.median(times), "runs": runs, "capacity": plan.capacity,
            "exhaustive": plan.exhaustive}


def evacuation(n_vms: int, *, mixed: bool, seed: int = 3) -> dict[str, Any]:
    """Spread of one host's evacuation, old order vs R24 (in memory, same rooms):
    10 target hosts, equal and empty, or (``mixed``) of 32/64/128 cpus up to half used."""
    from vms.placement import Room, rank

    rnd = random.Random(seed)

    def rooms():
        r = random.Random(seed)
        out = []
        for i in range(10):
            cpus = r.choice([32, 64, 128]) if mixed else 64
            out.append(Room(i + 1, f"t{i + 1:02d}", cpus, cpus * 4096,
                            r.randint(0, cpus // 2) if mixed else 0, 0))
        for room in out:
            room.used_memory_mb = room.used_cpus * 4096
        return out

    sizes = [(c, c * 2048) for c in (rnd.choice([1, 1, 2, 4]) for _ in range(n_vms))]

    def old_key(room):
        return (room.used_cpus, room.used_memory_mb, room.name)

    def run(order: str, workers: int):
        rs = rooms()
        start = {r.name: r.used_cpus for r in rs}
        placed: dict[str, int] = {r.name: 0 for r in rs}
        pending = []  # (room, c, m) migrations under way, not counted (old)
        for i, (c, m) in enumerate(sizes):
            if order == "old":
                fit = sorted((r for r in rs if r.fits(c, m)), key=old_key)
            else:
                fit = rank(rs, c, m, ha=False, ha_tag="")
            if not fit:
                continue
            target = fit[0]
            placed[target.name] += 1
            if order == "old":
                pending.append((target, c, m))
                if len(pending) == workers or i == len(sizes) - 1:
                    for r, pc, pm in pending:  # this round's migrations complete
                        r.used_cpus += pc
                        r.used_memory_mb += pm
                    pending = []
            else:
                target.used_cpus += c
                target.used_memory_mb += m
        counts = list(placed.values())
        taken = max((r.used_cpus - start[r.name]) / r.cpus for r in rs)
        fullest = max(r.used_cpus / r.cpus for r in rs)
        return {"max": max(counts), "min": min(counts), "placed": sum(counts),
                "largest_share_taken": taken, "fullest_host": fullest}

    return {"vms": n_vms, "targets": 10, "mixed": mixed, "before": run("old", 5),
            "after": run("new", 5)}


def run(o: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"command": o.get("command", "bench plan"), "compute": []}
    for n in o["sizes"]:
        say(f"failover plan in memory: {n} hosts × {o['vms_per_host']} VMs")
        out["compute"].append(time_compute(n, o["vms_per_host"]))
    out["evacuation"] = [evacuation(o["evacuation"], mixed=False),
                         evacuation(o["evacuation"], mixed=True)]
    if o["db_hosts"]:
        with interruptible(), throwaway_database(o) as (db, tmp):
            env = bench_env(db.url, str(tmp))
            manage(env, "migrate", "--noinput", "-v0")
            say(f"seeding {o['db_hosts']} hosts × {o['vms_per_host']} VMs")
            run_python(env, "-m", "bench.seed", "ping", "--hosts", str(o["db_hosts"]),
                       "--vms-per-host", str(o["vms_per_host"]), "--out",
                       str(tmp / "hosts.json"))
            out["db"] = {"hosts": o["db_hosts"], "vms": o["db_hosts"] * o["vms_per_host"],
                         **json.loads(run_python(env, "-c", DB_SCRIPT).strip().splitlines()[-1])}
            out["machine"] = machine_info(db)
    else:
        out["machine"] = machine_info(None)
    return out


def report(r: dict[str, Any]) -> str:
    rows = [[f"{c['hosts']:,}", f"{c['vms']:,}", f"{c['ha_vms']:,}", f"{c['ms']:.0f} ms",
             c["capacity"], "yes" if c["exhaustive"] else "top HA-loaded"]
            for c in r["compute"]]
    text = ("Failover plan, one cluster, in memory (vms.failover.compute)\n"
            + table(["hosts", "VMs", "HA VMs", "compute", "capacity", "k ≥ 2 combinations"],
                    rows))
    if "db" in r:
        d = r["db"]
        text += ("\n\nFrom the database: {hosts:,} hosts, {vms:,} VMs in {clusters} clusters\n"
                 .format(**d)
                 + table(["sweep's change check", "full recomputation (load+compute+store)",
                          "of which compute"],
                         [[f"{d['fingerprint_ms']:.0f} ms", f"{d['recompute_ms']:.0f} ms",
                           f"{d['compute_ms']:.0f} ms"]]))
    for e in r["evacuation"]:
        rows = [[name, e[k]["max"], e[k]["min"], f"{e[k]['largest_share_taken'] * 100:.0f} %",
                 f"{e[k]['fullest_host'] * 100:.0f} %", e[k]["placed"]]
                for name, k in (("before (least loaded, in-flight not counted)", "before"),
                                ("after (R24 spread, in-flight counted)", "after"))]
        kind = ("of mixed sizes, up to half used" if e["mixed"]
                else "of 64 cpus, empty")
        text += (f"\n\nEvacuation of {e['vms']} VMs over {e['targets']} hosts {kind}\n"
                 + table(["placement", "max VMs/target", "min VMs/target",
                          "largest cpu share taken", "fullest host after", "placed"], rows))
    return text


def as_json(r: dict[str, Any]) -> str:
    return json.dumps(r, default=str, indent=2)
