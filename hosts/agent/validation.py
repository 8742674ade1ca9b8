"""Agent protocol input validation (PROTOCOL.md, v1).

Pure functions: each takes decoded JSON (or raw bytes) and returns clean values for
``hosts.agent.service``, or raises :class:`ProtocolError` with a message an agent's
author can act on. Nothing here touches the database, so a rejected request changes
nothing. The HTTP views and the websocket consumer share these.

Every string an agent sends is checked before it can reach the database or a log:
no control characters and no lone surrogates (``"\\ud800"`` is valid JSON but not
text any database can store); host and VM names follow ``hadash.names`` (R31, issue
8); ``agent_url`` and ``address`` must be somewhere the server may call
(``hosts.agent.networks``: ``HADASH_AGENT_NETWORKS``, never link-local; a DNS name is
resolved here, the one piece of I/O).
"""

from __future__ import annotations

import json
import re
from typing import Any

from hadash.names import NAME_RULE, name_problem
from hosts.choices import HostType
from vms import definitions as vm_definitions
from vms.choices import REPORTABLE_POWER_STATES
from vms.definitions import json_type as _json_type

from . import networks
from .service import AgentIdentity, ConnectData, VmReport

MAX_BODY_BYTES = 4 * 1024 * 1024  # 4 MiB: a 10,000-VM report fits with room to spare
MAX_VMS = 10_000
MAX_NAME_LENGTH = 255
MAX_REASON_LENGTH = 255  # Event.reason; longer goodbye reasons are cut, not refused

# Limits of the columns the values land in, so the database never refuses them.
MAX_POSITIVE_INT = 2_147_483_647  # PositiveIntegerField (host.cpus)
MAX_POSITIVE_BIGINT = 9_223_372_036_854_775_807  # PositiveBigIntegerField (memory_mb)

POWER_STATES = tuple(str(s) for s in REPORTABLE_POWER_STATES)  # ("PowerOn", "PowerOff")
HOST_TYPES = tuple(str(t) for t in HostType.values)


class ProtocolError(ValueError):
    """A request the protocol does not allow. ``status`` is the HTTP status to answer
    with (400 unless said otherwise); ``str(error)`` is the human-readable message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


# --- bodies -------------------------------------------------------------------


def check_size(length: int) -> None:
    if length > MAX_BODY_BYTES:
        raise ProtocolError(
            f"report too large: {length} bytes, the limit is {MAX_BODY_BYTES} bytes (4 MiB)",
            status=413,
        )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_object(
    raw: bytes | str, *, allow_empty: bool = False, what: str = "request body"
) -> dict[str, Any]:
    """Decode a request body (or websocket message: ``what``) that must be one JSON
    object."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    check_size(len(raw))
    if not raw.strip():
        if allow_empty:
            return {}
        raise ProtocolError(f"{what} is empty; expected a JSON object")
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not valid UTF-8 JSON") from None
    except RecursionError:
        raise ProtocolError(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise ProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def check_content_type(content_type: str | None) -> None:
    """Bodies are ``application/json``. A missing header is tolerated; any other media
    type is refused (415)."""
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    ):
        return
    raise ProtocolError(
        f"Content-Type must be application/json, not {media or content_type!r}", status=415
    )


# --- fields -------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_printable(field: str, value: str) -> None:
    # PostgreSQL cannot store NUL in text, and no name or address needs control
    # characters: refuse them here rather than fail in the database.
    if _CONTROL.search(value):
        raise ProtocolError(f"{field} must not contain control characters: {_show(value)}")
    # JSON may carry a lone surrogate ("\ud800"), which is not Unicode text: no
    # database can store it, and it must never get as far as trying.
    if _SURROGATE.search(value):
        raise ProtocolError(
            f"{field} is not valid Unicode text: it contains a lone surrogate "
            f"(\\u{ord(_SURROGATE.search(value).group()):04x}); send UTF-8 text"
        )


def _name(field: str, value: Any) -> str:
    """A host or VM name (hadash.names: the safe character set)."""
    if not isinstance(value, str):
        raise ProtocolError(f"{field} must be a string, not {_json_type(value)}")
    if not value.strip():
        raise ProtocolError(f"{field} must not be empty")
    _check_printable(field, value)
    problem = name_problem(value)
    if problem:
        if "too long" in problem:
            raise ProtocolError(f"{field} {problem}")
        raise ProtocolError(f"{field} {_show(value)} is not a valid name: {NAME_RULE}")
    return value


def _show(value: Any, limit: int = 80) -> str:
    """A value as it appears in an error message: quoted, and cut if long."""
    text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _string(obj: dict[str, Any], field: str, *, max_length: int, non_empty: bool = False) -> str:
    value = obj[field]
    if not isinstance(value, str):
        raise ProtocolError(f"{field} must be a string, not {_json_type(value)}")
    if non_empty and not value.strip():
        raise ProtocolError(f"{field} must not be empty")
    _check_printable(field, value)
    if len(value) > max_length:
        raise ProtocolError(
            f"{field} is too long: {len(value)} characters, at most {max_length} allowed"
        )
    return value


def _integer(obj: dict[str, Any], field: str, *, maximum: int) -> int:
    value = obj[field]
    # bool is an int in Python but not in the protocol: `"cpus": true` is a mistake.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{field} must be an integer, not {_json_type(value)}")
    if value < 1:
        raise ProtocolError(f"{field} must be at least 1, not {value}")
    if value > maximum:
        raise ProtocolError(f"{field} must be at most {maximum}, not {value}")
    return value


def _url(obj: dict[str, Any], field: str) -> str:
    """R31: an agent_url the server may call (hosts.agent.networks.url_problem)."""
    value = _string(obj, field, max_length=networks.MAX_URL_LENGTH, non_empty=True)
    problem = networks.url_problem(value)
    if problem:
        raise ProtocolError(f"{field} {problem}: {_show(value)}")
    return value


def _address(obj: dict[str, Any], field: str) -> str:
    """R31: the address neighbours are asked to probe (check-on-host): an IP address
    or DNS name inside HADASH_AGENT_NETWORKS, or empty."""
    value = _string(obj, field, max_length=255)
    problem = networks.address_problem(value)
    if problem:
        raise ProtocolError(f"{field} not allowed: {problem}")
    return value


def _require(obj: dict[str, Any], fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        plural = "s" if len(missing) > 1 else ""
        raise ProtocolError(f"missing required field{plural}: {', '.join(missing)}")


def _definition(where: str, value: Any) -> tuple[str, str]:
    """v1.1: a report entry's ``definition`` (vms.definitions: format "libvirt-xml",
    xml text of at most 1 MiB, no NUL or lone surrogates)."""
    try:
        return vm_definitions.clean(value)
    except vm_definitions.DefinitionError as exc:
        raise ProtocolError(f"{where}.definition {exc}") from None


def parse_vms(value: Any, *, field: str = "vms") -> VmReport:
    """A power report: ``[{"name": …, "power_state": "PowerOn"|"PowerOff"}, …]``, as
    (name, power state) pairs; v1.1 entries may carry a ``definition``, collected in
    the report's ``definitions`` ({name: (format, xml)})."""
    if not isinstance(value, list):
        raise ProtocolError(f"{field} must be an array, not {_json_type(value)}")
    if len(value) > MAX_VMS:
        raise ProtocolError(
            f"report too large: {field} has {len(value)} entries, at most {MAX_VMS} allowed"
        )
    report = VmReport()
    seen: dict[str, int] = {}
    for i, entry in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(entry, dict):
            raise ProtocolError(
                f"{where} must be an object with name and power_state, not {_json_type(entry)}"
            )
        missing = [f for f in ("name", "power_state") if f not in entry]
        if missing:
            raise ProtocolError(f"{where} is missing {' and '.join(missing)}")
        name = entry["name"]
        if not isinstance(name, str):
            raise ProtocolError(f"{where}.name must be a string, not {_json_type(name)}")
        if not name.strip():
            raise ProtocolError(f"{where}.name must not be empty")
        _check_printable(f"{where}.name", name)
        if len(name) > MAX_NAME_LENGTH:
            raise ProtocolError(
                f"{where}.name is too long: {len(name)} characters, at most {MAX_NAME_LENGTH}"
            )
        state = entry["power_state"]
        if not isinstance(state, str) or state not in POWER_STATES:
            shown = _show(state)
            raise ProtocolError(
                f"{where}.power_state: {shown} is not a power state an agent may report "
                f"(expected one of {', '.join(POWER_STATES)})"
            )
        if name in seen:
            first = f"{field}[{seen[name]}]"
            raise ProtocolError(
                f"{where}.name: duplicate VM {_show(name)} (already reported at {first})"
            )
        seen[name] = i
        if name_problem(name) is not None:
            # A domain whose name is outside the safe set (hadash.names) cannot be a VM
            # hadash manages, so like any unknown name it is ignored (R8). Refusing the
            # whole report would leave the host unheard — investigated, maybe fenced —
            # over one oddly named domain on its hypervisor.
            continue
        report.append((name, state))
        if "definition" in entry and entry["definition"] is not None:
            # A definition that cannot be stored is dropped (and said why in the
            # log), not the report: like an oddly named domain, it must not leave
            # the host unheard (R8, R31).
            try:
                report.definitions[name] = _definition(where, entry["definition"])
            except ProtocolError as exc:
                report.refused[name] = exc.message
    return report


AGENT_FIELDS = {"name": 64, "version": 64, "hypervisor_uri": 255}


def parse_agent(value: Any) -> AgentIdentity | None:
    """v1.1 connect's optional ``agent`` block: who serves the host (name, version,
    hypervisor URI; strings, each optional, within the column lengths)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"agent must be an object with name, version and "
                            f"hypervisor_uri, not {_json_type(value)}")
    found = {}
    for key, limit in AGENT_FIELDS.items():
        if key in value and value[key] is not None:
            where = f"agent.{key}"
            found[key] = _string({where: value[key]}, where, max_length=limit).strip()
    return AgentIdentity(name=found.get("name", ""), version=found.get("version", ""),
                         hypervisor_uri=found.get("hypervisor_uri", ""))


# --- messages -----------------------------------------------------------------

CONNECT_FIELDS = (
    "name",
    "type",
    "hypervisor",
    "cluster",
    "cpus",
    "memory_mb",
    "address",
    "agent_url",
)


def parse_connect(obj: dict[str, Any]) -> ConnectData:
    """``POST /connect``. Extra fields are allowed (extensions) and ignored."""
    _require(obj, CONNECT_FIELDS)
    name = _name("name", obj["name"])
    host_type = obj["type"]
    if not isinstance(host_type, str):
        raise ProtocolError(f"type must be a string, not {_json_type(host_type)}")
    if host_type not in HOST_TYPES:
        raise ProtocolError(
            f"type: {_show(host_type)} is not a host type (expected one of {', '.join(HOST_TYPES)})"
        )
    hypervisor = _string(obj, "hypervisor", max_length=32)
    cluster = _string(obj, "cluster", max_length=255)
    cpus = _integer(obj, "cpus", maximum=MAX_POSITIVE_INT)
    memory_mb = _integer(obj, "memory_mb", maximum=MAX_POSITIVE_BIGINT)
    address = _address(obj, "address")
    agent_url = _url(obj, "agent_url")
    vms = parse_vms(obj["vms"]) if "vms" in obj else VmReport()
    agent = parse_agent(obj.get("agent"))
    return ConnectData(
        name=name,
        type=host_type,
        hypervisor=hypervisor,
        cluster=cluster,
        cpus=cpus,
        memory_mb=memory_mb,
        address=address,
        agent_url=agent_url,
        vms=vms,
        agent=agent,
    )


def parse_ping(obj: dict[str, Any]) -> VmReport:
    """``POST /ping``: the full power report is required."""
    _require(obj, ("vms",))
    return parse_vms(obj["vms"])


def parse_disconnect(obj: dict[str, Any]) -> str:
    """``POST /disconnect``: an optional string ``reason``."""
    reason = obj.get("reason", "")
    if reason is None:
        return ""
    if not isinstance(reason, str):
        raise ProtocolError(f"reason must be a string, not {_json_type(reason)}")
    return _SURROGATE.sub("\ufffd", _CONTROL.sub(" ", reason))[:MAX_REASON_LENGTH]


def parse_ws_message(text: str | bytes) -> VmReport:
    """One websocket text message: ``{"type": "ping", "vms": [...]}``."""
    obj = parse_json_object(text, what="message")
    kind = obj.get("type")
    if kind is None:
        raise ProtocolError('missing required field: type (expected "ping")')
    if kind != "ping":
        raise ProtocolError(f'unsupported message type {_show(kind)} (expected "ping")')
    return parse_ping(obj)
