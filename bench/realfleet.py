"""The real fleet (issue 9 part 4): three "hosts" on this machine, each a network
namespace with its own address, its own libvirtd running tiny diskless qemu guests, its
own hadash-agent, and a Redfish BMC whose ForceOff is a real power loss.

A host, as built here::

    root namespace                         network namespace hdrf-hN
    bridge hdrf-br0 10.213.0.1/24  ──veth──  eth0 10.213.0.1N/24
      ├ daphne (hadash) on 10.213.0.1        ├ "init": holds the host's mount + UTS namespace
      ├ django-q engine                      │   (hostname hdrf-hN; /etc/libvirt, /run/libvirt,
      ├ the BMCs (Redfish) on 127.0.0.1      │   /var/lib/libvirt, /var/cache/libvirt,
      └ this test process                    │   /var/log/libvirt, /etc/hosts, /etc/passwd
                                             │   bind-mounted from the host's own directory)
                                             ├ libvirtd --listen (qemu:///system; qemu+tcp
                                             │   on 10.213.0.1N for peer-to-peer migration)
                                             ├ qemu-system-x86_64 guests (TCG, 64 MiB, no disk)
                                             └ hadash-agent on 10.213.0.1N:8250

Traffic stays on this machine: only the namespaces' own addresses and loopback are ever
used. Everything of a host runs inside its network namespace, so a power loss (the BMC's
ForceOff) is: its link goes dark and every process in the namespace is killed with
SIGKILL — agent, libvirtd and guests. "On" boots it again: a fresh /run, libvirtd (whose
persistent domain definitions survive, like /etc/libvirt on a disk), then the agent (its
credentials survive in its state directory).

Needs root on Linux with iproute2, util-linux (unshare, nsenter), libvirtd and the qemu
driver, virsh, qemu-system-x86_64 and libvirt-python; ``requirements_problem()`` says
what is missing. Every name this module creates starts with ``hdrf-``; ``sweep()``
removes leftovers of an earlier run that died (under the lock ``fleet_lock()``).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from hadash.supervisor import ROOT, Supervisor, wait_for, wait_for_port

PREFIX = "hdrf-"
BRIDGE = "hdrf-br0"
SUBNET = "10.213.0"  # /24; the bridge (hadash's side) is .1, host N is .1N
SERVER_IP = f"{SUBNET}.1"
AGENT_PORT = 8250
AGENT_DIR = ROOT / "agent"
NETNS_DIR = Path("/run/netns")

# The directories a privileged libvirtd uses; each host gets its own, bind-mounted over
# these in its mount namespace. The empty mount points are created if missing (Debian's
# libvirt-daemon-system would create them; we install only libvirt-daemon).
LIBVIRT_DIRS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
                "cache": "/var/cache/libvirt", "log": "/var/log/libvirt"}

TOOLS = {  # command → Debian package
    "ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux",
    "libvirtd": "libvirt-daemon (+ libvirt-daemon-driver-qemu)", "virsh": "libvirt-clients",
    "qemu-system-x86_64": "qemu-system-x86",
}
QEMU_DRIVER_GLOB = "/usr/lib/*/libvirt/connection-driver/libvirt_driver_qemu.so"
# libvirtd and ip live in sbin, which a non-login root's PATH may lack.
PATH = os.pathsep.join(dict.fromkeys(
    [*os.environ.get("PATH", "").split(os.pathsep), "/usr/local/sbin", "/usr/sbin", "/sbin",
     "/usr/bin", "/bin"]))


def log(message: str) -> None:
    if os.environ.get("HADASH_E2E_ECHO"):
        print(f"realfleet | {message}", flush=True)


def run(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": PATH})
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).strip()}")
    return proc


# --- what this tier needs ------------------------------------------------------------------


def is_debian() -> bool:
    return Path("/etc/debian_version").exists() and shutil.which("apt-get") is not None


def requirements_problem() -> str | None:
    """Why this machine cannot run the real fleet (None: it can, as far as we can tell
    without creating anything)."""
    if not sys.platform.startswith("linux"):
        return "needs Linux (network namespaces, libvirtd, qemu)"
    if os.geteuid() != 0:
        return "needs root (network namespaces, a privileged libvirtd per host)"
    missing = sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool, path=PATH) is None}
                     | (set() if glob.glob(QEMU_DRIVER_GLOB) else {"libvirt-daemon-driver-qemu"}))
    try:
        import libvirt  # noqa: F401
    except ImportError:
        missing.append("libvirt-python (pip; needs libvirt-dev pkg-config gcc)")
    if missing:
        return ("missing " + ", ".join(missing) + ": run scripts/setup as root on Debian "
                "(apt-get install libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 "
                "libvirt-clients)")
    return None


@contextlib.contextmanager
def fleet_lock(timeout: float = 900.0):
    """One real fleet per machine at a time (the names and the subnet are fixed)."""
    directory = Path("/run/lock") if Path("/run/lock").is_dir() else Path("/tmp")
    path = directory / "hadash-realfleet.lock"
    with open(path, "w") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another real-fleet run holds {path} for more than "
                                       f"{timeout:.0f} s") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def netns_pids(ns: str) -> list[int]:
    proc = run("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_netns(ns: str, timeout: float = 10.0, keep_status: frozenset[int] = frozenset()
               ) -> None:
    """SIGKILL every process in network namespace ``ns`` until none is left (those we
    are the parent of are reaped, except ``keep_status``: Popen objects wait for
    those)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = netns_pids(ns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        reap(p for p in pids if p not in keep_status)
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in {ns} survive SIGKILL")
        time.sleep(0.05)


def reap(pids) -> None:
    """Collect the exit status of those of ``pids`` that are our children (qemu is
    daemonised by libvirtd and re-parented to us: see ``become_subreaper``)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def become_subreaper(on: bool = True) -> None:
    """Orphans of our children — the qemu processes libvirtd daemonises — become our
    children instead of the container's init's, which may never reap them. libvirtd
    waits for a qemu it killed to be gone, and a zombie is not gone: without a reaper
    every destroy (and the capabilities probe) stalls for ~40 s. See ``Reaper``."""
    PR_SET_CHILD_SUBREAPER = 36
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


class Reaper:
    """Reaps our zombie children that are qemu processes (re-parented to us as a
    subreaper), every 0.1 s. Only qemu: every other child of this process belongs to a
    Popen object, which must collect its own exit status."""

    def __init__(self):
        self.reaped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="realfleet-reaper",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.reap_once()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.reap_once()

    def reap_once(self) -> None:
        # Cheap first: peek (WNOWAIT: nothing is collected) at a zombie child.
        while True:
            try:
                info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return  # no children at all
            if info is None:
                return  # no zombie child
            if not self._is_qemu(info.si_pid):
                break  # a Popen's child, not ours to collect: it may hide others
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(info.si_pid, os.WNOHANG)
                self.reaped += 1
        self._scan()

    @staticmethod
    def _is_qemu(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            return False
        return stat[stat.find("(") + 1:stat.rfind(")")].startswith("qemu-system")

    def _scan(self) -> None:
        me = os.getpid()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            comm = stat[stat.find("(") + 1:stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2:].split()
            if fields[0] == "Z" and int(fields[1]) == me and comm.startswith("qemu-system"):
                with contextlib.suppress(ChildProcessError, OSError):
                    os.waitpid(int(entry.name), os.WNOHANG)
                    self.reaped += 1


def sweep() -> list[str]:
    """Remove what an earlier run left behind (namespaces and links named hdrf-*, with
    every process in those namespaces). Call with ``fleet_lock()`` held. Returns what
    was removed."""
    removed = []
    for line in run("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.split() else ""
        if ns.startswith(PREFIX):
            kill_netns(ns)
            run("ip", "netns", "del", ns, check=False)
            removed.append(f"netns {ns}")
    for line in run("ip", "-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)", line)
        if m and m.group(1).startswith(PREFIX):
            run("ip", "link", "del", m.group(1), check=False)
            removed.append(f"link {m.group(1)}")
    return removed


def subnet_problem() -> str | None:
    """The fleet's subnet must not already be routed on this machine."""
    out = run("ip", "-o", "-4", "addr", "show", check=False).stdout
    for line in out.splitlines():
        if f" {SUBNET}." in line and PREFIX not in line:
            return f"{SUBNET}.0/24 is already in use on this machine: {line.strip()}"
    return None


# --- guests ------------------------------------------------------------------------------


@dataclass
class Guest:
    """A tiny diskless qemu guest. TCG (no KVM needed), 64 MiB, one vCPU, no disk, no
    NIC, no USB, no balloon, no display: SeaBIOS finds nothing to boot and, with
    rebootTimeout -1, halts instead of rebooting, so the guest costs ~0 % of a core."""

    name: str
    home: str  # the host it starts on
    ha: bool = True
    priority: str = "medium"
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    def xml(self) -> str:
        return (
            f"<domain type='qemu'><name>{self.name}</name><uuid>{self.uuid}</uuid>"
            "<memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/>"
            "<bios rebootTimeout='-1'/></os>"
            "<on_poweroff>destroy</on_poweroff><on_reboot>restart</on_reboot>"
            "<on_crash>destroy</on_crash>"
            "<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>"
            "<controller type='usb' model='none'/><memballoon model='none'/></devices>"
            "</domain>"
        )


# --- one host --------------------------------------------------------------------------------


LIBVIRTD_CONF = """\
# hadash real-fleet host {name}: a privileged libvirtd of its own.
listen_tls = 0
listen_tcp = 1
listen_addr = "{ip}"
auth_tcp = "none"
auth_unix_rw = "none"
unix_sock_rw_perms = "0700"
host_uuid = "{host_uuid}"
log_outputs = "3:stderr"
"""

# The guests run as root without cgroups, sVirt or a private /dev: this machine may be
# a container. migration_host/address: the incoming migration stream is on our address.
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
migration_host = "{ip}"
migration_address = "{ip}"
"""

# Run in the host's network namespace by ``ip netns exec … unshare --mount --uts``:
# set the host up, then stay as its "init" (the holder of its mount namespace).
INIT_SCRIPT = """\
set -e
echo {name} > /proc/sys/kernel/hostname
mount --bind {d}/etc /etc/libvirt
mount --bind {d}/run /run/libvirt
mount --bind {d}/lib /var/lib/libvirt
mount --bind {d}/cache /var/cache/libvirt
mount --bind {d}/log /var/log/libvirt
mount --bind {d}/hosts /etc/hosts
mount --bind {d}/passwd /etc/passwd
mount --bind {d}/group /etc/group
ip link set lo up
echo "host {name} booted"
exec sleep infinity
"""


class Host:
    def __init__(self, fleet: Fleet, index: int):
        self.fleet = fleet
        self.index = index
        self.name = f"{PREFIX}h{index}"  # host name in hadash, netns, hostname, root veth
        self.ns = self.name
        self.ip = f"{SUBNET}.{10 + index}"
        self.dir = fleet.base / self.name
        self.socket = self.dir / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.socket}"
        self.agent_url = f"http://{self.ip}:{AGENT_PORT}"
        self.powered = False
        self.link_up = False
        self.init = self.libvirtd = self.agent = None
        self.netns_inode = 0
        self._lock = threading.RLock()

    # --- hardware -----------------------------------------------------------------
    def build(self) -> None:
        """The namespace, its link to the bridge and the host's directories."""
        run("ip", "netns", "add", self.ns)
        self.netns_inode = os.stat(NETNS_DIR / self.ns).st_ino
        run("ip", "link", "add", self.name, "type", "veth", "peer", "name", "eth0",
            "netns", self.ns)
        run("ip", "link", "set", self.name, "master", BRIDGE)
        run("ip", "-n", self.ns, "addr", "add", f"{self.ip}/24", "dev", "eth0")
        run("ip", "-n", self.ns, "link", "set", "eth0", "up")
        run("ip", "-n", self.ns, "link", "set", "lo", "up")
        for sub in LIBVIRT_DIRS:
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "agent").mkdir(mode=0o700, exist_ok=True)
        (self.dir / "agent.toml").write_text("# settings: see the environment\n")
        (self.dir / "etc" / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(
            name=self.name, ip=self.ip,
            host_uuid=f"00000000-0000-4000-8000-{self.index:012d}"))
        (self.dir / "etc" / "qemu.conf").write_text(QEMU_CONF.format(ip=self.ip))
        hosts = "127.0.0.1 localhost\n" + "".join(
            f"{SUBNET}.{10 + i} {PREFIX}h{i}\n" for i in range(1, 10))
        (self.dir / "hosts").write_text(hosts)
        # A privileged libvirtd (9.0) insists that its default qemu user exists, even
        # when qemu.conf names another: give it one, in this host's /etc only.
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        if not re.search(r"^libvirt-qemu:", passwd, re.M):
            passwd += "libvirt-qemu:x:64055:64055:hadash realfleet:/nonexistent:/usr/sbin/nologin\n"
        if not re.search(r"^libvirt-qemu:", group, re.M):
            group += "libvirt-qemu:x:64055:\n"
        (self.dir / "passwd").write_text(passwd)
        (self.dir / "group").write_text(group)
        self.set_link(True)

    def set_link(self, up: bool) -> None:
        """The host's network cable (the bridge side of its veth)."""
        run("ip", "link", "set", self.name, "up" if up else "down")
        self.link_up = up

    # --- power --------------------------------------------------------------------------
    def power_on(self, timeout: float = 60.0) -> None:
        """Boot: link up, a fresh /run, the host's namespaces, libvirtd, the agent."""
        with self._lock:
            if self.powered:
                return
            sup = self.fleet.sup
            self.powered = True  # what the BMC reports from now on; the OS boots
            self.set_link(True)
            run_dir = self.dir / "run"
            shutil.rmtree(run_dir, ignore_errors=True)  # /run is a tmpfs: lost at power-off
            run_dir.mkdir()
            script = INIT_SCRIPT.format(name=self.name, d=self.dir)
            self.init = sup.start(f"{self.name}-init", [
                "ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts",
                "--propagation", "private", "sh", "-c", script])
            self._wait_log(self.init, f"host {self.name} booted", timeout)
            enter = ["nsenter", f"--target={self.init.proc.pid}", "--mount", "--uts", "--net",
                     "--"]
            self.libvirtd = sup.start(f"{self.name}-libvirtd", [
                *enter, "libvirtd", "--listen", "--config", "/etc/libvirt/libvirtd.conf",
                "--pid-file", "/run/libvirt/libvirtd.pid"])
            self._wait_libvirt(timeout)
            self.agent = sup.start(f"{self.name}-agent", [*enter, sys.executable, "-m",
                                                          "hadash_agent"], self.agent_env())
            wait_for_port(AGENT_PORT, host=self.ip, proc=self.agent.proc, timeout=timeout)
            log(f"{self.name} powered on")

    def power_off(self) -> None:
        """A real power loss: the link goes dark and every process of the host dies at
        once (SIGKILL): its agent, libvirtd and qemu guests."""
        with self._lock:
            self.set_link(False)
            children = [c for c in (self.init, self.libvirtd, self.agent)
                        if c is not None and c.proc is not None]
            kill_netns(self.ns, keep_status=frozenset(c.proc.pid for c in children))
            for child in children:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(timeout=5)
            self.powered = False
            log(f"{self.name} powered off")

    def agent_env(self) -> dict[str, str]:
        fleet = self.fleet
        return {
            "PYTHONPATH": str(AGENT_DIR), "PYTHONUNBUFFERED": "1",
            "HADASH_AGENT_CONFIG": str(self.dir / "agent.toml"),
            "HADASH_AGENT_SERVER_URL": fleet.server_url,
            "HADASH_AGENT_JOIN_KEY": fleet.join_key,
            "HADASH_AGENT_NAME": self.name,
            "HADASH_AGENT_LIBVIRT_URI": "qemu:///system",
            "HADASH_AGENT_LISTEN": f"{self.ip}:{AGENT_PORT}",
            "HADASH_AGENT_STATE_DIR": str(self.dir / "agent"),
            "HADASH_AGENT_MIGRATION_URI": f"qemu+tcp://{self.ip}/system",
            "HADASH_AGENT_MIGRATION_DATA_URI": f"tcp://{self.ip}",
            "HADASH_AGENT_BACKOFF_MAX": "2", "HADASH_AGENT_REFUSED_RETRY": "2",
            "HADASH_AGENT_LOG_LEVEL": "INFO",
        }

    def _wait_log(self, child, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in child.log):
                return
            if child.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{child.name} did not log {text!r}; its output:\n"
                           + "\n".join(child.log[-30:]))

    def _wait_libvirt(self, timeout: float) -> None:
        import libvirt

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.libvirtd.proc.poll() is not None:
                break
            try:
                conn = libvirt.open(self.uri)
                conn.close()
                return
            except libvirt.libvirtError as exc:
                last = str(exc)
            time.sleep(0.1)
        raise RuntimeError(f"libvirtd of {self.name} did not answer ({last}); its output:\n"
                           + "\n".join(self.libvirtd.log[-30:]))

    # --- looking at the host from outside -------------------------------------------
    def virsh(self, *args: str, timeout: float = 20) -> str:
        return run("virsh", "-q", "-c", self.uri, *args, timeout=timeout).stdout

    def running(self) -> set[str] | None:
        """``virsh list --state-running`` on this host (None if its libvirtd does not
        answer, e.g. powered off)."""
        proc = run("virsh", "-q", "-c", self.uri, "list", "--name", "--state-running",
                   check=False, timeout=10)
        if proc.returncode != 0:
            return None
        return {line.strip() for line in proc.stdout.splitlines() if line.strip()}

    def warm_up(self) -> None:
        """Make libvirtd probe qemu's capabilities now (a few seconds of CPU, done once
        per libvirtd: it caches them in /var/cache/libvirt/qemu)."""
        self.virsh("domcapabilities", "--virttype", "qemu", timeout=180)

    def copy_capabilities_to(self, other: Host) -> None:
        """Give ``other`` (not running yet) our probed qemu capabilities: the same
        binaries on the same machine, so the cache is valid there and its libvirtd
        need not probe again."""
        source = self.dir / "cache" / "qemu" / "capabilities"
        if source.is_dir():
            shutil.copytree(source, other.dir / "cache" / "qemu" / "capabilities",
                            dirs_exist_ok=True)

    def define(self, guest: Guest) -> None:
        path = self.dir / f"{guest.name}.xml"
        path.write_text(guest.xml())
        self.virsh("define", str(path), timeout=120)

    def start(self, guest: Guest) -> None:
        self.virsh("start", guest.name, timeout=120)

    def pids(self) -> list[int]:
        return netns_pids(self.ns)


# --- qemu processes ------------------------------------------------------------------------


GUEST_RE = re.compile(rb"guest=([^,\x00]+)")


def qemu_processes(inodes: dict[int, str]) -> dict[str, list[tuple[str, int]]]:
    """Every live qemu process on this machine whose network namespace is one of
    ``inodes`` (netns inode → host name): guest name → [(host, pid)]. Read from /proc,
    independently of libvirt."""
    found: dict[str, list[tuple[str, int]]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"qemu-system" not in cmdline.split(b"\x00", 1)[0]:
                continue
            host = inodes.get(os.stat(f"/proc/{entry.name}/ns/net").st_ino)
        except OSError:
            continue  # gone, or a zombie
        if host is None:
            continue
        m = GUEST_RE.search(cmdline)
        if m:
            found.setdefault(m.group(1).decode(), []).append((host, int(entry.name)))
    return found


class Monitor:
    """Watches the whole run for a guest running on two hosts at once (SPEC §6):
    ``virsh list --state-running`` on every powered host every second, and the qemu
    processes in /proc (by network namespace) every 0.2 s. During a live migration the
    guest legitimately has a qemu on both ends (the target's paused until the switch-
    over): guests in ``migrating`` are exempt from the /proc check, and for them a
    virsh overlap counts only when two consecutive samples show it (one sample reads
    the hosts one after the other and can straddle the switch-over)."""

    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.violations: list[str] = []
        self.virsh_samples = 0
        self.proc_samples = 0
        self.migrating: set[str] = set()
        self.latest: dict[str, list[tuple[str, int]]] = {}
        self._overlap_before: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="realfleet-monitor",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                self.sample_processes()
                if tick % 5 == 0:
                    self.sample_virsh()
            except Exception as exc:  # the monitor must not die silently
                self.violations.append(f"monitor error: {exc!r}")
            tick += 1
            self._stop.wait(0.2)

    def sample_processes(self) -> dict[str, list[tuple[str, int]]]:
        inodes = {h.netns_inode: h.name for h in self.fleet.hosts}
        found = qemu_processes(inodes)
        self.latest = found
        self.proc_samples += 1
        for guest, where in found.items():
            hosts = sorted({h for h, _ in where})
            if len(hosts) > 1 and guest not in self.migrating:
                self.violations.append(f"{time.strftime('%H:%M:%S')} qemu of {guest} runs "
                                       f"on {', '.join(hosts)} (/proc)")
        return found

    def virsh_view(self) -> dict[str, list[str]]:
        """guest → the hosts whose ``virsh list --state-running`` shows it, now."""
        seen: dict[str, list[str]] = {}
        for host in self.fleet.hosts:
            if not host.powered:
                continue
            names = host.running()
            for name in names or ():
                seen.setdefault(name, []).append(host.name)
        return seen

    def proc_view(self) -> dict[str, list[str]]:
        """guest → the hosts with a qemu process of it, now."""
        found = qemu_processes({h.netns_inode: h.name for h in self.fleet.hosts})
        return {g: sorted({h for h, _ in where}) for g, where in found.items()}

    def sample_virsh(self) -> dict[str, list[str]]:
        seen = self.virsh_view()
        self.virsh_samples += 1
        overlap = {g for g, hosts in seen.items() if len(hosts) > 1}
        for guest in sorted(overlap):
            if guest in self.migrating and guest not in self._overlap_before:
                continue
            self.violations.append(f"{time.strftime('%H:%M:%S')} {guest} running on "
                                   f"{', '.join(seen[guest])} (virsh list)")
        self._overlap_before = overlap
        return seen

    def hosts_running(self, guest: str) -> list[str]:
        return sorted({h for h, _ in self.latest.get(guest, [])})


# --- the BMCs --------------------------------------------------------------------------------


class BMC:
    """One Redfish service for all three hosts (system id = host name), on loopback —
    the management network, which the hosts' link cuts do not touch. Basic auth.
    ``ForceOff`` is the host's power loss (``Host.power_off``); ``On`` boots it;
    ``PowerState`` is what the host really is."""

    def __init__(self, fleet: Fleet, username: str, password: str):
        self.fleet = fleet
        self.username, self.password = username, password
        self.actions: list[tuple[str, str]] = []
        bmc = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # quiet
                pass

            def _send(self, status: int, body: dict | None = None) -> None:
                data = json.dumps(body).encode() if body is not None else b""
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                import base64

                expected = base64.b64encode(
                    f"{bmc.username}:{bmc.password}".encode()).decode()
                if self.headers.get("Authorization", "") == f"Basic {expected}":
                    return True
                self._send(401, {"error": {"message": "authentication required"}})
                return False

            def _host(self, system_id: str) -> Host | None:
                return next((h for h in bmc.fleet.hosts if h.name == system_id), None)

            def do_GET(self):  # noqa: N802
                if not self._authorised():
                    return
                path = self.path.rstrip("/")
                if path == "/redfish/v1":
                    return self._send(200, {"Id": "RootService", "Systems": {
                        "@odata.id": "/redfish/v1/Systems"}})
                if path == "/redfish/v1/Systems":
                    return self._send(200, {"Members": [
                        {"@odata.id": f"/redfish/v1/Systems/{h.name}"}
                        for h in bmc.fleet.hosts]})
                m = re.fullmatch(r"/redfish/v1/Systems/([^/]+)", path)
                host = self._host(m.group(1)) if m else None
                if host is None:
                    return self._send(404, {"error": {"message": "no such resource"}})
                self._send(200, {"Id": host.name, "Name": host.name,
                                 "PowerState": "On" if host.powered else "Off"})

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                if not self._authorised():
                    return
                m = re.fullmatch(r"/redfish/v1/Systems/([^/]+)/Actions/ComputerSystem\.Reset",
                                 self.path.rstrip("/"))
                host = self._host(m.group(1)) if m else None
                if host is None:
                    return self._send(404, {"error": {"message": "no such action"}})
                try:
                    reset = json.loads(raw or b"{}").get("ResetType")
                except (ValueError, AttributeError):
                    return self._send(400, {"error": {"message": "body is not JSON"}})
                bmc.actions.append((host.name, str(reset)))
                if reset == "ForceOff":
                    host.power_off()
                elif reset == "On":
                    threading.Thread(target=bmc._boot, args=(host,), daemon=True).start()
                elif reset == "ForceRestart":
                    host.power_off()
                    threading.Thread(target=bmc._boot, args=(host,), daemon=True).start()
                else:
                    return self._send(400, {"error": {
                        "message": f"ResetType {reset!r} is not supported here "
                                   "(ForceOff, On, ForceRestart)"}})
                self._send(204)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.boot_errors: list[str] = []
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _boot(self, host: Host) -> None:
        try:
            host.power_on()
        except Exception as exc:
            self.boot_errors.append(f"{host.name}: {exc}")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the fleet --------------------------------------------------------------------------------


class Fleet:
    """Three hosts on a bridge, their BMC and the monitor. ``server_url`` and
    ``join_key`` must be set before ``power_on``."""

    def __init__(self, base: Path, *, hosts: int = 3, echo: bool = False):
        self.base = base
        base.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("HADASH_") and k not in ("DATABASE_URL", "SECRET_KEY")}
        env["PATH"] = PATH
        self.sup = Supervisor(echo=echo, grace=5.0, base_env=env)
        self.hosts = [Host(self, i) for i in range(1, hosts + 1)]
        self.server_url = ""
        self.join_key = ""
        self.monitor = Monitor(self)
        self.bmc: BMC | None = None
        self.built = False

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if h.name == name)

    def build(self) -> None:
        for path in LIBVIRT_DIRS.values():
            Path(path).mkdir(parents=True, exist_ok=True)  # mount points only
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.built = True
        run("ip", "addr", "add", f"{SERVER_IP}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        for h in self.hosts:
            h.build()

    def teardown(self) -> list[str]:
        """Stop everything and remove the namespaces and links; what was left running
        (should be nothing)."""
        problems = []
        with contextlib.suppress(Exception):
            self.monitor.stop()
        if self.bmc is not None:
            self.bmc.stop()
        ours = frozenset(c.proc.pid for c in self.sup.children if c.proc is not None)
        for h in self.hosts:
            try:
                if (NETNS_DIR / h.ns).exists():
                    kill_netns(h.ns, keep_status=ours)
            except Exception as exc:
                problems.append(str(exc))
        self.sup.stop(grace=2)
        problems += [f"pid {p} of a host process" for p in self.sup.leftovers()]
        for h in self.hosts:
            left = netns_pids(h.ns) if (NETNS_DIR / h.ns).exists() else []
            if left:
                problems.append(f"{h.ns}: pids {left} still running")
        sweep()
        return problems


# --- hadash on the fleet: the set-up shared by tests/realfleet and `bench agent-crash` ---------

# The engine's timings, shortened so that detection and recovery take seconds.
CONFIG = {
    "ping.interval": "2", "ping.timeout": "2",  # behind on ping after 4 s
    "investigate.retry.interval": "5", "restart.retry.interval": "5",
    "migrate.retry.interval": "10",
    "alert.wait": "10",  # a host nobody can tell about goes Alert after 10 s
}


def _check(ok: object, what: str) -> None:
    if not ok:
        raise RuntimeError(what)


def manage(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "manage.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    _check(proc.returncode == 0,
           f"manage.py {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def start_hadash(sup: Supervisor, env: dict[str, str], port: int,
                 config: dict[str, str] | None = None):
    """Migrate, then daphne (on the bridge's address) and the django-q engine, the
    engine's timings shortened (``CONFIG``, then ``config``); the operator API client."""
    import httpx

    manage(env, "migrate", "--noinput", "-v0")
    token = manage(env, "apitoken", "realfleet", "--create").strip().splitlines()[-1]
    api = httpx.Client(base_url=f"http://{SERVER_IP}:{port}/api/v1", timeout=30,
                       headers={"Authorization": f"Bearer {token}"}, trust_env=False)
    web = sup.python("web", "-m", "daphne", "-b", SERVER_IP, "-p", str(port),
                     "hadash.asgi:application")
    wait_for_port(port, host=SERVER_IP, proc=web.proc, timeout=90)
    for key, value in {**CONFIG, **(config or {})}.items():
        r = api.put(f"/config/{key}", json={"value": value})
        _check(r.status_code == 200, f"config {key}: {r.text}")
    manage(env, "engine", "start")
    sup.manage("engine", "qcluster")
    return api


def guests_plan() -> dict[str, Guest]:
    """Two HA guests and a plain one on host 1, one HA guest on each of the others.
    Every host has 2 cpus in hadash's eyes (this machine's): after host 1 fails, its
    two HA guests fit one on each of the others."""
    plan = [Guest("vm-a", "hdrf-h1", priority="high"), Guest("vm-b", "hdrf-h1"),
            Guest("vm-c", "hdrf-h1", ha=False), Guest("vm-d", "hdrf-h2"),
            Guest("vm-e", "hdrf-h3")]
    return {g.name: g for g in plan}


class Booting(threading.Thread):
    """The hosts' side of the set-up, which needs no hadash: power every host on
    (libvirtd probes qemu once; the others get its cache), then define each guest on
    its home host and start it there."""

    def __init__(self, fleet: Fleet, guests: dict[str, Guest]):
        super().__init__(name="realfleet-boot", daemon=True)
        self.fleet, self.guests = fleet, guests
        self.error = ""

    def run(self) -> None:
        try:
            fleet = self.fleet
            first, others = fleet.hosts[0], fleet.hosts[1:]
            first.power_on()
            first.warm_up()
            for h in others:
                first.copy_capabilities_to(h)
            errors: list[str] = []

            def boot(h):
                try:
                    h.power_on()
                except Exception as exc:
                    errors.append(f"{h.name}: {exc}")

            threads = [threading.Thread(target=boot, args=(h,)) for h in others]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError("; ".join(errors))
            for g in self.guests.values():
                home = fleet.host(g.home)
                home.define(g)
                home.start(g)
        except Exception as exc:
            self.error = str(exc) or repr(exc)


def enrol_and_register(api, fleet: Fleet, bmc: BMC, guests: dict[str, Guest]) -> None:
    """hadash's side, as an operator does it: every agent enrolled and Up, the BMC
    settings on every host row, the guests — listed as unmanaged, with the definitions
    their agents sent — adopted in one call (HA on or off, priority), each Running on its
    host with its definition stored."""
    names = [h.name for h in fleet.hosts]

    def status(name):
        r = api.get(f"/hosts/{name}")
        return r.json()["status"] if r.status_code == 200 else None

    def vm(name):
        r = api.get(f"/vms/{name}")
        _check(r.status_code == 200, r.text)
        return r.json()

    wait_for("every host Up", lambda: all(status(n) == "Up" for n in names), 60)
    for h in fleet.hosts:
        r = api.patch(f"/hosts/{h.name}", json={
            "oobm_enabled": True, "oobm_address": bmc.url, "oobm_system_id": h.name,
            "oobm_username": bmc.username, "oobm_password": bmc.password})
        _check(r.status_code == 200, f"BMC settings of {h.name}: {r.text}")
    want = {(g.name, g.home) for g in guests.values()}

    def listed():
        rows = api.get("/unmanaged-vms").json()
        ready = {(r["name"], r["host"]) for r in rows
                 if r["has_definition"] and r["power_state"] == "PowerOn"}
        return want <= ready

    wait_for("the guests listed as unmanaged, running, with definitions", listed, 60)
    r = api.post("/unmanaged-vms/adopt", json={"vms": [
        {"name": g.name, "host": g.home, "ha_enabled": g.ha, "priority": g.priority}
        for g in guests.values()]})
    _check(r.status_code == 201, f"adopting the guests: {r.text}")
    wait_for("every guest Running, PowerOn on its host", lambda: all(
        (v := vm(g.name))["state"] == "Running" and v["power_state"] == "PowerOn"
        and v["host"] == g.home for g in guests.values()), 30)
    for g in guests.values():
        v = vm(g.name)
        _check((v["cpus"], v["memory_mb"]) == (1, 64), f"{g.name}: size from the "
               f"definition expected (1 cpu, 64 MiB): {v}")
        d = api.get(f"/vms/{g.name}/definition").json()
        _check(d["format"] == "libvirt-xml" and g.uuid in d["xml"],
               f"{g.name}: stored definition {d}")
