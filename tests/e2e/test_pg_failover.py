"""A PostgreSQL failover under the running system (issue 12; docs/deploy.md,
"PostgreSQL high availability"; docs/reliability.md).

``manage.py chaos --pg-failovers 1`` on a tiny fleet: the run makes a PostgreSQL of its
own — a primary and a synchronous standby, initdb'd in a temporary directory with this
machine's binaries (never the machine's server) — and hadash runs on the multi-host
URL ``postgres://…@127.0.0.1:A,127.0.0.1:B/…?target_session_attrs=read-write``. Mid-run
the primary is killed (SIGKILL of every one of its processes) and the standby promoted.
The test asserts what an operator relies on: hadash (pings, the sweeper, every engine
loop) writes again on the promoted server; nothing committed before the kill is
missing there (every commit a plain client had acknowledged, every event seen
committed); and the chaos run's SPEC §6 checks hold.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys

import pytest

from bench.pgha import find_pg_bin
from hadash.supervisor import ROOT
from tests.conftest import pg_admin_url
from tests.e2e.test_chaos import redis_url, tails

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_pg_binaries_and_redis() -> str:
    if pg_admin_url() is None:
        pytest.skip("runs once, in the suite's PostgreSQL pass (it makes its own "
                    "PostgreSQL pair; the SQLite pass would only repeat it)")
    pg_bin, why = find_pg_bin()
    if pg_bin is None:
        if IN_CI:
            pytest.fail(f"CI runs the PostgreSQL failover test: {why}")
        pytest.skip(why)
    import redis

    url = redis_url()
    try:
        redis.Redis.from_url(url, socket_timeout=3).ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"Redis at {url} does not answer ({exc}); CI runs the failover "
                        "test with Redis as the channel layer")
        pytest.skip(f"Redis at {url} does not answer ({exc}); set HADASH_TEST_REDIS_URL")
    return url


@pytest.mark.e2e
@pytest.mark.slow
def test_hadash_writes_on_the_promoted_standby_and_loses_nothing(tmp_path):
    redis = require_pg_binaries_and_redis()
    logs = tmp_path / "logs"
    env = {**os.environ, "SECRET_KEY": secrets.token_urlsafe(50),
           "HADASH_AGENT_KEY": secrets.token_urlsafe(32), "HADASH_VAR_DIR": str(tmp_path)}
    env.pop("CI", None)
    argv = [sys.executable, str(ROOT / "manage.py"), "chaos", "--pg-failovers", "1",
            "--hosts", "4", "--vms", "8", "--clusters", "1", "--duration", "20",
            "--fault-every", "6", "--kill-every", "0", "--db-cut-every", "0",
            "--settle", "120", "--settle-stable", "3", "--seed", "3",
            "--redis", redis, "--json", "--log-dir", str(logs)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    where = f"\n{proc.stderr[-4000:]}\n{tails(logs) if logs.exists() else ''}"
    assert proc.returncode in (0, 1), f"the failover run did not complete:{where}"
    r = json.loads(proc.stdout)
    f = r["pg_failover"]
    print(json.dumps({k: f[k] for k in ("mode", "worst", "canary")}, default=str))

    # The failover happened, from a synchronous standby.
    [failover] = f["failovers"]
    assert not failover.get("error"), failover
    assert [x["sync_state"] for x in failover["replication_before"]] == ["sync"], failover
    assert failover["from"] != failover["to"]

    # hadash writes again on the promoted server: ingested pings, the sweeper's lease,
    # every engine loop's heartbeat.
    back = failover["hadash"]
    assert back["ping_s"] is not None and back["sweeper_s"] is not None, back
    assert back["engine_loops"] >= 2 and back["engine_loops_not_back"] == [], back

    # Nothing committed before the kill is missing on the promoted server.
    assert failover["canary_missing"] == [] and f["canary"]["missing"] == [], f["canary"]
    assert f["canary"]["acked"] > 100, f["canary"]
    assert f["events_seen_committed"] > 0 and f["events_lost"] == [], f

    # And what the chaos run checks (SPEC §6) held through it.
    assert r["settle"]["settled"], f"the fleet did not settle: {r['settle']}{where}"
    assert r["dashboard"]["missed"] == [], r["dashboard"]
    assert r["violations"] == [] and proc.returncode == 0, f"{r['violations']}{where}"
