"""A small client for a running simulator's control API (``manage.py simulate fault``).

Synchronous (httpx), for command lines and scripts; the dashboard talks to the same
endpoints (docs/simulator.md).
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["ControlError", "fault", "health", "hosts"]

DEFAULT_CONTROL = "http://127.0.0.1:9100"


class ControlError(Exception):
    """The simulator refused (400: the message is its `error`) or did not answer."""


def _call(method: str, control: str, path: str, body: Any = None,
          timeout: float = 10.0) -> Any:
    url = control.rstrip("/")
    if not url.endswith("/control"):
        url += "/control"
    try:
        response = httpx.request(method, url + path, json=body, timeout=timeout,
                                 trust_env=False)
    except httpx.HTTPError as exc:
        raise ControlError(f"the simulator at {control} does not answer ({exc})") from exc
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code != 200:
        message = data.get("error") if isinstance(data, dict) else None
        raise ControlError(message or f"HTTP {response.status_code} from {url + path}")
    return data


def fault(do: str, control: str = DEFAULT_CONTROL) -> dict:
    """Apply one fault (``POST /control/faults``); the simulator's answer."""
    return _call("POST", control, "/faults", {"do": do})


def health(control: str = DEFAULT_CONTROL) -> dict:
    return _call("GET", control, "/health")


def hosts(control: str = DEFAULT_CONTROL) -> list[dict]:
    return _call("GET", control, "/hosts")
