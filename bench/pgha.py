"""A highly available PostgreSQL of the chaos run's own (``manage.py chaos
--pg-failovers N``; docs/deploy.md, "PostgreSQL high availability"): a primary and a
synchronous streaming standby, initdb'd in a temporary directory on two free loopback
ports with the machine's PostgreSQL binaries — never the machine's own server. hadash
reaches it through libpq's multi-host URL with ``target_session_attrs=read-write``.

A failover is what Patroni, repmgr or pg_auto_failover do after the primary's machine
dies: the primary is killed (SIGKILL of the postmaster and every backend: no
shutdown checkpoint, no goodbye to the clients), the standby is promoted
(``pg_ctl promote``), and a fresh standby is made from the new primary
(``pg_basebackup``) on the old primary's address, so the URL stays the same.

``synchronous_standby_names = '*'`` and ``synchronous_commit = on``: a commit is
acknowledged only once the standby has flushed it. Between a promotion and the new
standby's catch-up there is one server: by default (Patroni's ``synchronous_mode``)
the new primary then commits alone; ``strict`` (``synchronous_mode_strict``) keeps
commits waiting until the new standby is there.

:class:`Canary` is a plain client writing next to hadash: every commit the server
acknowledged must still be there after each failover.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hadash.supervisor import free_port

from .common import BenchDatabase, BenchError, say

TOOLS = ("initdb", "pg_ctl", "pg_basebackup", "postgres")


def find_pg_bin() -> tuple[Path | None, str]:
    """The directory with initdb, pg_ctl, pg_basebackup and postgres
    (``$HADASH_PG_BIN``, else Debian's newest /usr/lib/postgresql/N/bin, else PATH);
    ``(None, why)`` when there is none."""
    candidates: list[Path] = []
    if os.environ.get("HADASH_PG_BIN"):
        candidates.append(Path(os.environ["HADASH_PG_BIN"]))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if p.name.isdigit()),
                          key=lambda p: int(p.name), reverse=True)
        candidates += [p / "bin" for p in versions]
    if shutil.which("initdb"):
        candidates.append(Path(shutil.which("initdb")).parent)
    for c in candidates:
        if all((c / t).is_file() and os.access(c / t, os.X_OK) for t in TOOLS):
            return c, ""
    where = ", ".join(map(str, candidates)) or "none found ($HADASH_PG_BIN, " \
        "/usr/lib/postgresql/*/bin, PATH)"
    return None, (f"the PostgreSQL server binaries ({', '.join(TOOLS)}) are not on this "
                  f"machine (looked in: {where}); install postgresql or set HADASH_PG_BIN")


def _as_postgres() -> list[str]:
    """initdb and the server refuse to run as root: run them as the postgres user."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", "postgres", "--"]


@dataclass
class Node:
    name: str
    port: int
    data: Path

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    with contextlib.suppress(OSError):
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


@dataclass
class Pair:
    """Two PostgreSQL servers in ``root``: ``primary`` and ``standby`` (their roles swap
    at each failover). ``strict``: commits wait for a standby even right after a
    promotion (Patroni's synchronous_mode_strict)."""

    root: Path
    bin: Path
    strict: bool = False
    nodes: list[Node] = field(default_factory=list)
    primary: Node | None = None
    standby: Node | None = None
    generation: int = 0
    _first: threading.Thread | None = None
    _first_error: str = ""

    # --- tools ---------------------------------------------------------------------------
    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        argv = [*_as_postgres(), str(self.bin / tool), *args]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                  cwd=self.root, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"{tool} {' '.join(args)} took over {timeout:.0f} s") from exc
        if proc.returncode != 0:
            raise BenchError(f"{tool} {' '.join(args)} failed ({proc.returncode}): "
                             f"{(proc.stdout + proc.stderr).strip()[-1500:]}")
        return proc.stdout

    def conninfo(self, node: Node, dbname: str = "postgres") -> dict[str, Any]:
        return dict(host="127.0.0.1", port=node.port, user="postgres", dbname=dbname,
                    connect_timeout=3)

    def sql(self, node: Node, query: str, *params, dbname: str = "postgres") -> list[tuple]:
        import psycopg

        with psycopg.connect(**self.conninfo(node, dbname), autocommit=True) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description else []

    # --- the hosts list hadash connects with -------------------------------------------------
    def hosts(self) -> str:
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def url(self, dbname: str) -> str:
        return (f"postgres://postgres@{self.hosts()}/{dbname}"
                "?target_session_attrs=read-write&connect_timeout=3")

    def multi_conninfo(self, dbname: str) -> dict[str, Any]:
        return dict(host=",".join("127.0.0.1" for _ in self.nodes),
                    port=",".join(str(n.port) for n in self.nodes), user="postgres",
                    dbname=dbname, connect_timeout=3, target_session_attrs="read-write")

    # --- set-up --------------------------------------------------------------------------------
    def start(self) -> Pair:
        if _as_postgres():
            shutil.chown(self.root, "postgres", "postgres")
        self.nodes = [Node("pg-a", free_port(), self.root / "pg-a"),
                      Node("pg-b", free_port(), self.root / "pg-b")]
        first = self.nodes[0]
        self._run("initdb", "-D", str(first.data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "-E", "UTF8", "--locale=C")
        conf = [
            # TCP only: a socket lock file would name the killed postmaster, which may
            # linger as a zombie and make the new standby on its port refuse to start
            "listen_addresses = '127.0.0.1'", "unix_socket_directories = ''",
            "wal_level = replica", "max_wal_senders = 10", "max_replication_slots = 10",
            "hot_standby = on", "synchronous_commit = on",
            "synchronous_standby_names = '*'", "wal_keep_size = '256MB'",
            "max_connections = 300", "shared_buffers = '64MB'",
            "log_min_messages = warning", "logging_collector = off",
        ]
        with open(first.data / "postgresql.conf", "a") as f:
            f.write("\n# hadash chaos --pg-failovers\n" + "\n".join(conf) + "\n")
        with open(first.data / "pg_hba.conf", "a") as f:
            f.write("host all all 127.0.0.1/32 trust\n"
                    "host replication all 127.0.0.1/32 trust\n")
        self._start(first)
        self.primary = first
        # Alone until its standby is there (made while hadash migrates: see standby())
        self.sql(first, "ALTER SYSTEM SET synchronous_standby_names = ''")
        self.sql(first, "SELECT pg_reload_conf()")
        say(f"PostgreSQL primary {first.name} on {first.port} ({self.bin}); making its "
            f"synchronous standby on {self.nodes[1].port}")
        self._first = threading.Thread(target=self._first_standby, daemon=True,
                                       name="pg-first-standby")
        self._first.start()
        return self

    def _first_standby(self) -> None:
        try:
            self.rebuild_standby()
        except BenchError as exc:
            self._first_error = str(exc)

    def standby_ready(self, timeout: float = 300) -> None:
        """Wait for the first standby (made in the background by :meth:`start`, in
        parallel with the database's set-up) to stream synchronously."""
        self._first.join(timeout)
        if self._first.is_alive() or self._first_error:
            raise BenchError(f"the first standby is not ready: {self._first_error or 'timeout'}")
        say(f"PostgreSQL pair ready: primary {self.primary.name} on {self.primary.port}, "
            f"synchronous standby {self.standby.name} on {self.standby.port}")

    def _start(self, node: Node) -> None:
        log = self.root / f"{node.name}.log"
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(node.data), "-l", str(log),
                  "-o", f"-p {node.port}")

    def _make_standby(self, node: Node) -> float:
        """A fresh standby of the primary at ``node``'s address; seconds it took."""
        t = time.monotonic()
        if node.data.exists():
            shutil.rmtree(node.data)
        self._run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port),
                  "-U", "postgres", "-D", str(node.data), "-X", "stream", "-R",
                  "-c", "fast", "--no-sync", timeout=300)
        with open(node.data / "postgresql.auto.conf", "a") as f:
            f.write(f"port = {node.port}\ncluster_name = '{node.name}'\n"
                    f"primary_conninfo = 'host=127.0.0.1 port={self.primary.port} "
                    f"user=postgres application_name={node.name}'\n")
        self._start(node)
        self.standby = node
        return time.monotonic() - t

    def replication(self) -> list[dict]:
        rows = self.sql(self.primary, "SELECT application_name, state, sync_state, "
                        "pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn) "
                        "FROM pg_stat_replication")
        return [{"standby": r[0], "state": r[1], "sync_state": r[2],
                 "flush_lag_bytes": int(r[3]) if r[3] is not None else None} for r in rows]

    def wait_sync(self, timeout: float) -> float:
        """Until the standby streams from the primary as the synchronous standby."""
        t = time.monotonic()
        last: Any = None
        while time.monotonic() - t < timeout:
            try:
                last = self.replication()
                if any(r["sync_state"] == "sync" and r["state"] == "streaming" for r in last):
                    return time.monotonic() - t
            except Exception as exc:  # noqa: BLE001 — the server is starting: try again
                last = str(exc)
            time.sleep(0.2)
        raise BenchError(f"the standby did not become synchronous within {timeout:.0f} s: "
                         f"{last}")

    # --- a failover -----------------------------------------------------------------------------
    def kill_primary(self) -> dict:
        """SIGKILL the primary's postmaster and every one of its processes at once (as
        its machine losing power would, for hadash's connections: they break)."""
        node = self.primary
        pid = node.postmaster_pid()
        if pid is None:
            raise BenchError(f"{node.name}: no postmaster.pid")
        pids = [pid, *_children(pid)]
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        return {"killed": node.name, "port": node.port, "processes": len(pids)}

    def promote(self) -> float:
        """Promote the standby (pg_ctl promote, waiting until it accepts writes); it
        becomes the primary. In the default (non-strict) mode it then commits alone
        until a new standby is there. Seconds the promotion took."""
        t = time.monotonic()
        node = self.standby
        self._run("pg_ctl", "promote", "-w", "-t", "60", "-D", str(node.data))
        self.primary, self.standby = node, None
        # strict: '*' (postgresql.conf) whatever its copy of postgresql.auto.conf says
        self.sql(node, "ALTER SYSTEM RESET synchronous_standby_names" if self.strict
                 else "ALTER SYSTEM SET synchronous_standby_names = ''")
        self.sql(node, "SELECT pg_reload_conf()")
        self.generation += 1
        return time.monotonic() - t

    def rebuild_standby(self) -> dict:
        """A new standby from the new primary where the old primary was; the primary
        waits for it again (synchronous_standby_names back to '*')."""
        old = next(n for n in self.nodes if n is not self.primary)
        took = self._make_standby(old)
        self.sql(self.primary, "ALTER SYSTEM RESET synchronous_standby_names")
        self.sql(self.primary, "SELECT pg_reload_conf()")
        synced = self.wait_sync(120)
        return {"standby": old.name, "basebackup_s": round(took, 2),
                "sync_after_s": round(synced, 2)}

    def stop(self) -> None:
        for node in self.nodes:
            pid = node.postmaster_pid()
            if pid is not None and _alive(pid):
                with contextlib.suppress(BenchError):
                    self._run("pg_ctl", "stop", "-m", "immediate", "-w", "-t", "30",
                              "-D", str(node.data), timeout=60)
                if _alive(pid):
                    for p in [pid, *_children(pid)]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(p, signal.SIGKILL)

    def describe(self) -> str:
        mode = "strict" if self.strict else "non-strict (Patroni's synchronous_mode)"
        return (f"own PostgreSQL {self.bin.parent.name}: primary + synchronous standby "
                f"({mode}), synchronous_commit=on, ports {self.hosts()}")


class HaDatabase(BenchDatabase):
    """The chaos run's database on a :class:`Pair`: ``url`` is the multi-host URL
    hadash uses; ``conninfo`` reaches whichever server is the primary now."""

    def __init__(self, pair: Pair):
        super().__init__(server=f"postgres://postgres@127.0.0.1:{pair.primary.port}")
        self.pair = pair

    def conninfo(self, dbname: str | None = None) -> dict[str, Any]:
        return self.pair.multi_conninfo(dbname or "postgres")

    def create(self) -> HaDatabase:
        self.name = f"hadash_bench_{uuid.uuid4().hex[:8]}"
        self.pair.sql(self.pair.primary, f'CREATE DATABASE "{self.name}"')
        self.url = self.pair.url(self.name)
        return self

    def drop(self) -> None:
        self.name = ""  # the whole pair goes with its directory

    def server_version(self) -> str:
        import psycopg

        with psycopg.connect(**self.conninfo()) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
        return f"PostgreSQL {version.split()[0]} — {self.pair.describe()}"


@contextmanager
def ha_database(o: dict[str, Any]) -> Iterator[tuple[HaDatabase, Path]]:
    """A :class:`Pair` with a fresh database on it and a temporary directory for the
    run, like :func:`bench.common.throwaway_database`; everything goes at the end."""
    pg_bin, why = find_pg_bin()
    if pg_bin is None:
        raise BenchError(why)
    with tempfile.TemporaryDirectory(prefix="hadash-pgha-") as root, \
            tempfile.TemporaryDirectory(prefix="hadash-bench-") as tmp:
        pair = Pair(Path(root), pg_bin, strict=bool(o.get("pg_strict")))
        try:
            pair.start()
            db = HaDatabase(pair).create()
            say(f"database {db.name} on {pair.hosts()} (target_session_attrs=read-write)")
            yield db, Path(tmp)
        finally:
            pair.stop()
            say("stopped the PostgreSQL pair")


class Canary:
    """A plain client committing a row every ``every`` s through the multi-host URL
    (as hadash does, and reconnecting the same way); remembers every id whose commit
    the server acknowledged, and the longest stretch without an acknowledged commit."""

    def __init__(self, db: HaDatabase, every: float = 0.05):
        self.db, self.every = db, every
        self.acked: list[int] = []
        self.failures = 0
        self.last_ok = 0.0
        self.gaps: list[tuple[float, float]] = []  # (from, to) POSIX, over 0.25 s
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        import psycopg

        with psycopg.connect(**db.conninfo(db.name), autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS chaos_canary "
                         "(id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT now())")
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos-canary")

    def start(self) -> Canary:
        self.last_ok = time.time()
        self.thread.start()
        return self

    def _run(self) -> None:
        import psycopg

        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(**self.db.conninfo(self.db.name), autocommit=True)
                (i,) = conn.execute("INSERT INTO chaos_canary DEFAULT VALUES RETURNING id"
                                    ).fetchone()
                now = time.time()
                with self.lock:
                    self.acked.append(i)
                    if now - self.last_ok > 0.25:
                        self.gaps.append((self.last_ok, now))
                    self.last_ok = now
            except psycopg.Error:
                with self.lock:
                    self.failures += 1
                if conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        conn.close()
                conn = None
                self.stopping.wait(0.1)
                continue
            self.stopping.wait(self.every)
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                conn.close()

    def missing(self) -> list[int]:
        """Acknowledged ids not on the primary now (none, if no acknowledged commit
        was lost)."""
        import psycopg

        with self.lock:
            acked = list(self.acked)
        with psycopg.connect(**self.db.conninfo(self.db.name), autocommit=True) as conn:
            have = {r[0] for r in conn.execute("SELECT id FROM chaos_canary").fetchall()}
        return [i for i in acked if i not in have]

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)
