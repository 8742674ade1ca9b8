"""What every benchmark needs: a throw-away database, subprocesses, CPU accounting,
the machine's description, percentiles and plain-text tables."""

from __future__ import annotations

import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hadash.supervisor import ROOT

DEFAULT_PG = os.environ.get("HADASH_BENCH_PG", "postgres://postgres@127.0.0.1:5432")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A benchmark could not run (set-up failed, a wait timed out); the message says why."""


def say(msg: str = "") -> None:
    """Progress on stderr, so ``--json`` output on stdout stays machine-readable."""
    print(f"bench: {msg}" if msg else "", file=sys.stderr, flush=True)


# --- the database ------------------------------------------------------------------------

@dataclass
class BenchDatabase:
    """A fresh database for one benchmark: PostgreSQL (``hadash_bench_<random>`` on
    ``server``, dropped with FORCE at the end) or, only when allowed, an SQLite file."""

    server: str = DEFAULT_PG
    allow_sqlite: bool = False
    url: str = ""
    name: str = ""
    vendor: str = ""
    _tmp: tempfile.TemporaryDirectory | None = None

    def __post_init__(self) -> None:
        server = self.server.strip()
        if server.startswith("sqlite"):
            if not self.allow_sqlite:
                raise BenchError(
                    "benchmarks run on PostgreSQL (what production runs); pass "
                    "--allow-sqlite to measure the SQLite default anyway"
                )
            self.vendor = "sqlite"
        elif server.startswith(("postgres://", "postgresql://")):
            self.vendor = "postgresql"
        else:
            raise BenchError(f"--database {server!r}: expected postgres://… or sqlite://…")

    # PostgreSQL connection parameters of the server's maintenance database
    def conninfo(self, dbname: str | None = None) -> dict[str, Any]:
        import dj_database_url

        base = self.server.rstrip("/")
        if base.count("/") > 2:  # a database name was given: keep only the server part
            base = base.rsplit("/", 1)[0]
        cfg = dj_database_url.parse(f"{base}/{dbname or 'postgres'}")
        return dict(host=cfg["HOST"] or "127.0.0.1", port=int(cfg["PORT"] or 5432),
                    user=cfg["USER"] or "postgres", password=cfg["PASSWORD"] or None,
                    dbname=cfg["NAME"], connect_timeout=5)

    def create(self) -> BenchDatabase:
        if self.vendor == "sqlite":
            self._tmp = tempfile.TemporaryDirectory(prefix="hadash-bench-")
            self.name = str(Path(self._tmp.name) / "bench.sqlite3")
            self.url = f"sqlite:///{self.name}"
            return self
        import psycopg

        self.name = f"hadash_bench_{uuid.uuid4().hex[:8]}"
        try:
            with psycopg.connect(**self.conninfo(), autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{self.name}"')
        except psycopg.Error as exc:
            raise BenchError(f"cannot create a database on {self.server}: {exc}") from exc
        base = self.server.rstrip("/")
        if base.count("/") > 2:
            base = base.rsplit("/", 1)[0]
        self.url = f"{base}/{self.name}"
        return self

    def drop(self) -> None:
        if self.vendor == "sqlite":
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
            return
        if not self.name:
            return
        import psycopg

        try:
            with psycopg.connect(**self.conninfo(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        except psycopg.Error as exc:
            say(f"could not drop database {self.name}: {exc}")
        self.name = ""

    def server_version(self) -> str:
        if self.vendor == "sqlite":
            import sqlite3

            return f"SQLite {sqlite3.sqlite_version}"
        import psycopg

        with psycopg.connect(**self.conninfo()) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            sync = conn.execute("SHOW synchronous_commit").fetchone()[0]
            buffers = conn.execute("SHOW shared_buffers").fetchone()[0]
        return (f"PostgreSQL {version.split()[0]} (synchronous_commit={sync}, "
                f"shared_buffers={buffers})")

    def __enter__(self) -> BenchDatabase:
        return self.create()

    def __exit__(self, *exc) -> None:
        self.drop()


@contextmanager
def throwaway_database(o: dict[str, Any], note: str = ""):
    """A fresh database (``--database``, ``--allow-sqlite``) and a temporary directory
    for one measurement: ``(db, path)``. Both go at the end, also on an error."""
    db = BenchDatabase(o["database"], o["allow_sqlite"])
    with tempfile.TemporaryDirectory(prefix="hadash-bench-") as tmp:
        db.create()
        say(f"database {db.name} ({db.vendor}){note}")
        try:
            yield db, Path(tmp)
        finally:
            db.drop()
            say(f"dropped {db.name or 'the database'}")


# --- subprocesses ------------------------------------------------------------------------

def bench_env(db_url: str, var_dir: str, **extra: str) -> dict[str, str]:
    """The environment of every process of a benchmark run. DEBUG is off whatever the
    caller's (as in production: with it on, Django keeps every query's SQL, which
    costs each process time per query); the secrets come from the environment or
    var/secrets.env (scripts/setup)."""
    env = {**os.environ, "DATABASE_URL": db_url, "HADASH_VAR_DIR": var_dir,
           "HADASH_LOG": os.environ.get("HADASH_BENCH_LOG", "WARNING")}
    env.pop("CI", None)
    env.pop("DEBUG", None)
    # The children's HADASH_VAR_DIR is a temporary one, without var/secrets.env: they
    # take this process's secrets (with DEBUG off they refuse development values, R30).
    from django.conf import settings

    for name in ("SECRET_KEY", "HADASH_AGENT_KEY", "HADASH_FLEET_TOKEN",
                 "HADASH_METRICS_TOKEN"):
        if not env.get(name) and getattr(settings, name, ""):
            env[name] = getattr(settings, name)
    env.update(extra)
    return env


def run_python(env: dict[str, str], *args: str, timeout: float = 600,
               label: str = "") -> str:
    """Run ``python ARGS`` (e.g. ``-m bench.seed …``) from the project root to
    completion in ``env``; its stdout. Fails loudly, naming it ``label``."""
    label = label or f"python {' '.join(args)}"
    try:
        proc = subprocess.run([sys.executable, *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"{label} took more than {timeout:.0f} s") from exc
    if proc.returncode != 0:
        raise BenchError(f"{label} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def manage(env: dict[str, str], *args: str, timeout: float = 600) -> str:
    """Run ``manage.py ARGS`` to completion in ``env``; its stdout. Fails loudly."""
    return run_python(env, str(ROOT / "manage.py"), *args, timeout=timeout,
                      label=f"manage.py {' '.join(args)}")


@contextmanager
def interruptible():
    """SIGTERM behaves like Ctrl-C (KeyboardInterrupt), so every ``finally`` runs:
    processes are stopped and the database dropped."""

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_until(what: str, cond: Callable[[], Any], timeout: float, every: float = 0.5,
               progress: Callable[[], str] | None = None, progress_every: float = 5.0,
               alive: Callable[[], None] | None = None) -> Any:
    """Poll ``cond`` until it returns something true; BenchError after ``timeout``.
    ``progress`` is printed every ``progress_every`` s; ``alive`` raises if a process
    the wait depends on died."""
    start = time.monotonic()
    deadline = start + timeout
    shown = start
    last: Any = None
    while True:
        if alive is not None:
            alive()
        try:
            last = cond()
        except Exception as exc:  # noqa: BLE001 - a transient failure of the probe
            last = exc
        else:
            if last and not isinstance(last, Exception):
                return last
        now = time.monotonic()
        if now >= deadline:
            raise BenchError(f"timed out after {timeout:.0f} s waiting for {what} "
                             f"(last: {last!r})"[:2000])
        if progress is not None and now - shown >= progress_every:
            shown = now
            try:
                said = progress()
            except Exception as exc:  # noqa: BLE001 - a slow answer is no reason to stop
                said = f"(no answer: {exc!r})"[:300]
            say(f"  … {what}: {said} ({now - start:.0f} s)")
        time.sleep(every)


# --- CPU accounting ------------------------------------------------------------------------

def _proc_stats() -> Iterable[tuple[int, str, int, float, float]]:
    """(pid, comm, process group, own cpu seconds, reaped children's cpu seconds) of
    every process we can read."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        lpar, rpar = raw.find("("), raw.rfind(")")
        comm = raw[lpar + 1:rpar]
        rest = raw[rpar + 2:].split()
        try:
            pgrp = int(rest[2])
            own = int(rest[11]) + int(rest[12])  # utime + stime
            children = int(rest[13]) + int(rest[14])  # cutime + cstime (reaped children)
        except (IndexError, ValueError):
            continue
        yield int(entry.name), comm, pgrp, own / CLK_TCK, children / CLK_TCK


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        parts = [float(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0.0)
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


def _pg_database(pid: int) -> str | None:
    """The database a PostgreSQL backend serves (from its process title), or None for
    the postmaster and auxiliary processes (WAL writer, checkpointer, …)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    # "postgres: 15/main: USER DATABASE HOST(PORT) STATE"
    parts = title.split(": ", 2)
    words = parts[-1].split() if len(parts) == 3 else []
    if len(words) >= 3 and "(" in words[2]:
        return words[1]
    return None


@dataclass
class CpuMeter:
    """CPU seconds used between :meth:`start` and :meth:`stop` by named process groups
    (with their reaped children) and by PostgreSQL, plus the whole machine. PostgreSQL
    is the live backends of ``pg_database`` (all backends when it is empty) and its
    auxiliary processes (WAL writer, checkpointer, …). A backend that exits within the
    window (one connection per HTTP request) is not seen: its CPU lands in "other"
    (the postmaster's reaped-children counter cannot tell our backends from those of
    other clients of a shared server)."""

    groups: dict[str, list[int]] = field(default_factory=dict)  # label → process groups
    pg_database: str = ""
    _t0: float = 0.0
    _before: dict[str, float] = field(default_factory=dict)
    _machine0: tuple[float, float] = (0.0, 0.0)
    result: dict[str, float] = field(default_factory=dict)

    def _sample(self) -> dict[str, float]:
        by_label = {label: 0.0 for label in self.groups} | {"postgres": 0.0}
        owner = {g: label for label, gs in self.groups.items() for g in gs}
        for pid, comm, pgrp, own, children in _proc_stats():
            if pgrp in owner:
                by_label[owner[pgrp]] += own + children
            elif comm.startswith("postgres"):
                db = _pg_database(pid) if self.pg_database else None
                if db is None or db == self.pg_database:
                    by_label["postgres"] += own
        return by_label

    def start(self) -> None:
        self._before = self._sample()
        self._machine0 = machine_busy()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Per label: CPU used as a share of one core (1.0 = one core busy)."""
        wall = max(time.monotonic() - self._t0, 1e-6)
        after = self._sample()
        busy1, total1 = machine_busy()
        # max(0, …): a backend that exited within the window takes its CPU with it
        self.result = {k: round(max(0.0, after[k] - self._before.get(k, 0.0)) / wall, 3)
                       for k in after}
        cores = os.cpu_count() or 1
        dt_total = max(total1 - self._machine0[1], 1e-6)
        machine = (busy1 - self._machine0[0]) / dt_total * cores
        self.result["machine"] = round(machine, 3)
        # Everything else on the machine (other users' processes, the kernel's work
        # not charged to a process): shared machines are noisy, this shows how much.
        self.result["other"] = round(max(0.0, machine - sum(
            v for k, v in self.result.items() if k != "machine")), 3)
        return self.result


# --- memory ------------------------------------------------------------------------------------

def _status_kb(pid: int, *fields: str) -> dict[str, int]:
    """Fields of /proc/<pid>/status given in kB (VmHWM, VmRSS …); {} when gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[key] = int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _pss_kb(pid: int) -> int:
    """The process's proportional set size (shared pages split among their users)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def group_memory(pgid: int) -> dict[str, Any]:
    """Memory of the live processes of a process group (a supervised child and its own
    children, e.g. qcluster's sentinel, monitor and workers), in MB:

    * ``peak_rss_mb`` — the sum of each process's peak RSS (``VmHWM``): what the group
      needed at most if every process peaked at once (an upper bound; pages shared by
      forked processes count once per process). A process that already exited
      (a recycled django-q worker) is not counted;
    * ``rss_mb`` — the sum of the current RSS (``VmRSS``), same caveat;
    * ``pss_mb`` — the current proportional set size: shared pages counted once;
    * ``peak_rss_max_mb`` — the largest single process's peak, ``processes`` how many.
    """
    from hadash.supervisor import live_members

    peak = rss = pss = biggest = 0
    pids = live_members(pgid)
    n = 0
    for pid in pids:
        kb = _status_kb(pid, "VmHWM", "VmRSS")
        if not kb:
            continue
        n += 1
        peak += kb.get("VmHWM", 0)
        rss += kb.get("VmRSS", 0)
        biggest = max(biggest, kb.get("VmHWM", 0))
        pss += _pss_kb(pid)
    return {"peak_rss_mb": round(peak / 1024, 1), "rss_mb": round(rss / 1024, 1),
            "pss_mb": round(pss / 1024, 1), "peak_rss_max_mb": round(biggest / 1024, 1),
            "processes": n}


def memory_table(memory: dict[str, dict[str, Any]]) -> str:
    """The processes' memory (System.memory) as a table."""
    rows = [[name, m["processes"], fmt(m["peak_rss_mb"]), fmt(m["peak_rss_max_mb"]),
             fmt(m["rss_mb"]), fmt(m["pss_mb"])] for name, m in memory.items()]
    return table(["process (group)", "processes", "peak RSS MB (Σ VmHWM)",
                  "largest process peak MB", "RSS now MB", "PSS now MB"], rows)


# --- numbers --------------------------------------------------------------------------------

def percentile(values: Sequence[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))  # nearest rank
    return s[k]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


# --- the machine ----------------------------------------------------------------------------

def machine_info(db: BenchDatabase | None = None) -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_gb = round(int(line.split()[1]) / 2**20, 1)
                    break
    except OSError:
        pass
    import django

    info = {
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "database": db.server_version() if db is not None else "",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return info


def machine_line(info: dict[str, Any]) -> str:
    return (f"{info['nproc']} CPU(s) {info['cpu']}, {info['memory_gb']} GB RAM, Linux "
            f"{info['kernel']}, Python {info['python']}, Django {info['django']}, "
            f"{info['database']}")


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)
