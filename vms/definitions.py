"""VM definitions (PROTOCOL.md v1.1, issue 9): what a host's agent reports of each VM
(libvirt's domain XML) and what `start` sends so another host can run it.

A definition is ``{"format": "libvirt-xml", "xml": "<domain …>…</domain>"}``:

* ``format`` must be ``"libvirt-xml"`` (the only format there is);
* ``xml`` a non-empty string of at most ``MAX_DEFINITION_BYTES`` (1 MiB) in UTF-8,
  with no NUL or other control characters except tab, newline and carriage return,
  and no lone surrogates (text every database can store; XML 1.0 allows no others).

The server does not interpret the XML beyond that, except to read the VM's size
(``size_of``) when an operator adopts an unmanaged VM.

Storing (``store_reported``): a host's agent may set the definition of a VM hadash
manages *on that host* — placed there, or, when not placed anywhere, last there. A
definition from any other host is ignored (as R8 ignores stale reports): a host must
never overwrite another host's VM. Unknown names go to ``vms.discovery``.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from typing import Any

from django.db import transaction

FORMAT = "libvirt-xml"
FORMATS = (FORMAT,)
MAX_DEFINITION_BYTES = 1024 * 1024  # 1 MiB of UTF-8 per definition

log = logging.getLogger("hadash.definitions")

# XML 1.0 characters: tab, newline and carriage return are the only control
# characters allowed; NUL cannot be stored by PostgreSQL at all.
_BAD_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")

Definition = tuple[str, str]  # (format, xml)


class DefinitionError(ValueError):
    """A definition that cannot be stored; the message says why."""


def json_type(value: Any) -> str:
    """A decoded JSON value's kind, for error messages ("not an array"); the agent
    protocol's validation uses it too."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def clean(value: Any) -> Definition:
    """The (format, xml) of a definition object, or DefinitionError."""
    if not isinstance(value, dict):
        raise DefinitionError(
            f'must be an object {{"format": "{FORMAT}", "xml": …}}, not {json_type(value)}')
    missing = [f for f in ("format", "xml") if f not in value]
    if missing:
        raise DefinitionError(f"is missing {' and '.join(missing)}")
    fmt = value["format"]
    if fmt not in FORMATS or not isinstance(fmt, str):
        shown = repr(fmt)[:40] if isinstance(fmt, str) else json_type(fmt)
        raise DefinitionError(f"format {shown} is not supported (expected \"{FORMAT}\")")
    xml = value["xml"]
    if not isinstance(xml, str):
        raise DefinitionError(f"xml must be a string, not {json_type(xml)}")
    if not xml.strip():
        raise DefinitionError("xml must not be empty")
    if len(xml) > MAX_DEFINITION_BYTES or len(xml.encode("utf-8", "surrogatepass")) > \
            MAX_DEFINITION_BYTES:
        raise DefinitionError(
            f"xml is too large: at most {MAX_DEFINITION_BYTES} bytes (1 MiB) in UTF-8")
    bad = _BAD_CONTROL.search(xml)
    if bad:
        raise DefinitionError(
            f"xml must not contain control characters (found \\u{ord(bad.group()):04x} at "
            f"offset {bad.start()}); only tab, newline and carriage return are allowed")
    sur = _SURROGATE.search(xml)
    if sur:
        raise DefinitionError(
            f"xml is not valid Unicode text: a lone surrogate (\\u{ord(sur.group()):04x}) at "
            f"offset {sur.start()}")
    return fmt, xml


def payload(fmt: str, xml: str) -> dict[str, str] | None:
    """The protocol object, or None when there is no definition."""
    if not fmt:
        return None
    return {"format": fmt, "xml": xml}


def of_vm(vm) -> dict[str, str] | None:
    """The stored definition of a VM as `start` sends it, or None. Reads the XML from
    the database (the default manager leaves it out of every query)."""
    if vm is None or not vm.pk:
        return None
    from .models import VMInstance

    row = VMInstance.objects.filter(pk=vm.pk).values_list(
        "definition_format", "definition_xml").first()
    if row is None:
        return None
    return payload(*row)


def size_of(xml: str) -> tuple[int | None, int | None]:
    """(cpus, memory_mb) read from libvirt domain XML — ``<vcpu>`` and ``<memory
    unit=…>`` — or None for what it does not say (or cannot be read). A DOCTYPE or
    ENTITY is never parsed."""
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        return None, None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None, None
    cpus = memory = None
    vcpu = root.find("vcpu")
    if vcpu is not None and (vcpu.text or "").strip().isdigit():
        cpus = int(vcpu.text.strip()) or None
    mem = root.find("memory")
    if mem is None:
        mem = root.find("currentMemory")
    if mem is not None and (mem.text or "").strip().isdigit():
        factor = {"b": 1 / 2**20, "bytes": 1 / 2**20, "kb": 1000 / 2**20, "k": 1 / 1024,
                  "kib": 1 / 1024, "mb": 1e6 / 2**20, "m": 1, "mib": 1, "gb": 1e9 / 2**20,
                  "g": 1024, "gib": 1024, "tb": 1e12 / 2**20, "t": 2**20, "tib": 2**20}
        unit = (mem.get("unit") or "KiB").lower()
        if unit in factor:
            memory = int(int(mem.text.strip()) * factor[unit]) or None
    return cpus, memory


# --- storing ------------------------------------------------------------------


def owner_id(vm_row: dict) -> int | None:
    """The host that may set a VM's definition: the host it is placed on, or, when it
    is placed nowhere, the host it last ran on."""
    return vm_row["host_id"] or vm_row["last_host_id"]


def store_reported(host, definitions: dict[str, Definition], *, now) -> dict[str, list[str]]:
    """Store the definitions ``host``'s agent reported for the VMs it owns. Returns
    ``{"stored": [...], "unchanged": [...], "foreign": [...], "unknown": [...]}`` (names).
    Unknown names are left to `vms.discovery`; definitions of VMs another host owns
    are ignored (logged). A change is written with one event for the host."""
    from hadash.choices import Subject
    from hadash.events import record_event

    from .models import VMInstance

    result: dict[str, list[str]] = {"stored": [], "unchanged": [], "foreign": [], "unknown": []}
    if not definitions:
        return result
    rows = {r["name"]: r for r in VMInstance.objects.filter(name__in=list(definitions))
            .values("id", "name", "host_id", "last_host_id")}
    with transaction.atomic():
        for name, (fmt, xml) in definitions.items():
            row = rows.get(name)
            if row is None:
                result["unknown"].append(name)
                continue
            if owner_id(row) != host.pk:
                result["foreign"].append(name)
                continue
            changed = VMInstance.objects.filter(pk=row["id"]).exclude(
                definition_format=fmt, definition_xml=xml).update(
                definition_format=fmt, definition_xml=xml, definition_time=now,
                definition_host=host, definition_by="")
            (result["stored"] if changed else result["unchanged"]).append(name)
        if result["stored"]:
            names = sorted(result["stored"])
            shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10
                                             else "")
            record_event(Subject.HOST, host, event="DefinitionsStored", field="definition",
                         new=str(len(names)), now=now,
                         message=f"Host {host.name}: stored the definition of "
                                 f"{len(names)} VM(s): {shown}")
    if result["foreign"]:
        log.info("host %s reported definitions of VMs it does not own, ignored: %s",
                 host.name, ", ".join(sorted(result["foreign"])[:20]))
    return result


def set_by_operator(vm, fmt: str, xml: str, *, by: str, now) -> bool:
    """An operator sets a VM's definition (API). Written with its event; returns
    whether it changed."""
    from hadash.choices import Subject
    from hadash.events import record_event

    from .models import VMInstance

    with transaction.atomic():
        changed = VMInstance.objects.filter(pk=vm.pk).exclude(
            definition_format=fmt, definition_xml=xml).update(
            definition_format=fmt, definition_xml=xml, definition_time=now,
            definition_host=None, definition_by=by[:150])
        if changed:
            who = f" by {by}" if by else ""
            record_event(Subject.VM, vm, event="DefinitionChanged", field="definition",
                         reason=by, now=now,
                         message=f"VM {vm.name}: definition set{who} ({len(xml)} characters)")
    return bool(changed)
