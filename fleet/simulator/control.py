"""A small client for a running simulator's control API (``manage.py simulate fault``).

Synchronous (httpx), for command lines and scripts; the dashboard talks to the same
endpoints (docs/simulator.md). Every call carries the control token
(``Authorization: Bearer …``): the ``token`` given, else ``$HADASH_FLEET_TOKEN``.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

__all__ = ["ControlError", "fault", "health", "hosts"]

DEFAULT_CONTROL = "http://127.0.0.1:9100"


class ControlError(Exception):
    """The simulator refused (its `error` is the message) or did not answer."""


def _call(method: str, control: str, path: str, body: Any = None, token: str | None = None,
          timeout: float = 10.0) -> Any:
    url = control.rstrip("/")
    if not url.endswith("/control"):
        url += "/control"
    token = (token or os.environ.get("HADASH_FLEET_TOKEN") or "").strip()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.request(method, url + path, json=body, headers=headers,
                                 timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        raise ControlError(f"the simulator at {control} does not answer ({exc})") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code != 200:
        message = data.get("error") if isinstance(data, dict) else None
        if response.status_code == 401:
            message = (f"the simulator at {control} refused the control token: give the "
                       "one it was started with (--token, or HADASH_FLEET_TOKEN)")
        raise ControlError(message or f"HTTP {response.status_code} from {url + path}")
    return data


def fault(do: str, control: str = DEFAULT_CONTROL, token: str | None = None) -> dict:
    """Apply one fault (``POST /control/faults``); the simulator's answer."""
    return _call("POST", control, "/faults", {"do": do}, token)


def health(control: str = DEFAULT_CONTROL, token: str | None = None) -> dict:
    return _call("GET", control, "/health", token=token)


def hosts(control: str = DEFAULT_CONTROL, token: str | None = None) -> list[dict]:
    return _call("GET", control, "/hosts", token=token)
