"""The real running system, for the end-to-end (tests/e2e) and browser (tests/browser)
suites: a fresh database, then a real daphne, a django-q cluster running the engine
loops and the fleet simulator, as subprocesses on free loopback ports
(hadash.supervisor.Supervisor), talking HTTP and websockets only.

Fixtures:
- ``database`` / ``module_database``: a fresh database of the same kind as the suite's
  (a new PostgreSQL database on the server in ``DATABASE_URL`` when that is
  PostgreSQL, else a SQLite file), dropped afterwards.
- ``system``: the running system for one test, as ``(api, control, sup)``.
- ``module_system``: one running system shared by a test module, as a ``System``.

The helpers (``manage``, ``wait_for``, ``start_system``) are imported by the suites
(``from tests.conftest import …``).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from hadash.supervisor import (  # noqa: F401 (wait_for: used by the suites)
    ROOT,
    Supervisor,
    daphne_argv,
    free_port,
    wait_for,
    wait_for_port,
)

# The engine's timings, shortened so that detection and recovery take seconds.
FAST_CONFIG = {"ping.interval": "2", "ping.timeout": "2",
               "investigate.retry.interval": "5", "restart.retry.interval": "5"}


def pg_admin_url() -> str | None:
    """The PostgreSQL server the suite runs on (None on the SQLite run)."""
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        return url
    return None


@contextlib.contextmanager
def fresh_database(directory: Path, prefix: str = "e2e") -> Iterator[str]:
    """The URL of a new, empty database; PostgreSQL ones are dropped on exit."""
    url = pg_admin_url()
    if url is None:
        yield f"sqlite:///{directory / f'{prefix}.sqlite3'}"
        return
    import dj_database_url
    import psycopg

    cfg = dj_database_url.parse(url)
    name = f"hadash_{prefix}_{uuid.uuid4().hex[:8]}"
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


@pytest.fixture
def database(tmp_path):
    """A fresh database of the same kind as the suite's, for the system under test."""
    with fresh_database(tmp_path, "e2e") as url:
        yield url


@pytest.fixture(scope="module")
def module_var_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("system")


@pytest.fixture(scope="module")
def module_database(module_var_dir):
    """``database`` for a whole test module (with ``module_system``)."""
    with fresh_database(module_var_dir, "e2e") as url:
        yield url


def manage(env, *args, timeout=120) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n" \
                                 f"{proc.stderr}"
    return proc.stdout


@dataclass
class System:
    """A running hadash: web (daphne), engine (qcluster) and fleet (simulator)."""

    env: dict[str, str]
    sup: Supervisor
    token: str
    base_url: str  # http://127.0.0.1:<web port>
    fleet_url: str  # http://127.0.0.1:<fleet port>, HADASH_FLEET_URL of the web process
    api: httpx.Client  # the operator API, as the staff user "e2e" (Bearer token)
    control: httpx.Client | None = None  # the simulator's control API
    hosts: int = 0
    vms: int = 0
    extra: dict = field(default_factory=dict)  # for the suites' own bookkeeping

    def manage(self, *args, timeout=120) -> str:
        return manage(self.env, *args, timeout=timeout)


@contextlib.contextmanager
def start_system(database: str, var_dir: Path, *, hosts: int = 4, vms: int = 8,
                 ha_ratio: float = 0.5, clusters: int = 1,
                 setup=None) -> Iterator[System]:
    """Migrate ``database``, start the whole system on it and wait until every
    simulated VM is registered and every host is Up. ``setup(system)`` runs after the
    migrations, before anything starts (e.g. to create users). Everything is stopped on
    exit, and no process may be left running."""
    # Secrets (R30): SECRET_KEY and HADASH_AGENT_KEY are this test session's own
    # (conftest.py); the simulator's control token is this system's own.
    env = {**os.environ, "DATABASE_URL": database, "HADASH_VAR_DIR": str(var_dir),
           "HADASH_ENGINE_LOOPS": "1", "HADASH_LOG": "INFO",
           "HADASH_FLEET_TOKEN": secrets.token_urlsafe(32)}
    assert env.get("SECRET_KEY") and env.get("HADASH_AGENT_KEY"), "conftest.py sets them"
    env.pop("CI", None)
    manage(env, "migrate", "--noinput", "-v0")
    token = manage(env, "apitoken", "e2e", "--create").strip().splitlines()[-1]
    web_port, fleet_port = free_port(), free_port()
    base_url, fleet_url = f"http://127.0.0.1:{web_port}", f"http://127.0.0.1:{fleet_port}"
    sup = Supervisor(echo=bool(os.environ.get("HADASH_E2E_ECHO")), grace=8.0, base_env=env)
    api = httpx.Client(base_url=f"{base_url}/api/v1",
                       headers={"Authorization": f"Bearer {token}"}, timeout=10)
    system = System(env=env, sup=sup, token=token, base_url=base_url, fleet_url=fleet_url,
                    api=api, hosts=hosts, vms=vms)
    try:
        if setup is not None:
            setup(system)
        # As `manage.py demo` does: the dashboard's Simulator page talks to the fleet.
        web = sup.python("web", *daphne_argv(web_port), env={"HADASH_FLEET_URL": fleet_url})
        wait_for_port(web_port, proc=web.proc, timeout=60)
        for key, value in FAST_CONFIG.items():
            assert api.put(f"/config/{key}", json={"value": value}).status_code == 200
        manage(env, "engine", "start")
        sup.manage("engine", "qcluster")
        sup.manage("fleet", "simulate", "--server", base_url,
                   "--listen", f"127.0.0.1:{fleet_port}", "--hosts", str(hosts),
                   "--vms", str(vms), "--ha-ratio", str(ha_ratio),
                   "--clusters", str(clusters), "--start-delay", "0.2",
                   "--api-token", token)
        system.control = httpx.Client(
            base_url=f"{fleet_url}/control", timeout=10,
            headers={"Authorization": f"Bearer {env['HADASH_FLEET_TOKEN']}"})
        wait_for(f"{vms} VMs registered and {hosts} hosts Up", lambda: (
            len(api.get("/vms").json()) == vms
            and [h["status"] for h in api.get("/hosts").json()] == ["Up"] * hosts), 60)
        yield system
    except BaseException:
        for c in sup.children:
            print(f"---- {c.name} (last lines)\n" + "\n".join(c.log[-40:]))
        raise
    finally:
        sup.stop()
        api.close()
        if system.control is not None:
            system.control.close()
        assert sup.leftovers() == [], "processes left running after stop"


@pytest.fixture
def system(database, tmp_path):
    """The running system for one test: ``(api, control, sup)``."""
    with start_system(database, tmp_path) as s:
        yield s.api, s.control, s.sup
