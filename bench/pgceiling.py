"""The PostgreSQL ceiling for ping ingestion: the same row updates a steady ping causes
(``host.last_ping`` and the ``power_state_update_time`` / ``_count`` of its 10 VMs),
issued straight from psycopg with no web server and no Django in between.

* ``per-ping``: one transaction per ping — ``UPDATE host … WHERE id = %s`` and
  ``UPDATE vm_instance … WHERE id = ANY(%s)``, then COMMIT (what a server does that
  writes each ping as it comes);
* ``batched``: ``batch`` pings per transaction, the same two statements over all their
  ids (what ``hosts.agent.ingest`` does for steady websocket pings).

Each connection is its own process (no GIL between them) and updates its own share
of the hosts, as separate web processes would; they start together and run for the
same number of seconds. CPU is read from /proc inside the window by the workers
themselves: their own, their backends' (PostgreSQL runs on this machine) and the
whole machine's, so "other" is whatever else ran meanwhile.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from statistics import median
from typing import Any

HOST_SQL = "UPDATE host SET last_ping = %s WHERE id = ANY(%s)"
HOST_ONE_SQL = "UPDATE host SET last_ping = %s WHERE id = %s"
VM_SQL = ("UPDATE vm_instance SET power_state_update_time = %s, "
          "power_state_update_count = power_state_update_count + 1 WHERE id = ANY(%s)")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process on this machine, 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _machine() -> tuple[float, float]:
    """(busy, total) CPU time of the whole machine, in ticks (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    total = sum(parts[:8])
    return total - idle, total


def _loop(conninfo: dict, hosts: list[tuple[int, list[int]]], mode: str, batch: int,
          start_at: float, seconds: float, warmup: float) -> tuple[int, float, float, float, float]:
    import datetime as dt

    import psycopg

    with psycopg.connect(**conninfo) as conn:
        conn.execute("SELECT 1")
        conn.commit()
        backend = conn.info.backend_pid  # PostgreSQL runs on this machine: its CPU
        delay = start_at - time.time()
        if delay > 0:
            time.sleep(delay)
        n = len(hosts)
        i = 0
        t0 = time.perf_counter()
        warm_until = t0 + warmup
        measuring = warmup <= 0
        stop = warm_until + seconds
        done = 0
        cpu0, own0, machine0 = _cpu(backend), time.process_time(), _machine()
        while time.perf_counter() < stop:
            if not measuring and time.perf_counter() >= warm_until:
                measuring = True
                done = 0
                cpu0, own0, machine0 = _cpu(backend), time.process_time(), _machine()
                t0 = time.perf_counter()
            now = dt.datetime.now(dt.UTC)
            if mode == "per-ping":
                host_id, vm_ids = hosts[i % n]
                i += 1
                with conn.cursor() as cur:
                    cur.execute(HOST_ONE_SQL, (now, host_id), prepare=True)
                    cur.execute(VM_SQL, (now, vm_ids), prepare=True)
                conn.commit()
                done += 1
            else:
                chunk = [hosts[(i + k) % n] for k in range(min(batch, n))]
                i += len(chunk)
                with conn.cursor() as cur:
                    cur.execute(HOST_SQL, (now, [h for h, _ in chunk]), prepare=True)
                    cur.execute(VM_SQL, (now, [v for _, vs in chunk for v in vs]),
                                prepare=True)
                conn.commit()
                done += len(chunk)
        wall = time.perf_counter() - t0
        machine1 = _machine()
        return (done, wall, _cpu(backend) - cpu0, time.process_time() - own0,
                (machine1[0] - machine0[0]) / max(machine1[1] - machine0[1], 1e-6))


def measure(conninfo: dict, hosts: list[tuple[int, list[int]]], *, mode: str,
            connections: int, seconds: float, batch: int = 200,
            warmup: float = 2.0) -> dict[str, Any]:
    """Pings per second for ``mode`` over ``connections`` processes, measured after
    ``warmup`` seconds of the same writes (the table's pages settle: updated rows leave
    dead versions behind, pruned pages make room, as under a web server's load)."""
    shares = [hosts[i::connections] for i in range(connections)]
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 1.5  # time for the processes to start and connect
    with ctx.Pool(connections) as pool:
        results = pool.starmap(_loop, [(conninfo, share, mode, batch, start_at, seconds,
                                        warmup) for share in shares])
    pings = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    cores = os.cpu_count() or 1
    postgres = sum(r[2] for r in results) / wall
    client = sum(r[3] for r in results) / wall
    machine = median([r[4] for r in results]) * cores
    cpu = {"postgres": round(postgres, 3), "client": round(client, 3),
           "machine": round(machine, 3),
           "other": round(max(0.0, machine - postgres - client), 3)}
    return {"mode": mode, "connections": connections,
            "batch": batch if mode == "batched" else 1,
            "pings": pings, "seconds": round(wall, 2), "pings_per_s": round(pings / wall, 1),
            "cpu": cpu}
