"""End to end, as in production: a real daphne, a real django-q cluster running the
engine loops, and the real fleet simulator, as subprocesses on free loopback ports,
talking HTTP (and websockets) only. Faults go in through the simulator's control API;
outcomes are read through the operator API."""

from __future__ import annotations

import os
import sys
import time
import uuid

import httpx
import psycopg
import pytest

from hadash.supervisor import ROOT, Supervisor, free_port, wait_for_port

pytestmark = [pytest.mark.e2e]

PG_SERVER = os.environ.get("HADASH_E2E_PG", "")


def pg_admin_url() -> str | None:
    """The PostgreSQL server the suite runs on (None on the SQLite run)."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        return url
    return None


@pytest.fixture
def database(tmp_path):
    """A fresh database of the same kind as the suite's, for the system under test."""
    url = pg_admin_url()
    if url is None:
        yield f"sqlite:///{tmp_path / 'e2e.sqlite3'}"
        return
    import dj_database_url

    cfg = dj_database_url.parse(url)
    name = f"hadash_e2e_{uuid.uuid4().hex[:8]}"
    conninfo = dict(host=cfg["HOST"] or "127.0.0.1", port=cfg["PORT"] or 5432,
                    user=cfg["USER"] or "postgres", password=cfg["PASSWORD"] or None,
                    dbname="postgres", autocommit=True, connect_timeout=5)
    with psycopg.connect(**conninfo) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = url.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(**conninfo) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(env, *args, timeout=120) -> str:
    import subprocess

    proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n" \
                                 f"{proc.stderr}"
    return proc.stdout


def wait_for(what: str, cond, timeout: float, every: float = 0.5):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = cond()
            if last:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture
def system(database, tmp_path):
    env = {**os.environ, "DATABASE_URL": database, "HADASH_VAR_DIR": str(tmp_path),
           "HADASH_ENGINE_LOOPS": "2", "HADASH_LOG": "INFO"}
    env.pop("CI", None)
    manage(env, "migrate", "--noinput", "-v0")
    token = manage(env, "apitoken", "e2e", "--create").strip().splitlines()[-1]
    web_port, fleet_port = free_port(), free_port()
    sup = Supervisor(echo=bool(os.environ.get("HADASH_E2E_ECHO")), grace=8.0, base_env=env)
    api = httpx.Client(base_url=f"http://127.0.0.1:{web_port}/api/v1",
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    try:
        web = sup.python("web", "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port),
                         "hadash.asgi:application")
        wait_for_port(web_port, proc=web.proc, timeout=60)
        for key, value in {"ping.interval": "2", "ping.timeout": "2",
                           "investigate.retry.interval": "5",
                           "restart.retry.interval": "5"}.items():
            assert api.put(f"/config/{key}", json={"value": value}).status_code == 200
        manage(env, "engine", "start")
        sup.manage("engine", "qcluster")
        sup.manage("fleet", "simulate", "--server", f"http://127.0.0.1:{web_port}",
                   "--listen", f"127.0.0.1:{fleet_port}", "--hosts", "4", "--vms", "8",
                   "--ha-ratio", "0.5", "--clusters", "1", "--start-delay", "0.2",
                   "--api-token", token)
        control = httpx.Client(base_url=f"http://127.0.0.1:{fleet_port}/control", timeout=10)
        wait_for("8 VMs registered and 4 hosts Up", lambda: (
            len(api.get("/vms").json()) == 8
            and [h["status"] for h in api.get("/hosts").json()] == ["Up"] * 4), 60)
        yield api, control, sup
    except BaseException:
        for c in sup.children:
            print(f"---- {c.name} (last lines)\n" + "\n".join(c.log[-40:]))
        raise
    finally:
        sup.stop()
        api.close()
        assert sup.leftovers() == [], "processes left running after stop"


def vms_on(api, host):
    return {v["name"]: v for v in api.get("/vms", params={"host": host}).json()}


def fault(control, do):
    r = control.post("/faults", json={"do": do})
    assert r.status_code == 200, r.text


def test_power_loss_restarts_ha_vms_elsewhere_and_agent_stop_restarts_nothing(system):
    api, control, sup = system
    victim, survivor = "kvm-001", "kvm-002"
    on_victim = vms_on(api, victim)
    on_survivor = vms_on(api, survivor)
    assert on_victim and on_survivor
    ha = sorted(n for n, v in on_victim.items() if v["ha_enabled"])
    plain = sorted(n for n, v in on_victim.items() if not v["ha_enabled"])

    # A host loses power: Down, its HA VMs Running elsewhere, the others Stopped.
    fault(control, f"host {victim} power off")
    wait_for(f"{victim} Down", lambda: api.get(f"/hosts/{victim}").json()["status"] == "Down",
             30)

    def recovered():
        vms = {n: api.get(f"/vms/{n}").json() for n in ha + plain}
        return all(vms[n]["state"] == "Running" and vms[n]["host"] not in (victim, None)
                   for n in ha) and all(vms[n]["state"] == "Stopped" for n in plain)

    wait_for("HA VMs running elsewhere", recovered, 45)
    for n in ha:
        work = api.get("/ha-work", params={"vm": n}).json()
        assert [w["step"] for w in work] == ["Done"]

    # Only an agent dies: its VMs still run, so nothing is restarted.
    fault(control, f"host {survivor} agent stop")
    wait_for(f"{survivor} Alert", lambda: api.get(f"/hosts/{survivor}").json()["status"]
             == "Alert", 30)
    time.sleep(3)
    for n in on_survivor:
        vm = api.get(f"/vms/{n}").json()
        assert vm["state"] == "Running" and vm["host"] == survivor
        assert api.get("/ha-work", params={"vm": n}).json() == []

    engine = api.get("/engine").json()
    assert engine["sweeper"]["healthy"] and engine["alive_loops"] >= 1


def test_killed_cluster_is_taken_over(system, tmp_path):
    """Issue 3: a wedged or killed django-q cluster loses the sweeper lease; a second
    cluster's loops take over within the lease TTL + the schedule/standby delay."""
    api, control, sup = system
    import signal

    from hadash.supervisor import live_members

    sup.manage("engine2", "qcluster")
    # The second cluster gets loops from the queue (the `engine start` command).
    manage({**sup.base_env}, "engine", "start")
    wait_for("a sweeper", lambda: api.get("/engine").json()["sweeper"]["healthy"], 30)
    # Kill whichever cluster holds the sweeper lease.
    holder_pid = int(api.get("/engine").json()["sweeper"]["holder"].split(":")[1])
    first = next(c for c in sup.children
                 if c.name.startswith("engine") and holder_pid in live_members(c.proc.pid))
    killed = set(live_members(first.proc.pid))
    os.killpg(first.proc.pid, signal.SIGKILL)
    t0 = time.monotonic()

    def new_sweeper():
        st = api.get("/engine").json()
        holder = st["sweeper"]["holder"]
        return st["sweeper"]["healthy"] and holder and int(holder.split(":")[1]) not in killed

    wait_for("another cluster's loop sweeping", new_sweeper, 90)
    assert time.monotonic() - t0 <= 60, "takeover took more than a minute"
    events = api.get("/events", params={"latest": "true", "limit": 200}).json()
    assert any(e["event"] == "SweeperTakeover" and e["alert"] for e in events)
    # And the system still works: a host failure is still handled.
    fault(control, "host kvm-003 power off")
    wait_for("kvm-003 Down", lambda: api.get("/hosts/kvm-003").json()["status"] == "Down", 30)
