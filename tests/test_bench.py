"""Smoke tests of ``manage.py bench``: every benchmark runs end to end at a tiny size,
so the command cannot silently rot. No timing is asserted (machines are shared and
noisy; numbers belong in docs/benchmarks.md): only that each run completes, prints
its table, and leaves no database and no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from hadash.supervisor import ROOT


def pg_server() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if not url.startswith(("postgres://", "postgresql://")):
        pytest.skip("needs DATABASE_URL pointing at PostgreSQL")
    return url.rsplit("/", 1)[0]


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), "bench", *args, "--database", pg_server()],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HADASH_BENCH_LOG": "WARNING"},
    )
    assert proc.returncode == 0, f"bench {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def bench_databases() -> set[str]:
    import psycopg

    with psycopg.connect(f"{pg_server()}/postgres", autocommit=True) as conn:
        rows = conn.execute("SELECT datname FROM pg_database").fetchall()
    return {r[0] for r in rows if r[0].startswith("hadash_bench_")}


def databases_named(stderr: str) -> set[str]:
    return set(re.findall(r"database (hadash_bench_[0-9a-f]+)", stderr))


def processes_using(db_name: str) -> list[int]:
    """Processes of ours whose environment points at the benchmark's database."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if db_name.encode() in f.read():
                    found.append(int(entry.name))
        except OSError:
            continue
    return found


def assert_cleaned_up(stderr: str) -> None:
    names = databases_named(stderr)
    assert names, f"the run did not say which database it used:\n{stderr[-2000:]}"
    assert not names & bench_databases(), f"database(s) left behind: {names}"
    for name in names:
        assert processes_using(name) == [], f"processes left behind for {name}"


def test_refuses_sqlite_unless_allowed():
    with pytest.raises(CommandError, match="--allow-sqlite"):
        call_command("bench", "ping", "--database", "sqlite:///bench.sqlite3")


def test_rejects_bad_options():
    with pytest.raises(CommandError):
        call_command("bench", "ping", "--transport", "carrier-pigeon")
    with pytest.raises(CommandError):
        call_command("bench", "restart", "--workers", "0")
    with pytest.raises(CommandError):
        call_command("bench", "restart", "--failed-hosts", "0")
    with pytest.raises(CommandError):
        call_command("bench", "agent-crash", "--kills", "0")


def test_agent_crash_refuses_clearly_what_it_cannot_run():
    """`bench agent-crash` needs the real fleet (root, libvirt, qemu: the tier's smoke
    is tests/realfleet) and PostgreSQL; without them it says so and starts nothing."""
    from bench.realfleet import requirements_problem

    with pytest.raises(CommandError, match="runs on PostgreSQL"):
        call_command("bench", "agent-crash", "--database", "sqlite:///x.sqlite3",
                     "--allow-sqlite")
    if requirements_problem() is not None:
        with pytest.raises(CommandError, match="needs a real fleet"):
            call_command("bench", "agent-crash", "--database",
                         "postgres://postgres@127.0.0.1:5432/postgres")


@pytest.mark.slow
@pytest.mark.postgres_only
def test_ping_smoke():
    proc = bench("ping", "--hosts", "5", "--seconds", "2", "--warmup", "0.5",
                 "--connections", "4", "--web-processes", "1,2", "--ceiling-seconds", "0.5",
                 "--ceiling-warmup", "0", "--batch", "5", "--agents", "4",
                 "--loadgen-processes", "2")
    out = proc.stdout
    assert "| transport" in out and "PostgreSQL ceiling" in out, out
    # websocket runs: the bare Channels consumer before and after, and real ÷ bare
    assert "bare Channels consumer, same run" in out and "real ÷ bare" in out, out
    assert len(re.findall(r"^\| [12] +\| 4 +\| closed loop.*\| (before|after) ", out, re.M)) \
        == 4, out
    for transport in ("ws", "http"):
        assert re.search(rf"^\| {transport} +\| 1 ", out, re.M), out
        assert re.search(rf"^\| {transport} +\| 2 ", out, re.M), out
    for mode in ("per-ping", "batched"):
        assert re.search(rf"^\| {mode} +\| 1 ", out, re.M), out
        assert re.search(rf"^\| {mode} +\| 2 ", out, re.M), out
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_ping_json_open_loop():
    proc = bench("ping", "--hosts", "6", "--seconds", "2", "--warmup", "0.5", "--rate", "12",
                 "--transport", "ws", "--ceiling-seconds", "0", "--json",
                 "--experiment", "any,dispatch", "--fillfactor", "70")
    result = json.loads(proc.stdout)
    assert result["benchmark"] == "ping" and result["ceiling"] == []
    assert "any" in result["variant"] and "fillfactor 70" in result["variant"]
    [run] = result["runs"]
    assert run["transport"] == "ws" and run["mode"].startswith("open loop")
    assert run["pings"] > 0 and run["errors"] == 0  # pings were answered, none refused
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_restart_smoke():
    proc = bench("restart", "--vms", "3", "--workers", "1,2", "--spare-hosts", "1",
                 timeout=900)
    out = proc.stdout
    assert "HA restart throughput" in out and "| VM start s" in out, out
    assert re.search(r"^\| 0\.0 +\| 1 +\| 3 ", out, re.M), out
    assert re.search(r"^\| 0\.0 +\| 2 +\| 3 ", out, re.M), out
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_restart_rack_smoke():
    proc = bench("restart", "--failed-hosts", "2", "--vms", "2", "--workers", "2",
                 "--spare-hosts", "1", "--start-delay", "0.1", timeout=900)
    out = proc.stdout
    assert "A rack fails: 2 hosts" in out and "busy slots" in out, out
    assert re.search(r"^\| 0\.1 +\| 2 +\| 4 ", out, re.M), out
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_detect_smoke():
    proc = bench("detect", "--hosts", "4", "--vms", "8", "--failures", "1", "--clusters", "1",
                 "--start-delay", "0.1", timeout=900)
    out = proc.stdout
    assert "HostDown since last ping" in out and "downtime R18" in out, out
    assert "peak RSS" in out, out
    assert re.search(r"^\| kvm-00\d ", out, re.M), out
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_interrupted_run_stops_processes_and_drops_its_database():
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), "bench", "ping", "--hosts", "5",
         "--seconds", "60", "--ceiling-seconds", "0", "--transport", "ws",
         "--database", pg_server()],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    seen: list[str] = []
    deadline = time.monotonic() + 120
    try:
        for line in proc.stderr:
            seen.append(line)
            if "load:" in line or time.monotonic() > deadline:
                break
        assert any("load:" in line for line in seen), "".join(seen)
        time.sleep(2)  # the load generator is running
        proc.send_signal(signal.SIGTERM)
        rest_out, rest_err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(seen) + rest_err
    assert proc.returncode != 0
    assert "interrupted" in stderr, stderr[-2000:]
    assert_cleaned_up(stderr)


@pytest.mark.parametrize("names,ok", [("any,dispatch,nolayer", True), ("any,bogus", False)])
def test_asgi_experiment_names(names, ok):
    """bench.asgi_experiment still accepts the experiments docs/benchmarks.md ran (P1,
    P2, P4: now the production code, tested in hosts/tests) and refuses unknown ones."""
    proc = subprocess.run(
        [sys.executable, "-c", "import bench.asgi_experiment"], cwd=ROOT,
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HADASH_BENCH_EXPERIMENTS": names,
             "DJANGO_SETTINGS_MODULE": "hadash.settings"},
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-2000:]
    assert ("production code now" if ok else "unknown experiment(s) ['bogus']") in proc.stderr


@pytest.mark.slow
@pytest.mark.postgres_only
def test_dashboard_smoke():
    """The dashboard benchmark runs end to end (Debian's Chromium) at a tiny size."""
    import shutil

    if not shutil.which("chromium") and not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no /usr/bin/chromium")
    out = StringIO()
    call_command("bench", "dashboard", "--hosts", "5", "--vms-per-host", "2", "--rate", "20",
                 "--seconds", "2", "--requests", "3", stdout=out)
    text = out.getvalue()
    assert "overview served (GET /), median" in text
    assert "events committed / shown live" in text


@pytest.mark.slow
@pytest.mark.postgres_only
def test_plan_smoke():
    """bench plan (R22, R24): in memory, from a seeded database, and the evacuation."""
    proc = bench("plan", "--sizes", "5,20", "--db-hosts", "10", "--evacuation", "10")
    out = proc.stdout
    assert "Failover plan, one cluster, in memory" in out, out
    assert re.search(r"^\| 20 +\| 200 +\| 100 ", out, re.M), out
    assert "From the database: 10 hosts, 100 VMs" in out, out
    assert "Evacuation of 10 VMs over 10 hosts" in out, out
    assert_cleaned_up(proc.stderr)


@pytest.mark.slow
@pytest.mark.postgres_only
def test_register_smoke():
    """bench register (issue 12): one POST each, bulk in chunks and in one request."""
    proc = bench("register", "--hosts", "5", "--vms", "40", "--chunk", "15", "--single", "3")
    out = proc.stdout
    assert re.search(r"^\| single \(POST /vms each\) +\| 3 +\| 3 ", out, re.M), out
    assert re.search(r"^\| chunks of 15 +\| 40 +\| 3 ", out, re.M), out
    assert re.search(r"^\| one request +\| 40 +\| 1 ", out, re.M), out
    assert "VMs in the database at the end: 85" in out, out  # 2 warm-up VMs too
    assert_cleaned_up(proc.stderr)
