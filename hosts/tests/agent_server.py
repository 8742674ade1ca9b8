"""A small, real HTTP host agent for tests (PROTOCOL.md's server→agent endpoints).

:class:`FakeAgent` runs a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a
background thread, keeps its VMs in a dict, checks ``Authorization: Bearer <token>``
— ``token`` is the ``server_token`` the server got in ``connect`` (PROTOCOL.md v1.1, R30);
anything else is 401 — and speaks HTTP/1.1 with keep-alive, like a real agent would.
Knobs:

* ``fail_starts(n, status=409, message=…)`` — the next ``n`` starts are refused;
* ``delay = seconds`` — every answer waits that long first (beyond a client timeout);
* ``raw(status, body, content_type)`` — the next answer is exactly that (e.g. a 503 page);
* ``down()`` / ``up()`` — stop the server and drop its open connections (connection
  refused), then serve again on the same port;
* ``peers[name] = True/False/None`` — what ``check-on-host`` answers about ``name``.

Migration between two ``FakeAgent``s works in process: the target is found by its URL.
``agent(...)`` is a context manager; the ``fake_agent`` pytest fixture wraps it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest

_AGENTS_BY_URL: dict[str, FakeAgent] = {}
_REGISTRY_LOCK = threading.Lock()


@dataclass
class Seen:
    method: str
    path: str
    body: Any
    authorization: str | None
    client_port: int = 0


@dataclass
class _Raw:
    status: int
    body: bytes
    content_type: str


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, agent: FakeAgent):
        self.agent = agent
        super().__init__(address, handler)

    def handle_error(self, request, client_address):  # noqa: ARG002
        # A client that timed out and hung up is expected in these tests.
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format, *args):  # noqa: A002
        pass

    def setup(self):
        super().setup()
        self.server.agent._track(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.agent._untrack(self.connection)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw_body) if raw_body else None
        except ValueError:
            body = raw_body
        agent = self.server.agent
        status, payload = agent._handle(
            method, self.path, body, self.headers, self.client_address[1]
        )
        if agent.delay and agent._stopping.wait(agent.delay):
            self.close_connection = True  # shutting down: hang up without an answer
            return
        if isinstance(payload, _Raw):
            self._reply(status, payload.body, payload.content_type)
        else:
            self._reply(status, json.dumps(payload).encode(), "application/json")

    def _reply(self, status: int, data: bytes, content_type: str) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            self.close_connection = True


@dataclass
class FakeAgent:
    name: str
    token: str
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    peers: dict[str, bool | None] = field(default_factory=dict)
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._fail_starts: list[tuple[int, str]] = []
        self._raw: list[_Raw] = []
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- knobs ----------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_vm(self, name: str, power_state: str = "PowerOn", cpus: int = 1,
               memory_mb: int = 1024) -> None:
        with self._lock:
            self.vms[name] = {"power_state": power_state, "cpus": cpus, "memory_mb": memory_mb}

    def fail_starts(self, n: int, status: int = 409,
                    message: str = "not enough capacity") -> None:
        with self._lock:
            self._fail_starts.extend([(status, message)] * n)

    def raw(self, status: int, body: bytes | str,
            content_type: str = "text/html") -> None:
        data = body.encode() if isinstance(body, str) else body
        with self._lock:
            self._raw.append(_Raw(status, data, content_type))

    # --- lifecycle --------------------------------------------------------------
    def up(self) -> FakeAgent:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", self.port), _Handler, self)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"fake-agent-{self.name}", daemon=True,
        )
        self._thread.start()
        with _REGISTRY_LOCK:
            _AGENTS_BY_URL[self.url] = self
        return self

    def down(self) -> None:
        """Stop serving: new connections are refused, open ones are dropped."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=5)
        with _REGISTRY_LOCK:
            _AGENTS_BY_URL.pop(self.url, None)

    def _track(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._connections.discard(conn)

    # --- the protocol -------------------------------------------------------------
    def _handle(
        self, method: str, path: str, body: Any, headers, client_port: int = 0
    ) -> tuple[int, Any]:
        auth = headers.get("Authorization")
        with self._lock:
            self.seen.append(Seen(method, path, body, auth, client_port))
            if self._raw:
                raw = self._raw.pop(0)
                return raw.status, raw
        if auth != f"Bearer {self.token}":
            return 401, {"error": "missing or wrong token"}
        parts = [unquote(p) for p in path.split("?", 1)[0].strip("/").split("/")]
        if method == "POST" and parts == ["check-health"]:
            return 200, {"ok": True}
        if method == "POST" and parts == ["check-on-host"]:
            if not isinstance(body, dict) or not body.get("name"):
                return 400, {"error": "name is required"}
            return 200, {"alive": self.peers.get(body["name"])}
        if len(parts) == 2 and parts[0] == "vms" and method == "GET":
            return self._get_vm(parts[1])
        if len(parts) == 3 and parts[0] == "vms" and method == "POST":
            action = {"start": self._start, "stop": self._stop, "migrate": self._migrate}
            if parts[2] in action:
                if not isinstance(body, dict):
                    return 400, {"error": "a JSON object is required"}
                return action[parts[2]](parts[1], body)
        return 404, {"error": f"no such endpoint: {method} {path}"}

    def _get_vm(self, name: str) -> tuple[int, Any]:
        with self._lock:
            vm = self.vms.get(name)
        if vm is None:
            return 404, {"error": f"unknown VM {name}"}
        return 200, {"name": name, "power_state": vm["power_state"]}

    def _start(self, name: str, body: dict) -> tuple[int, Any]:
        cpus, memory = body.get("cpus"), body.get("memory_mb")
        if not isinstance(cpus, int) or not isinstance(memory, int):
            return 400, {"error": "cpus and memory_mb must be integers"}
        with self._lock:
            if self._fail_starts:
                status, message = self._fail_starts.pop(0)
                return status, {"error": message}
            self.vms[name] = {"power_state": "PowerOn", "cpus": cpus, "memory_mb": memory}
        return 200, {"power_state": "PowerOn"}

    def _stop(self, name: str, body: dict) -> tuple[int, Any]:
        if not isinstance(body.get("force", False), bool):
            return 400, {"error": "force must be a boolean"}
        with self._lock:
            if self.vms.pop(name, None) is None:
                return 404, {"error": f"unknown VM {name}"}
        return 200, {"power_state": "PowerOff"}

    def _migrate(self, name: str, body: dict) -> tuple[int, Any]:
        target_url = str(body.get("target_url") or "").rstrip("/")
        with _REGISTRY_LOCK:
            target = _AGENTS_BY_URL.get(target_url)
        if target is None or target is self:
            return 409, {"error": f"cannot reach migration target {target_url!r}"}
        with self._lock:
            vm = self.vms.get(name)
            if vm is None:
                return 404, {"error": f"unknown VM {name}"}
            if vm["power_state"] != "PowerOn":
                return 409, {"error": f"VM {name} is not running"}
            del self.vms[name]
        with target._lock:
            target.vms[name] = dict(vm)
        return 200, {"power_state": "PowerOn", "host": target.name}


@contextlib.contextmanager
def agent(name: str = "kvm-01", token: str = "test-token", **kwargs):
    """A running :class:`FakeAgent`, always stopped afterwards."""
    fake = FakeAgent(name=name, token=token, **kwargs).up()
    try:
        yield fake
    finally:
        fake.down()


@pytest.fixture
def fake_agent():
    """Factory fixture: ``fake_agent(name, token)`` starts an agent, stopped at teardown."""
    with contextlib.ExitStack() as stack:
        def start(name: str = "kvm-01", token: str = "test-token", **kwargs) -> FakeAgent:
            return stack.enter_context(agent(name, token, **kwargs))

        yield start
