"""`OobClient` over Redfish (DMTF): BMC power state and fencing (PROTOCOL.md, SPEC R4/R12).

Only two Redfish resources are used (R28's BMC check reads the first):

* ``GET {oobm_address}/redfish/v1/Systems/{oobm_system_id}`` → ``PowerState``;
* ``POST …/Actions/ComputerSystem.Reset`` with ``{"ResetType": "ForceOff"}`` (or ``"On"``).

Nothing here raises: an unconfigured, unreachable or misbehaving BMC yields ``None``
(power state) or ``False`` (power actions). ``power_off`` is True only once the BMC
*reports* Off — a Reset the BMC accepted is not yet a fenced host (SPEC R12: a VM is
never started elsewhere while its old host might still run it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import quote

import httpx

if TYPE_CHECKING:
    from hosts.models import Host

log = logging.getLogger(__name__)

__all__ = ["RedfishClient", "normalise_power_state"]

SERVICE_ROOT = "/redfish/v1"


def normalise_power_state(value: object) -> str | None:
    """Redfish ``PowerState`` → ``"On"``/``"Off"``; anything else (``PoweringOn``,
    ``PoweringOff``, ``Paused``, missing) → None: not a settled state we can rely on."""
    if not isinstance(value, str):
        return None
    text = value.strip().lower()
    if text.startswith("off"):
        return "Off"
    if text.startswith("on"):
        return "On"
    return None


class RedfishClient:
    """The production :class:`hosts.transport.OobClient`.

    ``verify`` is httpx's TLS verification (False by default: BMCs mostly carry
    self-signed certificates; pass True or a CA bundle path to check them).
    ``confirm_timeout`` bounds how long ``power_off``/``power_on(wait=True)`` poll for
    the new state, every ``poll_interval`` seconds; ``sleep``/``monotonic`` are
    injectable so tests need not wait for real.
    """

    def __init__(
        self,
        *,
        verify: bool | str = False,
        connect_timeout: float = 2.0,
        read_timeout: float = 10.0,
        confirm_timeout: float = 30.0,
        poll_interval: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        transport: httpx.BaseTransport | None = None,
        trust_env: bool = False,
    ):
        self.confirm_timeout = confirm_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.poll_interval = poll_interval
        self._sleep = sleep
        self._monotonic = monotonic
        self._client = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
            headers={"Accept": "application/json", "User-Agent": "hadash-server"},
            # Some BMCs (and sushy-emulator, for a system addressed by name) redirect
            # to the canonical resource; 307/308 keep the method and body.
            follow_redirects=True,
            transport=transport,
            trust_env=trust_env,
        )

    # --- lifecycle --------------------------------------------------------------
    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> RedfishClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------
    @staticmethod
    def system_url(host: Host) -> str | None:
        """The host's Redfish ComputerSystem URL, or None when OOB is off/unconfigured."""
        if not host.oobm_enabled:
            return None
        address = (host.oobm_address or "").strip().rstrip("/")
        system_id = (host.oobm_system_id or "").strip().strip("/")
        if not address or not system_id:
            return None
        if "://" not in address:
            address = "https://" + address
        if address.endswith(SERVICE_ROOT):
            address = address[: -len(SERVICE_ROOT)]
        return f"{address}{SERVICE_ROOT}/Systems/{quote(system_id, safe='')}"

    @staticmethod
    def _auth(host: Host) -> tuple[str, str] | None:
        if host.oobm_username:
            return (host.oobm_username, host.oobm_password or "")
        return None

    def _request(
        self,
        host: Host,
        method: str,
        url: str,
        body: dict | None = None,
        *,
        timeout: float | None = None,
    ) -> httpx.Response | None:
        log.debug("bmc %s: %s %s %s", host.name, method, url, body or "")
        read = self.read_timeout if timeout is None else max(0.1, min(timeout, self.read_timeout))
        try:
            response = self._client.request(
                method,
                url,
                json=body,
                auth=self._auth(host),
                timeout=httpx.Timeout(read, connect=min(self.connect_timeout, read)),
            )
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            log.debug("bmc %s: %s %s failed: %r", host.name, method, url, exc)
            return None
        log.debug("bmc %s: %s %s → %s", host.name, method, url, response.status_code)
        return response

    # --- OobClient ----------------------------------------------------------------
    def power_state(self, host: Host) -> str | None:
        return self._power_state(host)

    def _power_state(self, host: Host, timeout: float | None = None) -> str | None:
        url = self.system_url(host)
        if url is None:
            return None
        response = self._request(host, "GET", url, timeout=timeout)
        if response is None or not response.is_success:
            return None
        try:
            data = response.json()
        except ValueError:
            log.debug("bmc %s: system resource is not JSON", host.name)
            return None
        if not isinstance(data, dict):
            return None
        return normalise_power_state(data.get("PowerState"))

    def check_bmc(self, host: Host) -> str | None:
        """R28: reachable, credentials accepted, PowerState On → None; else why not."""
        url = self.system_url(host)
        if url is None:
            return "out-of-band management not configured"
        try:
            response = self._client.request("GET", url, auth=self._auth(host))
        except httpx.TimeoutException:
            return f"BMC unreachable: no answer within {self.read_timeout:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            return f"BMC unreachable: {type(exc).__name__}: {str(exc)[:120]}"
        if response.status_code in (401, 403):
            return f"BMC refuses the credentials (HTTP {response.status_code})"
        if not response.is_success:
            return f"BMC answers HTTP {response.status_code} for {url}"
        try:
            data = response.json()
        except ValueError:
            return "BMC answers, but not with a Redfish system (not JSON)"
        raw = data.get("PowerState") if isinstance(data, dict) else None
        state = normalise_power_state(raw)
        if state == "Off":
            return "BMC reports power Off while the host should run"
        if state != "On":
            return f"BMC reports no settled power state ({raw!r})"
        return None

    def power_off(self, host: Host) -> bool:
        """Fence: ForceOff, then wait (bounded) until the BMC reports Off."""
        return self._reset_and_confirm(host, "ForceOff", "Off", wait=True)

    def power_on(self, host: Host, *, wait: bool = False) -> bool:
        """Power the host on. True when the BMC accepted the reset (``wait=False``) or,
        with ``wait=True``, once it reports On within ``confirm_timeout``."""
        return self._reset_and_confirm(host, "On", "On", wait=wait)

    def _reset_and_confirm(self, host: Host, reset_type: str, want: str, *, wait: bool) -> bool:
        url = self.system_url(host)
        if url is None:
            log.debug("bmc %s: out-of-band management not enabled/configured", host.name)
            return False
        if self.power_state(host) == want:
            return True
        response = self._request(
            host, "POST", f"{url}/Actions/ComputerSystem.Reset", {"ResetType": reset_type}
        )
        if response is None:
            log.info("bmc %s: %s not delivered (BMC unreachable)", host.name, reset_type)
            return False
        if not response.is_success:
            # Some BMCs refuse a reset that is already under way or pointless; the
            # reported state is what counts.
            log.info(
                "bmc %s: %s refused (HTTP %s): %s",
                host.name, reset_type, response.status_code, response.text[:300],
            )
            return self.power_state(host) == want
        if not wait:
            return True
        return self._wait_for(host, want)

    def _wait_for(self, host: Host, want: str) -> bool:
        deadline = self._monotonic() + self.confirm_timeout
        remaining = self.confirm_timeout
        while True:
            # Each poll's own wait is bounded by the time left, so a hanging BMC
            # cannot stretch the confirmation much beyond confirm_timeout.
            if self._power_state(host, timeout=remaining) == want:
                log.info("bmc %s: power %s confirmed", host.name, want)
                return True
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                log.warning(
                    "bmc %s: power %s not confirmed within %ss",
                    host.name, want, self.confirm_timeout,
                )
                return False
            self._sleep(min(self.poll_interval, remaining))
