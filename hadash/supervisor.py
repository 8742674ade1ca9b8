"""Run several processes as one system (the demo, end-to-end tests, benchmarks).

Each child runs in its own process group with its output prefixed by its name (or, with
``log_dir``, written to ``<log_dir>/<name>.log`` instead, counted per child). Stop
is SIGTERM to every group, a bounded grace period, then SIGKILL to whatever is left:
django-q2's qcluster is known to hang on SIGTERM (MEASUREMENTS.md, django-q2 #346),
and nothing in hadash depends on a clean exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLOURS = ["36", "33", "35", "32", "34", "31"]


# daphne refuses websocket messages over 1 MiB by closing the socket (1009) before the
# application sees them; the agent protocol allows 4 MiB reports and answers a larger
# one with an error message (issue 8 part 4), so daphne's own cap sits above that.
WEBSOCKET_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def daphne_argv(port: int, host: str = "127.0.0.1") -> list[str]:
    """``python`` arguments that serve hadash with daphne on host:port."""
    return ["-m", "daphne", "-b", host, "-p", str(port),
            "--websocket-max-message-size", str(WEBSOCKET_MAX_MESSAGE_BYTES),
            "--websocket-max-frame-size", str(WEBSOCKET_MAX_MESSAGE_BYTES),
            "hadash.asgi:application"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_for(what: str, cond, timeout: float, every: float = 0.5):
    """Until ``cond()`` is true (HTTP errors count as not yet); its value. TimeoutError
    after ``timeout`` seconds, naming ``what`` and the last value seen."""
    import httpx

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
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0,
                  proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on "
                               f"{host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f} s")


def live_members(pgid: int) -> list[int]:
    """Processes of a process group that are still running (zombies don't count:
    a container's init may never reap them, but they are dead)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp …  — comm may contain spaces: split after ')'
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log: list[str] = field(default_factory=list)
    # Counted since the last take_counts() (the demo's summary line).
    lines: int = 0
    warnings: int = 0
    errors: int = 0
    last_problem: str = ""
    log_path: Path | None = None


class Supervisor:
    def __init__(self, *, echo: bool = True, grace: float = 10.0, cwd: Path = ROOT,
                 base_env: dict[str, str] | None = None, log_dir: Path | None = None):
        self.children: list[Child] = []
        self.echo = echo
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.grace = grace
        self.cwd = cwd
        self.base_env = dict(os.environ if base_env is None else base_env)
        self._out_lock = threading.Lock()

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name=name, argv=argv, env=env or {})
        full_env = {**self.base_env, **child.env, "PYTHONUNBUFFERED": "1"}
        child.proc = subprocess.Popen(
            argv, cwd=self.cwd, env=full_env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # its own process group: we can kill all of it
        )
        colour = COLOURS[len(self.children) % len(COLOURS)]
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            child.log_path = self.log_dir / f"{name}.log"
        threading.Thread(target=self._pump, args=(child, colour), daemon=True).start()
        self.children.append(child)
        return child

    def _pump(self, child: Child, colour: str) -> None:
        width = max(8, max((len(c.name) for c in self.children), default=8))
        out = child.log_path.open("a", buffering=1) if child.log_path else None
        try:
            self._copy(child, colour, width, out)
        finally:
            if out is not None:
                out.close()

    def _copy(self, child: Child, colour: str, width: int, out) -> None:
        for line in child.proc.stdout:
            line = line.rstrip("\n")
            child.log.append(line)
            if len(child.log) > 2000:
                del child.log[:1000]
            with self._out_lock:
                child.lines += 1
                if " ERROR " in line or line.startswith("Traceback"):
                    child.errors += 1
                    child.last_problem = line
                elif " WARNING " in line:
                    child.warnings += 1
                    child.last_problem = child.last_problem or line
            if out is not None:
                out.write(line + "\n")
                continue
            if self.echo:
                with self._out_lock:
                    tty = sys.stdout.isatty()
                    prefix = f"{child.name:<{width}} |"
                    if tty:
                        prefix = f"\033[{colour}m{prefix}\033[0m"
                    print(f"{prefix} {line}", flush=True)

    def take_counts(self) -> list[tuple[str, int, int, int, str]]:
        """(name, lines, warnings, errors, last error or warning) per child since the
        last call, and start counting afresh."""
        out = []
        with self._out_lock:
            for c in self.children:
                out.append((c.name, c.lines, c.warnings, c.errors, c.last_problem))
                c.lines = c.warnings = c.errors = 0
                c.last_problem = ""
        return out

    def python(self, name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        return self.start(name, [sys.executable, *args], env)

    def manage(self, name: str, *args: str, env: dict[str, str] | None = None) -> Child:
        return self.python(name, str(ROOT / "manage.py"), *args, env=env)

    def first_exited(self) -> Child | None:
        for c in self.children:
            if c.proc and c.proc.poll() is not None:
                return c
        return None

    def stop(self, grace: float | None = None) -> dict[str, int | None]:
        """SIGTERM every process group, wait up to ``grace`` s, SIGKILL the rest.
        Returns each child's exit code (None if it had to be killed and did not
        report one)."""
        grace = self.grace if grace is None else grace
        for c in reversed(self.children):
            self._signal(c, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in self.children:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for c in self.children:
            # The group may hold children of the child (qcluster's workers) even when
            # the leader is gone: kill the whole group regardless.
            self._signal(c, signal.SIGKILL)
            try:
                c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.leftovers():
            time.sleep(0.05)
        return {c.name: c.proc.returncode for c in self.children}

    def leftovers(self) -> list[int]:
        """Pids still running in any child's process group (should be none after
        stop())."""
        return [pid for c in self.children if c.proc for pid in live_members(c.proc.pid)]

    @staticmethod
    def _signal(c: Child, sig: int) -> None:
        if c.proc is None:
            return
        try:
            os.killpg(c.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
