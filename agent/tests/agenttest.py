"""Helpers of the hadash-agent tests (agent/tests): the agent against libvirt's test driver.

``test:///<path>/node.xml`` gives every connection — so every agent process — its own
private hypervisor, made from the file, with no daemon. The agent runs as a real
subprocess (``python -m hadash_agent``) and is talked to over real HTTP.

libvirt-python must be installed (scripts/setup installs it when run as root: it needs
``apt-get install libvirt-dev pkg-config``). Without it these tests are skipped with
that reason, except under CI=true, where that is an error.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import httpx

AGENT_DIR = Path(__file__).resolve().parent.parent
if str(AGENT_DIR) not in sys.path:
    sys.path.insert(0, str(AGENT_DIR))

try:
    import libvirt  # noqa: F401

    LIBVIRT = True
except ImportError:
    LIBVIRT = False


# --- libvirt test-driver hosts ------------------------------------------------------------


@dataclass
class Dom:
    name: str
    running: bool = True
    disks: list[str] = field(default_factory=list)
    memory_kib: int = 65536

    def xml(self, test_ns: bool = True) -> str:
        disks = "".join(
            f"<disk type='file' device='disk'><source file='{escape(path)}'/>"
            f"<target dev='vd{chr(97 + i)}' bus='virtio'/></disk>"
            for i, path in enumerate(self.disks))
        ns = " xmlns:test='http://libvirt.org/schemas/domain/test/1.0'" if test_ns else ""
        runstate = "" if self.running or not test_ns else "<test:runstate>5</test:runstate>"
        return (f"<domain type='test'{ns}><name>{escape(self.name)}</name>"
                f"<memory>{self.memory_kib}</memory><vcpu>1</vcpu>"
                f"<os><type>hvm</type></os><devices>{disks}</devices>{runstate}</domain>")


def write_node(path: Path, domains: Iterable[Dom], cpus: int = 8,
               memory_kib: int = 16 * 1024 * 1024) -> str:
    """A test-driver host with ``domains``; its libvirt URI."""
    body = "".join(d.xml() for d in domains)
    path.write_text(
        f"<node><cpu><mhz>2000</mhz><model>x86_64</model><active>{cpus}</active>"
        f"<nodes>1</nodes><sockets>1</sockets><cores>{cpus}</cores><threads>1</threads>"
        f"</cpu><memory>{memory_kib}</memory>{body}</node>")
    return f"test://{path}"


# --- the agent as a process ------------------------------------------------------------------


class AgentProcess:
    """One ``hadash-agent`` subprocess (its own process group), run by a Supervisor."""

    def __init__(self, sup, name: str, env: dict[str, str], port: int, state_dir: Path):
        self.sup, self.name, self.env, self.port, self.state_dir = sup, name, env, port, state_dir
        self.child = None
        self.url = f"http://127.0.0.1:{port}"

    def start(self, **extra_env: str) -> AgentProcess:
        from hadash.supervisor import wait_for_port

        env = {**self.env, **extra_env}
        self.child = self.sup.start(self.name, [sys.executable, "-m", "hadash_agent"], env)
        wait_for_port(self.port, proc=self.child.proc, timeout=20)
        return self

    def stop(self) -> int | None:
        import signal

        proc = self.child.proc
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        return proc.returncode

    @property
    def log(self) -> list[str]:
        return self.child.log if self.child else []

    def wait_log(self, text: str, timeout: float = 10.0, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log[after:]:
                if text in line:
                    return line
            time.sleep(0.05)
        raise AssertionError(f"agent {self.name} never logged {text!r}; its log:\n"
                             + "\n".join(self.log[-40:]))

    def credentials(self) -> dict:
        return json.loads((self.state_dir / "state.json").read_text())

    def client(self, token: str | None = None) -> httpx.Client:
        """An HTTP client to the agent presenting ``token`` (default: the server token
        the agent holds)."""
        if token is None:
            token = self.credentials()["server_token"]
        return httpx.Client(base_url=self.url, timeout=15,
                            headers={"Authorization": f"Bearer {token}"})


def agent_env(*, server_url: str, libvirt_uri: str, port: int, state_dir: Path,
              name: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADASH_AGENT_")}
    env.update({
        "PYTHONPATH": str(AGENT_DIR), "PYTHONUNBUFFERED": "1",
        # An empty file: the settings come from the environment.
        "HADASH_AGENT_CONFIG": str(state_dir.parent / "agent.toml"),
        "HADASH_AGENT_SERVER_URL": server_url, "HADASH_AGENT_LIBVIRT_URI": libvirt_uri,
        "HADASH_AGENT_LISTEN": f"127.0.0.1:{port}", "HADASH_AGENT_STATE_DIR": str(state_dir),
        "HADASH_AGENT_NAME": name, "HADASH_AGENT_BACKOFF_MAX": "2",
        "HADASH_AGENT_REFUSED_RETRY": "2", "HADASH_AGENT_LOG_LEVEL": "INFO",
    })
    (state_dir.parent / "agent.toml").write_text("# settings: see the environment\n")
    env.update({f"HADASH_AGENT_{k.upper()}": v for k, v in settings.items()})
    return env


