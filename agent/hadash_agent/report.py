"""The power report and which definitions still have to reach the server.

A definition is sent on connect and then whenever it changes (compared by hash). It
counts as delivered only once the server answered the message that carried it, so a
report lost with a dropped connection is sent again. Messages stay well below the
server's 4 MiB limit: what does not fit goes in the next report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from .hypervisor import Domain, digest

DEFINITION_FORMAT = "libvirt-xml"
DEFINITION_BUDGET = 2 * 1024 * 1024  # bytes of definitions per message


class Definitions:
    def __init__(self) -> None:
        self.current: dict[str, tuple[str, str]] = {}  # name → (hash, xml)
        self.delivered: dict[str, str] = {}  # name → hash the server has
        self.refused: dict[str, str] = {}  # name → hash the server would not take

    def known(self) -> set[str]:
        return set(self.current)

    def update(self, definitions: dict[str, str]) -> list[str]:
        """Record the XML read from libvirt; the names whose definition changed."""
        changed = []
        for name, xml in definitions.items():
            h = digest(xml)
            old = self.current.get(name)
            if old is None or old[0] != h:
                self.current[name] = (h, xml)
                if old is not None:
                    changed.append(name)
        return changed

    def retain(self, names: Iterable[str]) -> None:
        """Forget domains that no longer exist."""
        keep = set(names)
        for table in (self.current, self.delivered, self.refused):
            for name in [n for n in table if n not in keep]:
                del table[name]

    def resend_all(self) -> None:
        """After a (re)connect: the server gets every definition again."""
        self.delivered.clear()

    def pending(self, budget: int = DEFINITION_BUDGET) -> dict[str, tuple[str, str]]:
        """Definitions the server does not have yet, at most ``budget`` bytes."""
        out: dict[str, tuple[str, str]] = {}
        used = 0
        for name, (h, xml) in sorted(self.current.items()):
            if self.delivered.get(name) == h or self.refused.get(name) == h:
                continue
            if out and used + len(xml) > budget:
                break
            out[name] = (h, xml)
            used += len(xml)
        return out

    def mark_delivered(self, sent: dict[str, tuple[str, str]]) -> None:
        for name, (h, _xml) in sent.items():
            self.delivered[name] = h

    def mark_refused(self, sent: dict[str, tuple[str, str]]) -> None:
        for name, (h, _xml) in sent.items():
            self.refused[name] = h


def entries(domains: Iterable[Domain],
            definitions: dict[str, tuple[str, str]] | None = None) -> list[dict]:
    """The ``vms`` of a connect or ping (PROTOCOL.md), with ``definition`` on the
    entries whose definition is being sent."""
    definitions = definitions or {}
    result = []
    for d in domains:
        entry: dict = {"name": d.name, "power_state": d.power_state}
        if d.name in definitions:
            entry["definition"] = {"format": DEFINITION_FORMAT, "xml": definitions[d.name][1]}
        result.append(entry)
    return result


def size(message: dict) -> int:
    return len(json.dumps(message))
