"""The simulated fleet's control API (docs/simulator.md), as the web process sees it.

Attached when ``HADASH_FLEET_URL`` is set (setting or environment; ``manage.py demo``
sets it for the web process), e.g. ``http://127.0.0.1:9100``. Calls are made from the
server (the browser never talks to the simulator): ``GET /control/hosts`` and
``POST /control/faults {"do": "host kvm-003 power off"}``, with the control token
``HADASH_FLEET_TOKEN`` (setting or environment) as ``Authorization: Bearer …``.
"""

from __future__ import annotations

import os
import re
from typing import Any

import httpx
from django.conf import settings

TIMEOUT = httpx.Timeout(5.0, connect=2.0)

# The scenario fault vocabulary the simulator accepts (fleet.simulator.state).
FAULT = re.compile(
    r"^(host \S+ (power off|power on|agent stop|agent start|network off|network on|"
    r"start-fail \d{1,4})|bmc \S+ (fail|ok)|vm \S+ (crash|vanish))$"
)


class FleetError(Exception):
    """The simulator did not answer (502) or refused the request (its status)."""

    def __init__(self, message: str, status: int = 502):
        super().__init__(message)
        self.status = status


def url() -> str:
    value = getattr(settings, "HADASH_FLEET_URL", None)
    if value is None:
        value = os.environ.get("HADASH_FLEET_URL", "")
    return (value or "").strip().rstrip("/")


def token() -> str:
    value = getattr(settings, "HADASH_FLEET_TOKEN", None) or os.environ.get(
        "HADASH_FLEET_TOKEN", "")
    return (value or "").strip()


def _control() -> str:
    base = url()
    if not base:
        raise FleetError("no simulated fleet is attached (HADASH_FLEET_URL is not set)", 404)
    return base if base.endswith("/control") else base + "/control"


def call(method: str, path: str, body: Any = None) -> Any:
    target = _control() + path
    secret = token()
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    try:
        response = httpx.request(method, target, json=body, headers=headers, timeout=TIMEOUT,
                                 trust_env=False)
    except httpx.HTTPError as exc:
        raise FleetError(
            f"the simulator at {url()} does not answer ({type(exc).__name__}: {exc}); "
            "is `manage.py simulate` running?"
        ) from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 401:
        raise FleetError(
            f"the simulator at {url()} refused this server's control token: set "
            "HADASH_FLEET_TOKEN for the web process to the simulator's token"
            + ("" if secret else " (it is not set)"))
    if response.status_code != 200:
        message = data.get("error") if isinstance(data, dict) else None
        status = 400 if response.status_code == 400 else 502
        raise FleetError(message or f"the simulator answered HTTP {response.status_code} "
                                    f"for {method} {target}", status)
    return data


def hosts() -> list[dict]:
    data = call("GET", "/hosts")
    if not isinstance(data, list):
        raise FleetError("the simulator's /control/hosts did not return a list")
    return data


def fault(do: str) -> dict:
    do = " ".join((do or "").split())
    if not FAULT.match(do):
        raise FleetError(
            f"unknown fault {do!r}: use host H power off|power on|agent stop|agent start|"
            "network off|network on|start-fail N, bmc H fail|ok, vm V crash|vanish", 400,
        )
    return call("POST", "/faults", {"do": do})
