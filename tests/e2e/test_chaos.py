"""The chaos run (issue 8 part 10, SPEC §6; docs/reliability.md).

``test_short_chaos_run_keeps_spec_6`` runs ``manage.py chaos`` short and bounded: the
whole system as real processes (2 daphne behind a load balancer, 2 qclusters, the
fleet simulator, a live dashboard client) on PostgreSQL with Redis as the channel
layer, 75 s of machine faults plus kill -9 of web and engine processes and cuts of
every connection to its database — no PostgreSQL restarts here, they would hit everyone
sharing the server. It asserts
what SPEC §6 promises: no VM ran twice, no HA item was lost or processed twice, the
dashboard missed no event, and after the settle every HA VM runs exactly once.

The other tests check the run's own checks on hand-made inputs, so a broken check
cannot make the chaos test pass.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.chaos import Front, classify, make_plan, work_chains
from hadash.supervisor import ROOT, free_port
from tests.conftest import pg_admin_url

SEED = int(os.environ.get("HADASH_CHAOS_SEED", "11"))


def redis_url() -> str:
    """The Redis the channel-layer tests use (scripts/test: HADASH_TEST_REDIS_URL)."""
    return os.environ.get("HADASH_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def require_postgres_and_redis() -> tuple[str, str]:
    server = pg_admin_url()
    if server is None:
        pytest.skip("the chaos run needs PostgreSQL (the suite's DATABASE_URL): it runs "
                    "what production runs, several processes writing at once")
    import redis

    url = redis_url()
    try:
        redis.Redis.from_url(url, socket_timeout=3).ping()
    except redis.RedisError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"Redis at {url} does not answer ({exc}); CI runs the chaos test "
                        "with Redis as the channel layer")
        pytest.skip(f"Redis at {url} does not answer ({exc}); set HADASH_TEST_REDIS_URL")
    return server, url


def tails(log_dir: Path, lines: int = 25) -> str:
    out = []
    for path in sorted(log_dir.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()
        out.append(f"---- {path.name} (last {lines} of {len(text)} lines)\n"
                   + "\n".join(text[-lines:]))
    return "\n".join(out)


@pytest.mark.e2e
@pytest.mark.slow
def test_short_chaos_run_keeps_spec_6(tmp_path):
    server, redis = require_postgres_and_redis()
    logs = tmp_path / "logs"
    env = {**os.environ, "SECRET_KEY": secrets.token_urlsafe(50),
           "HADASH_AGENT_KEY": secrets.token_urlsafe(32), "HADASH_VAR_DIR": str(tmp_path)}
    env.pop("CI", None)
    argv = [sys.executable, str(ROOT / "manage.py"), "chaos", "--hosts", "8", "--vms", "40",
            "--clusters", "1", "--duration", "75", "--fault-every", "4", "--kill-every", "30",
            "--db-cut-every", "30",
            "--seed", str(SEED), "--database", server, "--redis", redis, "--json",
            "--log-dir", str(logs)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1500)
    where = f"\n{proc.stderr[-4000:]}\n{tails(logs) if logs.exists() else ''}"
    assert proc.returncode in (0, 1), f"the chaos run did not complete:{where}"
    r = json.loads(proc.stdout)
    print(f"chaos seed {r['seed']}: {r['faults']['applied']} faults, "
          f"{[k['process'] + ':' + k['role'] for k in r['kills']]} killed, "
          f"{len(r['db_cuts'])} database cuts; what hadash did {r['events_by_kind']}; "
          f"sweeper gap {r['sweeper']['longest_gap']}; dashboard {r['dashboard']['received']}"
          f" events, {r['dashboard']['drops']} drops, latency {r['dashboard']['latency_s']}; "
          f"settle {r['settle']['seconds']} s; tracebacks "
          f"{ {n: c.get('tracebacks', 0) for n, c in r['logs'].items()} }")

    # The run did what it says (else the checks below would pass on nothing).
    assert r["faults"]["applied"] >= 8 and not r["faults"]["refused"], r["faults"]
    killed = {k["process"].rstrip("0123456789") for k in r["kills"]}
    assert killed == {"web", "engine"}, r["kills"]
    assert all("restarted_at" in k for k in r["kills"]), r["kills"]
    assert r["db_cuts"] and all(c.get("connections", 0) > 0 for c in r["db_cuts"]), \
        r["db_cuts"]
    assert r["double_runs"]["truth_samples"] >= 60
    assert r["sweeper"]["renewals"] >= 30
    assert r["dashboard"]["received"] >= 50 and r["dashboard"]["drops"] >= 1, r["dashboard"]

    # SPEC §6.
    assert r["double_runs"]["vms"] == [], f"VMs ran on two hosts at once: {r['double_runs']}"
    assert r["double_runs"]["overlapping_starts"] == [], r["double_runs"]["overlapping_starts"]
    assert r["ha"]["chains_broken"] == [], f"HA items processed twice: {r['ha']}"
    assert (r["ha"]["lost"], r["ha"]["stuck"], r["ha"]["gave_up"]) == ([], [], []), \
        f"HA VMs not running exactly once after the settle: {r['ha']}{where}"
    assert r["settle"]["settled"], f"the fleet did not settle: {r['settle']}{where}"
    assert r["dashboard"]["missed"] == [], f"events the dashboard missed: {r['dashboard']}"
    assert r["violations"] == [] and proc.returncode == 0, f"{r['violations']}{where}"


# --- the checks themselves ---------------------------------------------------------------------

def step_event(id, item, event, old, new, vm="vm-0001"):
    return {"id": id, "subject": "work", "subject_id": item, "subject_name": vm,
            "event": event, "field": "step", "old": old, "new": new}


def test_a_second_worker_on_a_stale_item_breaks_its_chain():
    """SPEC §6 (no item processed by two workers at once): each step event must start
    where the previous one left the item, and nothing follows a final step."""
    clean = [step_event(1, 7, "WorkScheduled", "", "Investigating"),
             step_event(2, 7, "WorkStep", "Investigating", "Scheduled"),
             step_event(5, 7, "WorkRetry", "Scheduled", "Scheduled"),
             step_event(9, 7, "WorkStep", "Scheduled", "Done")]
    item = {"id": 7, "step": "Done"}
    assert work_chains(clean, [item])["broken"] == []

    stale = clean[:2] + [step_event(4, 7, "WorkStep", "Investigating", "Scheduled")] \
        + clean[2:]
    broken = work_chains(stale, [item])["broken"]
    assert [b["item"] for b in broken] == [7] and "from Investigating" in broken[0]["why"]

    after_final = clean + [step_event(12, 7, "WorkStep", "Done", "Done")]
    assert "after final step Done" in work_chains(after_final, [item])["broken"][0]["why"]

    # the item's step changed without its event
    assert "its last event" in work_chains(clean[:3], [item])["broken"][0]["why"]


def test_ha_vms_not_running_are_told_apart():
    work = [{"id": 1, "vm": "a", "type": "HA", "step": "Done", "reason": "HostDown",
             "tried": 0, "taken_by": "", "last_error": ""},
            {"id": 2, "vm": "b", "type": "HA", "step": "Scheduled", "reason": "HostDown",
             "tried": 1, "taken_by": "", "last_error": "no host"},
            {"id": 3, "vm": "c", "type": "HA", "step": "Error", "reason": "VmPowerOff",
             "tried": 5, "taken_by": "", "last_error": "start failed"}]
    down = [{"vm": n, "state": "Stopped", "host": None, "powered_on_at": []}
            for n in ("a", "b", "c", "d")]
    lost, stuck, gave_up = classify(down, work)
    assert [v["vm"] for v in lost] == ["a", "d"]  # Done but stopped; never had an item
    assert [v["vm"] for v in stuck] == ["b"]
    assert [v["vm"] for v in gave_up] == ["c"]


def test_the_plan_comes_from_the_seed_and_heals_what_it_breaks():
    hosts = [f"kvm-{i:03d}" for i in range(1, 31)]
    vms = [f"vm-{i:04d}" for i in range(1, 301)]

    def plan(seed):
        return make_plan(seed, duration=300, hosts=hosts, vms=vms, fault_every=3,
                         kill_every=40, pg_restarts=1, webs=["web1", "web2"],
                         engines=["engine1", "engine2"], clusters=2, db_cut_every=60)

    assert plan(5) == plan(5) and plan(5) != plan(6)
    steps = plan(5)
    assert sum(s.kind == "pg-restart" for s in steps) == 1
    assert not any(s.kind == "pg-failover" for s in steps)
    failovers = [s.at for s in make_plan(5, duration=300, hosts=hosts, vms=vms,
                                         fault_every=3, kill_every=0, pg_restarts=0,
                                         webs=["web1"], engines=["engine1"],
                                         pg_failovers=3) if s.kind == "pg-failover"]
    assert failovers == [75.0, 150.0, 225.0]  # evenly, each with time for its new standby
    assert 3 <= sum(s.kind == "db-cut" for s in steps) <= 6
    assert {s.what.rstrip("12") for s in steps if s.kind == "kill"} >= {"web", "engine"}
    # At most 6 hosts (a fifth) and 5 of a 15-host cluster down, cut off or without
    # agent at any time; every such fault is followed by its heal on the same host.
    broken: dict[str, str] = {}
    heals = {"power off": "power on", "agent stop": "agent start",
             "network off": "network on"}
    for s in (s for s in steps if s.kind == "fault" and s.what.startswith("host ")):
        _, host, what = s.what.split(" ", 2)
        if what in heals:
            assert host not in broken
            broken[host] = heals[what]
        elif what in heals.values():
            assert broken.pop(host) == what
        assert len(broken) <= 6
        for c in (0, 1):
            assert sum(1 for h in broken if hosts.index(h) % 2 == c) <= 5


def test_the_front_balances_and_skips_a_dead_web_process():
    """The load balancer the chaos run puts in front of its two web processes."""
    servers, seen = [], []

    def serve(sock, label):
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(100)
                seen.append(label)
                conn.sendall(label.encode())

    for label in ("a", "b"):
        s = socket.create_server(("127.0.0.1", 0))
        servers.append(s)
        threading.Thread(target=serve, args=(s, label), daemon=True).start()
    dead = free_port()
    front = Front([servers[0].getsockname()[1], dead, servers[1].getsockname()[1]])
    try:
        async def ask() -> bytes:
            r, w = await asyncio.open_connection("127.0.0.1", front.port)
            w.write(b"hello")
            await w.drain()
            data = await r.read(10)
            w.close()
            return data

        answers = [asyncio.run(ask()) for _ in range(4)]
        assert answers == [b"a", b"b", b"a", b"b"]
        assert front.refused == 2 and front.connections == 4
    finally:
        front.close()
        for s in servers:
            s.close()
