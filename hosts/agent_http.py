"""`AgentClient` over HTTP: PROTOCOL.md's server→agent calls (production transport).

One :class:`HttpAgentClient` holds one ``httpx.Client`` (connection pool, keep-alive),
shared by every call and every thread; ``close()`` it when done.

How answers map onto the interface (``hosts.transport``):

* no connection, a timeout, an unusable ``agent_url`` (empty, malformed) → ``Unreachable``;
* a 5xx whose body is not a JSON ``{"error": …}`` (a proxy's 502/503 page, a crashed
  agent) → ``Unreachable``: nobody we can talk to answered;
* 401/403 (the agent does not accept our token) → :class:`AgentAuthError`, a subclass
  of ``Unreachable``: the agent answered but cannot be asked anything, so callers that
  only handle ``Unreachable`` (``get_vm``, ``check_on_host``) treat it as "cannot ask",
  and ``check_health`` reports False. It carries the status and the agent's message,
  and is logged at WARNING (a token mismatch needs an operator);
* any other 4xx, or a 5xx with ``{"error": …}`` → ``AgentError(message, status)``
  (PROTOCOL.md: a rejected request changes nothing). Exceptions: ``get_vm`` 404 with a
  JSON body → None (a 404 that is not JSON → ``Unreachable``: whatever answered is not
  an agent, and "unknown VM" would make the VM look dead); ``stop_vm`` 404 with an
  ``{"error"}`` body → success (the hypervisor does not know the VM, which is what stop
  is for);
* a 2xx whose body is not the documented JSON → ``AgentError`` (the agent answered,
  but not in protocol).

Timeouts are ours to choose (PROTOCOL.md): short for checks, long for start/stop/migrate.

What the server calls (SPEC R30, R31):

* every request carries ``Authorization: Bearer <server_token>`` — the host's
  server token from its ``connect``, never the agent's own token; a host without one
  (never connected) is not called (``AgentAuthError``);
* the ``agent_url`` is checked again before each request
  (``hosts.agent.networks.url_problem``: http(s), no user/query/fragment, a base path
  only, its host — a DNS name resolved now — inside ``HADASH_AGENT_NETWORKS``, never
  link-local): a URL that fails is ``Unreachable`` and nothing is sent;
* paths are the server's own (``/vms/{quoted name}/start``…), appended to that base;
* ``check-on-host`` passes the target's ``address`` only when it passes the same
  check (else an empty address), and ``migrate`` only a ``target_url`` that does.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from hosts.agent.networks import address_problem, url_problem
from hosts.transport import AgentError, Unreachable

if TYPE_CHECKING:
    from hosts.models import Host
    from vms.models import VMInstance

log = logging.getLogger(__name__)

__all__ = ["AgentAuthError", "HttpAgentClient"]


class AgentAuthError(Unreachable):
    """The agent refused our credentials (401/403): it cannot be asked anything."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _vm_path(vm_name: str, action: str = "") -> str:
    path = "/vms/" + quote(vm_name, safe="")
    return f"{path}/{action}" if action else path


class HttpAgentClient:
    """The production :class:`hosts.transport.AgentClient`.

    ``connect_timeout`` bounds the TCP/TLS connect of every call; ``read_timeout`` the
    wait for an answer to checks (``check-health``, ``GET /vms/…``); ``neighbour_timeout``
    ``check-on-host`` (the neighbour probes the target itself before answering);
    ``action_timeout`` start, stop and migrate. ``transport`` lets tests plug in an
    ``httpx`` transport; ``trust_env`` (default False) decides whether HTTP(S)_PROXY and
    friends from the environment apply — agents sit on the management network, so by
    default they do not.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 2.0,
        read_timeout: float = 5.0,
        neighbour_timeout: float = 10.0,
        action_timeout: float = 60.0,
        max_connections: int = 100,
        transport: httpx.BaseTransport | None = None,
        trust_env: bool = False,
    ):
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.neighbour_timeout = neighbour_timeout
        self.action_timeout = action_timeout
        self._client = httpx.Client(
            timeout=self._timeout(read_timeout),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            headers={"Accept": "application/json", "User-Agent": "hadash-server"},
            follow_redirects=False,
            transport=transport,
            trust_env=trust_env,
        )

    # --- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpAgentClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------
    def _timeout(self, read: float) -> httpx.Timeout:
        return httpx.Timeout(read, connect=self.connect_timeout)

    def _send(
        self,
        host: Host,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        read_timeout: float | None = None,
    ) -> httpx.Response:
        """One request to the host's agent; transport failures become Unreachable."""
        base = (host.agent_url or "").strip()
        if not base:
            raise Unreachable(f"host {host.name} has no agent_url")
        problem = url_problem(base)
        if problem:
            log.warning("agent %s: not calling its agent_url %r: %s", host.name, base, problem)
            raise Unreachable(f"host {host.name}: agent_url refused: {problem}")
        if not host.server_token:
            raise AgentAuthError(
                f"host {host.name} has no server token (its agent has not connected)")
        url = base.rstrip("/") + path
        headers = {"Authorization": f"Bearer {host.server_token}"}
        timeout = self._timeout(read_timeout if read_timeout is not None else self.read_timeout)
        log.debug("agent %s: %s %s %s", host.name, method, url, body)
        try:
            response = self._client.request(
                method, url, json=body, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as exc:
            log.debug("agent %s: %s %s timed out: %r", host.name, method, url, exc)
            raise Unreachable(f"host {host.name}: {method} {path} timed out ({exc!r})") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.debug("agent %s: %s %s failed: %r", host.name, method, url, exc)
            raise Unreachable(f"host {host.name}: {method} {path} failed ({exc!r})") from exc
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "agent %s: %s %s → %s %s",
                host.name, method, path, response.status_code, response.text[:500],
            )
        return response

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any] | None:
        try:
            data = response.json()
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def _answer(self, host: Host, response: httpx.Response, what: str) -> dict[str, Any]:
        """The JSON answer of a 2xx, or the matching exception for anything else."""
        status = response.status_code
        data = self._json(response)
        if 200 <= status < 300:
            if data is None:
                raise AgentError(
                    f"host {host.name}: {what}: answer is not a JSON object", status
                )
            return data
        error = data.get("error") if data is not None else None
        message = str(error) if error is not None else ""
        if status in (401, 403):
            log.warning(
                "agent %s refused our credentials on %s (%s): %s",
                host.name, what, status, message or response.reason_phrase,
            )
            raise AgentAuthError(
                f"host {host.name}: {what}: {message or 'credentials refused'}", status
            )
        if status >= 500 and error is None:
            raise Unreachable(f"host {host.name}: {what}: HTTP {status} without an answer")
        raise AgentError(message or f"HTTP {status} {response.reason_phrase}".strip(), status)

    # --- AgentClient --------------------------------------------------------------
    def check_health(self, host: Host) -> bool:
        try:
            response = self._send(host, "POST", "/check-health", {})
            data = self._answer(host, response, "check-health")
        except (Unreachable, AgentError) as exc:
            log.debug("agent %s: check-health failed: %s", host.name, exc)
            return False
        return data.get("ok") is True

    def get_vm(self, host: Host, vm_name: str) -> str | None:
        response = self._send(host, "GET", _vm_path(vm_name))
        if response.status_code == 404:
            if self._json(response) is None:
                # Not the protocol's error shape: whatever answered is not an agent
                # (a wrong agent_url, an address taken over by another server), so it
                # must not be read as "the hypervisor does not know this VM".
                raise Unreachable(
                    f"host {host.name}: get {vm_name}: 404 without a JSON answer"
                )
            return None
        data = self._answer(host, response, f"get {vm_name}")
        state = data.get("power_state")
        if not isinstance(state, str) or not state:
            raise AgentError(
                f"host {host.name}: get {vm_name}: answer has no power_state",
                response.status_code,
            )
        return state

    def start_vm(self, host: Host, vm: VMInstance,
                 definition: dict[str, str] | None = None) -> None:
        body: dict[str, Any] = {"cpus": vm.cpus, "memory_mb": vm.memory_mb}
        if definition:
            body["definition"] = definition  # PROTOCOL.md v1.1: when the server has one
        response = self._send(
            host,
            "POST",
            _vm_path(vm.name, "start"),
            body,
            read_timeout=self.action_timeout,
        )
        self._answer(host, response, f"start {vm.name}")

    def stop_vm(self, host: Host, vm_name: str, force: bool = True) -> None:
        response = self._send(
            host,
            "POST",
            _vm_path(vm_name, "stop"),
            {"force": bool(force)},
            read_timeout=self.action_timeout,
        )
        if response.status_code == 404 and (self._json(response) or {}).get("error"):
            log.debug("agent %s: stop %s: VM unknown there, nothing to stop", host.name, vm_name)
            return
        self._answer(host, response, f"stop {vm_name}")

    def migrate_vm(self, host: Host, vm_name: str, target: Host) -> str:
        if not target.agent_url:
            raise AgentError(f"migrate {vm_name}: target {target.name} has no agent_url")
        problem = url_problem(target.agent_url)
        if problem:
            raise AgentError(
                f"migrate {vm_name}: target {target.name}'s agent_url refused: {problem}")
        response = self._send(
            host,
            "POST",
            _vm_path(vm_name, "migrate"),
            {"target_url": target.agent_url},
            read_timeout=self.action_timeout,
        )
        data = self._answer(host, response, f"migrate {vm_name}")
        landed = data.get("host")
        if not isinstance(landed, str) or not landed:
            log.debug(
                "agent %s: migrate %s: answer names no host, assuming %s",
                host.name, vm_name, target.name,
            )
            return target.name
        return landed

    def check_on_host(self, neighbour: Host, target: Host) -> bool | None:
        address = target.private_ip_address or ""
        problem = address_problem(address)
        if problem:
            log.warning("check-on-host %s: not passing its address %r: %s",
                        target.name, address, problem)
            address = ""
        response = self._send(
            neighbour,
            "POST",
            "/check-on-host",
            {"name": target.name, "address": address},
            read_timeout=self.neighbour_timeout,
        )
        data = self._answer(neighbour, response, f"check-on-host {target.name}")
        alive = data.get("alive")
        return alive if isinstance(alive, bool) else None
