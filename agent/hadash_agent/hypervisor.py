"""The libvirt side of the agent: what runs here, and the actions on it.

Blocking code (libvirt calls are blocking): the agent runs it in worker threads. One
libvirt connection serves everything — reports, events and actions — which also suits
libvirt's test driver, whose state is private to one connection.

Lifecycle events come from libvirt's default event loop, run in a daemon thread
(``virEventRegisterDefaultImpl`` must precede the first ``open``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import libvirt

from .config import NAME_RE

log = logging.getLogger("hadash_agent")

POWER_ON = "PowerOn"
POWER_OFF = "PowerOff"

# Shut off or crashed is PowerOff; everything else libvirt lists (running, paused,
# blocked, shutting down, pm-suspended) is a domain whose guest is still in memory.
OFF_STATES = frozenset({libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_CRASHED})

# The definition another host needs: the persistent configuration (not the live one,
# which carries the run's id, device aliases and ports), without what libvirt adds for
# this host only (MIGRATABLE). Secrets are left out (no VIR_DOMAIN_XML_SECURE).
DEFINITION_FLAGS = libvirt.VIR_DOMAIN_XML_INACTIVE | libvirt.VIR_DOMAIN_XML_MIGRATABLE

EVENTS = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: "defined",
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: "undefined",
    libvirt.VIR_DOMAIN_EVENT_STARTED: "started",
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
    libvirt.VIR_DOMAIN_EVENT_RESUMED: "resumed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED: "stopped",
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: "shutting down",
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "suspended (power management)",
    libvirt.VIR_DOMAIN_EVENT_CRASHED: "crashed",
}
STOPPED_DETAILS = {
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: "shut down",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_DESTROYED: "destroyed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_MIGRATED: "migrated away",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_SAVED: "saved",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED: "failed",
    libvirt.VIR_DOMAIN_EVENT_STOPPED_FROM_SNAPSHOT: "reverted to a snapshot",
}

# libvirt errors that mean "this hypervisor cannot do that" (→ 501).
UNSUPPORTED = frozenset({libvirt.VIR_ERR_NO_SUPPORT, libvirt.VIR_ERR_ARGUMENT_UNSUPPORTED})
# libvirt errors about the request in this state (→ 409).
CONFLICT = frozenset({libvirt.VIR_ERR_OPERATION_INVALID, libvirt.VIR_ERR_DOM_EXIST})
# libvirt errors about the XML (→ 400).
BAD_XML = frozenset({
    libvirt.VIR_ERR_XML_ERROR, libvirt.VIR_ERR_XML_DETAIL, libvirt.VIR_ERR_CONFIG_UNSUPPORTED,
    libvirt.VIR_ERR_INVALID_ARG,
})


class ActionError(Exception):
    """An action that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.message = message
        self.status = status


class Unavailable(ActionError):
    """No working libvirt connection."""

    def __init__(self, message: str):
        super().__init__(message, 503)


def power_state(state: int) -> str:
    return POWER_OFF if state in OFF_STATES else POWER_ON


def digest(xml: str) -> str:
    return hashlib.sha256(xml.encode()).hexdigest()


def libvirt_message(exc: libvirt.libvirtError) -> str:
    return (exc.get_error_message() or str(exc)).strip()


def action_error(what: str, exc: libvirt.libvirtError) -> ActionError:
    code = exc.get_error_code()
    message = f"{what}: libvirt: {libvirt_message(exc)}"
    if code in UNSUPPORTED:
        return ActionError(message, 501)
    if code in CONFLICT or (code == libvirt.VIR_ERR_OPERATION_FAILED
                            and "already exists" in message):
        return ActionError(message, 409)
    if code in BAD_XML:
        return ActionError(message, 400)
    return ActionError(message, 500)


# --- definitions ----------------------------------------------------------------


def parse_definition(xml: str, name: str) -> ET.Element:
    """The ``<domain>`` of a definition for VM ``name``, or ActionError(400)."""
    if "<!DOCTYPE" in xml or "<!ENTITY" in xml:
        raise ActionError("definition: a DOCTYPE or ENTITY is not allowed", 400)
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise ActionError(f"definition is not well-formed XML: {exc}", 400) from None
    if root.tag != "domain":
        raise ActionError(f"definition must be a <domain>, not <{root.tag}>", 400)
    defined = (root.findtext("name") or "").strip()
    if defined != name:
        raise ActionError(f"definition names the domain {defined!r}, not {name!r}", 400)
    return root


def disk_sources(root: ET.Element) -> list[tuple[str, str]]:
    """(kind, where) for every disk of a domain definition that must exist on this
    host: ("path", "/var/lib/…") for file, block and dir disks, ("volume",
    "pool/volume") for storage-pool volumes. Empty drives, optional sources and network
    disks (rbd, iscsi, nbd… reached over the network, not checkable here) are left out."""
    wanted = []
    for disk in root.iterfind("./devices/disk"):
        source = disk.find("source")
        if source is None or source.get("startupPolicy") == "optional":
            continue
        kind = disk.get("type", "file")
        if kind in ("file", "block", "dir"):
            path = source.get({"file": "file", "block": "dev", "dir": "dir"}[kind])
            if path:
                wanted.append(("path", path))
        elif kind == "volume" and source.get("pool") and source.get("volume"):
            wanted.append(("volume", f"{source.get('pool')}/{source.get('volume')}"))
    return wanted


def missing_disks(root: ET.Element, conn: libvirt.virConnect | None = None,
                  exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """The disks of a definition this host does not have."""
    missing = []
    for kind, where in disk_sources(root):
        if kind == "path":
            if not exists(where):
                missing.append(where)
            continue
        pool_name, _, volume = where.partition("/")
        try:
            if conn is None:
                raise libvirt.libvirtError("no connection")
            path = conn.storagePoolLookupByName(pool_name).storageVolLookupByName(volume).path()
        except libvirt.libvirtError:
            missing.append(f"volume {where}")
            continue
        if path.startswith("/") and not exists(path):
            missing.append(path)
    return missing


# --- event loop -------------------------------------------------------------------

_event_loop_lock = threading.Lock()
_event_loop_started = False


def start_event_loop() -> None:
    """libvirt's default event loop in a daemon thread (once per process), before any
    connection is opened. Also keeps libvirt from printing every error on stderr."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                if libvirt.virEventRunDefaultImpl() < 0:
                    time.sleep(0.1)

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


# --- the hypervisor -----------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    name: str
    power_state: str


class Hypervisor:
    """One libvirt connection, reopened when it dies.

    ``on_event(name, text)`` is called from libvirt's event thread for every lifecycle
    event; it must be quick and thread-safe."""

    def __init__(self, uri: str, on_event: Callable[[str, str], None] | None = None):
        self.uri = uri
        self.on_event = on_event
        self._conn: libvirt.virConnect | None = None
        self._lock = threading.RLock()
        self._reported_bad_names: set[str] = set()
        self.last_error = ""

    # --- connection -------------------------------------------------------------
    def conn(self) -> libvirt.virConnect:
        with self._lock:
            if self._conn is not None:
                try:
                    if self._conn.isAlive():
                        return self._conn
                except libvirt.libvirtError:
                    pass
                log.warning("libvirt: connection to %s lost; reconnecting", self.uri)
                self._drop()
            start_event_loop()
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                self.last_error = libvirt_message(exc)
                raise Unavailable(f"libvirt unavailable at {self.uri}: {self.last_error}") from None
            self._setup(conn)
            self._conn = conn
            self.last_error = ""
            return conn

    def _setup(self, conn: libvirt.virConnect) -> None:
        try:
            conn.setKeepAlive(5, 3)  # notice a dead libvirtd within ~20 s
        except libvirt.libvirtError:
            pass  # local drivers (test://) have no keepalive
        try:
            conn.registerCloseCallback(self._closed, None)
        except libvirt.libvirtError:
            pass
        if self.on_event is not None:
            conn.domainEventRegisterAny(
                None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._lifecycle, None
            )
        try:
            version = conn.getLibVersion()
            driver = conn.getType()
        except libvirt.libvirtError:
            version, driver = 0, "?"
        log.info("libvirt: connected to %s (driver %s, libvirt %d.%d.%d)", self.uri, driver,
                 version // 1_000_000, version // 1000 % 1000, version % 1000)

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except libvirt.libvirtError:
                pass

    def _closed(self, _conn, reason: int, _opaque) -> None:
        log.warning("libvirt: connection to %s closed (reason %d)", self.uri, reason)

    def _lifecycle(self, _conn, dom, event: int, detail: int, _opaque) -> None:
        text = EVENTS.get(event, f"event {event}")
        if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
            text = f"stopped ({STOPPED_DETAILS.get(detail, detail)})"
        try:
            name = dom.name()
        except libvirt.libvirtError:
            return
        if self.on_event is not None:
            self.on_event(name, text)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def health(self) -> tuple[bool, str]:
        try:
            self.conn().getLibVersion()
        except (Unavailable, libvirt.libvirtError) as exc:
            message = exc.message if isinstance(exc, Unavailable) else libvirt_message(exc)
            return False, message
        return True, ""

    def node(self) -> tuple[int, int]:
        """(cpus, memory in MiB) of this host."""
        info = self.conn().getInfo()
        return int(info[2]), int(info[1])

    # --- the report ---------------------------------------------------------------
    def domains(self) -> list[Domain]:
        """Every domain libvirt knows, with its power state, in one libvirt call. A
        transient domain that stopped no longer exists, so it is not listed."""
        conn = self.conn()
        try:
            stats = conn.getAllDomainStats(libvirt.VIR_DOMAIN_STATS_STATE)
            pairs = [(dom.name(), int(values.get("state.state", 0))) for dom, values in stats]
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in UNSUPPORTED:
                raise Unavailable(f"libvirt: cannot list domains: {libvirt_message(exc)}") from None
            try:
                pairs = [(d.name(), d.state()[0]) for d in conn.listAllDomains(0)]
            except libvirt.libvirtError as exc2:
                raise Unavailable(
                    f"libvirt: cannot list domains: {libvirt_message(exc2)}"
                ) from None
        result = []
        for name, state in pairs:
            if not NAME_RE.fullmatch(name):
                if name not in self._reported_bad_names:
                    self._reported_bad_names.add(name)
                    log.warning("libvirt: domain %r is not reported: hadash does not accept "
                                "that name", name)
                continue
            result.append(Domain(name, power_state(state)))
        return result

    def definitions(self, names: Iterable[str]) -> dict[str, str]:
        """The definition (libvirt XML) of each named domain that still exists."""
        conn = self.conn()
        result = {}
        for name in names:
            try:
                result[name] = conn.lookupByName(name).XMLDesc(DEFINITION_FLAGS)
            except libvirt.libvirtError as exc:
                if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    continue
                if exc.get_error_code() in UNSUPPORTED | {libvirt.VIR_ERR_INVALID_ARG}:
                    try:
                        result[name] = conn.lookupByName(name).XMLDesc(0)
                    except libvirt.libvirtError:
                        pass
                    continue
                raise Unavailable(f"libvirt: cannot read {name}: {libvirt_message(exc)}") from None
        return result

    # --- single domains -------------------------------------------------------------
    def lookup(self, name: str) -> libvirt.virDomain | None:
        try:
            return self.conn().lookupByName(name)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise action_error(f"look up {name}", exc) from None

    def power_of(self, name: str) -> str | None:
        dom = self.lookup(name)
        if dom is None:
            return None
        try:
            return power_state(dom.state()[0])
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise action_error(f"state of {name}", exc) from None

    def start(self, name: str, xml: str | None) -> str:
        """Start ``name``: from ``xml`` (its definition) if given, else the domain
        already defined here. A domain defined here is redefined from ``xml`` and
        started; otherwise the definition is started as a transient domain (the host
        forgets it when it stops: nothing is left behind to start twice). Returns what
        was done, for the log. Refused (409) when a disk is missing on this host."""
        root = parse_definition(xml, name) if xml is not None else None
        conn = self.conn()
        dom = self.lookup(name)
        try:
            if dom is not None and dom.isActive():
                return "already running"
            if root is None:
                if dom is None:
                    raise ActionError(
                        f"no domain named {name} on this host and no definition was sent", 409
                    )
                root = ET.fromstring(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
            missing = missing_disks(root, conn)
            if missing:
                raise ActionError(f"disk {missing[0]} missing on this host", 409)
            if dom is not None:
                if xml is not None:
                    dom = conn.defineXML(xml)
                dom.create()
                return "started (persistent domain)" if xml is None else \
                    "started (persistent domain, redefined from the definition)"
            conn.createXML(xml, 0)
            return "started from the definition (transient domain)"
        except libvirt.libvirtError as exc:
            raise action_error(f"start {name}", exc) from None

    def stop(self, name: str, force: bool = True, timeout: float = 60.0) -> str:
        """Stop ``name`` and forget it: destroy (force) or shut down gracefully, then
        undefine a persistent domain (a transient one is gone once stopped)."""
        dom = self.lookup(name)
        if dom is None:
            raise ActionError(f"no domain named {name} on this host", 404)
        try:
            persistent = bool(dom.isPersistent())
            if dom.isActive():
                if force:
                    dom.destroy()
                else:
                    dom.shutdown()
                    deadline = time.monotonic() + timeout
                    while self._active(dom) and time.monotonic() < deadline:
                        time.sleep(0.2)
                    if self._active(dom):
                        raise ActionError(
                            f"{name} did not shut down within {timeout:.0f} s; "
                            "stop it with force", 409)
            if persistent:
                self._undefine(dom)
            return "destroyed" if force else "shut down"
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return "gone"
            raise action_error(f"stop {name}", exc) from None

    @staticmethod
    def _active(dom: libvirt.virDomain) -> bool:
        try:
            return bool(dom.isActive())
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise

    @staticmethod
    def _undefine(dom: libvirt.virDomain) -> None:
        # Keep NVRAM: on shared storage it is the VM's, and another host may need it.
        flags = (libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                 | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                 | libvirt.VIR_DOMAIN_UNDEFINE_KEEP_NVRAM)
        try:
            dom.undefineFlags(flags)
        except libvirt.libvirtError as exc:
            if exc.get_error_code() not in UNSUPPORTED | {libvirt.VIR_ERR_INVALID_ARG}:
                raise
            dom.undefine()

    def destroy_only(self, name: str) -> None:
        """Test hook: stop ``name`` behind hadash's back (plain destroy)."""
        dom = self.lookup(name)
        if dom is None:
            raise ActionError(f"no domain named {name} on this host", 404)
        try:
            dom.destroy()
        except libvirt.libvirtError as exc:
            raise action_error(f"destroy {name}", exc) from None

    def define(self, xml: str) -> str:
        """Test hook: define (or redefine) a domain behind hadash's back."""
        try:
            return self.conn().defineXML(xml).name()
        except libvirt.libvirtError as exc:
            raise action_error("define", exc) from None

    def migrate(self, name: str, dconnuri: str, data_uri: str = "") -> None:
        """Live peer-to-peer migration of ``name`` to the libvirt at ``dconnuri``. A
        persistent domain stays persistent there and is undefined here."""
        dom = self.lookup(name)
        if dom is None:
            raise ActionError(f"no domain named {name} on this host", 404)
        try:
            if not dom.isActive():
                raise ActionError(f"{name} is not running: there is nothing to migrate live",
                                  409)
            flags = libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
            if dom.isPersistent():
                flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
            params = {libvirt.VIR_MIGRATE_PARAM_URI: data_uri} if data_uri else {}
            dom.migrateToURI3(dconnuri, params, flags)
        except libvirt.libvirtError as exc:
            raise action_error(f"migrate {name} to {dconnuri}", exc) from None
