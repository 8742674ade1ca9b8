"""Acceptance scenarios (../shared/scenarios/README.md): load a YAML failure story,
run the real engine against an in-process simulated fleet on a virtual clock, and
check the expectations and the double-run invariant.

An operator action that hadash refuses (prepare-for-maintenance of a host already in
maintenance, a stop of an unknown VM, a bad configuration value…) is recorded with
its reason — a line in the output, and an `action:` expectation can check it — and
the scenario goes on, as it would for an operator; it never aborts the run
(docs/scenarios.md).

The runner drives exactly what production runs — agent connect/ping handling,
the monitor sweep, the HA workers, cleanup — through `hosts.agent.service`,
`hosts.liveness.monitor_step`, `hadash.ha.worker.worker_step` and
`hadash.ha.cleanup.cleanup_step`, with `fleet.sim` behind the transport interfaces.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hadash.clock import VirtualClock

HOST_EVENT = re.compile(
    r"^host (\S+) (power off|power on|agent stop|agent start|network off|network on|"
    r"disable|enable|maintenance|cancel-maintenance|bmc-off|start-fail (\d+))$"
)
BMC_EVENT = re.compile(r"^bmc (\S+) (fail|ok)$")
VM_EVENT = re.compile(r"^vm (\S+) (crash|vanish|stop|start|ha on|ha off)$")
# Operator actions on VMs (the others are faults of the simulated machines).
OPERATOR_VM_ACTIONS = ("stop", "start", "ha on", "ha off")
CONFIG_EVENT = re.compile(r"^config (\S+) (.+)$")
# R26: a cluster's own HA mode (`inherit`: the installation's again); an operator action.
CLUSTER_EVENT = re.compile(r"^cluster (\S+) ha-mode (\S+)$")

HOST_DEFAULTS = {"cluster": "c1", "cpus": 16, "memory_mb": 65536, "tags": []}
VM_DEFAULTS = {"cpus": 1, "memory_mb": 1024, "ha": False, "state": "Running",
               "priority": "medium"}
EXPECT_KEYS = {
    # R17: `ha_status` is the HA status code (vms.hastatus / hosts.hastatus); `cause`
    # the waiting cause of a VM whose code is `waiting` ("" otherwise).
    "vm": {"state", "power_state", "host", "host_not", "restarts", "ha_status", "cause"},
    # R28: `bmc_check` is `failing` while the host's bmc-check-failed alert is open,
    # else `ok`.
    "host": {"status", "resource_state", "ha_status", "bmc_check"},
    # R26: `reason` is the latest item's reason (`Observed` in observe mode).
    "work": {"step", "count", "reason"},
    "action": {"refused"},
    # R18/R19: the latest incident of host or VM N (``count``: how many it had).
    # R26/R27: `vms_observed` (VMs whose outcome is observed), `fenced` (fenced_at set).
    "incident": {"state", "vms_affected", "vms_restarted", "vms_failed", "alert", "count",
                 "vms_observed", "fenced"},
    # R19: alerts open now / opened so far (incident alerts and the others).
    "alerts_open": set(),
    "alerts": set(),
    # R22/R23: a cluster's stored failover capacity, and its failover-level alert
    # (`open`, `resolved`, `no alert`).
    "cluster": {"failover_capacity", "alert"},
}
# Expectations whose value is the expected count itself: `{at: 120, alerts_open: 0}`.
COUNT_KINDS = ("alerts_open", "alerts")
# Qualifiers pick the subject of an expectation; they are not checked themselves.
# `work: V, type: T` looks at V's work items of type T (default HA: the README's).
EXPECT_QUALIFIERS = {"work": {"type"}}
OPERATOR_HOST_ACTIONS = ("disable", "enable", "maintenance", "cancel-maintenance")
MAX_WORK_PER_SECOND = 10_000


class ScenarioError(ValueError):
    """The scenario file is malformed; the message says where."""


class Refused(Exception):
    """hadash refused an operator action (as it would refuse an operator); the message
    says why. The runner records it and goes on."""


def is_operator_action(do: str) -> bool:
    """Operator actions go through hadash and may be refused; faults act on the
    simulated machines and always happen."""
    if m := HOST_EVENT.match(do):
        return m.group(2) in OPERATOR_HOST_ACTIONS
    if m := VM_EVENT.match(do):
        return m.group(2) in OPERATOR_VM_ACTIONS
    return bool(CONFIG_EVENT.match(do) or CLUSTER_EVENT.match(do))


@dataclass
class ActionRecord:
    """One operator action as applied: outcome "done", "refused" (with hadash's
    reason) or "error" (hadash failed unexpectedly: the scenario fails)."""
    at: int
    do: str
    outcome: str
    message: str = ""


@dataclass
class Check:
    at: int
    kind: str
    name: str
    key: str
    expected: Any
    found: Any = None
    ok: bool | None = None
    work_type: str = "HA"

    def describe(self) -> str:
        if not self.name:
            return f"t={self.at} {self.key}={self.expected}"
        kind = self.kind if self.work_type == "HA" else f"{self.kind} ({self.work_type})"
        return f"t={self.at} {kind} {self.name} {self.key}={self.expected}"


@dataclass
class Result:
    path: str
    name: str
    checks: list[Check] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    actions: list[ActionRecord] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and not self.violations and all(c.ok for c in self.checks)
                and not any(a.outcome == "error" for a in self.actions))


# --- loading --------------------------------------------------------------------------

def load(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScenarioError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: a scenario is a mapping")
    for key in ("hosts",):
        if not isinstance(data.get(key), dict) or not data[key]:
            raise ScenarioError(f"{path}: '{key}' must be a non-empty mapping")
    data.setdefault("vms", {})
    data.setdefault("events", [])
    data.setdefault("expect", [])
    data.setdefault("config", {})
    data.setdefault("groups", {})
    _check_groups(path, data)
    for section in ("events", "expect"):
        if not isinstance(data[section], list):
            raise ScenarioError(f"{path}: '{section}' must be a list")
        for i, entry in enumerate(data[section]):
            if not isinstance(entry, dict) or not isinstance(entry.get("at"), int) \
                    or entry["at"] < 0:
                raise ScenarioError(f"{path}: {section}[{i}] needs a whole-second 'at' ≥ 0")
    for i, ev in enumerate(data["events"]):
        if not isinstance(ev.get("do"), str) or not (
            HOST_EVENT.match(ev["do"]) or BMC_EVENT.match(ev["do"])
            or VM_EVENT.match(ev["do"]) or CONFIG_EVENT.match(ev["do"])
            or CLUSTER_EVENT.match(ev["do"])
        ):
            raise ScenarioError(f"{path}: events[{i}]: unknown event {ev.get('do')!r}")
        if not is_operator_action(ev["do"]):
            # A fault acts on a simulated machine, which must exist; an operator
            # action naming an unknown host or VM is refused by hadash at run time.
            m = HOST_EVENT.match(ev["do"]) or BMC_EVENT.match(ev["do"])
            if m and m.group(1) not in {str(h) for h in data["hosts"]}:
                raise ScenarioError(f"{path}: events[{i}]: no host {m.group(1)!r} in 'hosts'")
            m = VM_EVENT.match(ev["do"])
            if m and m.group(1) not in {str(v) for v in data["vms"] or {}}:
                raise ScenarioError(f"{path}: events[{i}]: no VM {m.group(1)!r} in 'vms'")
    for i, ex in enumerate(data["expect"]):
        kind = kind_of(ex)
        if kind is None:
            raise ScenarioError(f"{path}: expect[{i}] names one of vm, host, work, action, "
                                "incident, cluster, alerts_open or alerts")
        if kind in COUNT_KINDS and (not isinstance(ex[kind], int) or ex[kind] < 0):
            raise ScenarioError(f"{path}: expect[{i}]: '{kind}' is a count ≥ 0")
        if kind == "action" and not isinstance(ex["action"], str):
            raise ScenarioError(f"{path}: expect[{i}]: 'action' is an event's 'do' text")
        if kind == "work" and "type" in ex:
            from hadash.choices import WorkType

            if ex["type"] not in WorkType.values:
                raise ScenarioError(f"{path}: expect[{i}]: work type must be one of "
                                    f"{', '.join(WorkType.values)}")
        extra = set(ex) - {"at", kind} - EXPECT_KEYS[kind] - EXPECT_QUALIFIERS.get(kind, set())
        if extra:
            raise ScenarioError(f"{path}: expect[{i}]: unknown key(s) {', '.join(sorted(extra))}")
    return data


def _check_groups(path, data: dict) -> None:
    """R25: `groups: {g1: {kind: anti-affinity, vms: [vm1, vm2]}}` — each a kind
    (`anti-affinity` or `affinity`) and VMs the scenario declares."""
    groups = data["groups"]
    if not isinstance(groups, dict):
        raise ScenarioError(f"{path}: 'groups' must be a mapping of group name to "
                            "{kind, vms}")
    declared = {str(v) for v in data["vms"] or {}}
    for name, spec in groups.items():
        if not isinstance(spec, dict) or spec.get("kind") not in ("anti-affinity", "affinity"):
            raise ScenarioError(f"{path}: groups.{name}: kind must be anti-affinity or affinity")
        vms = spec.get("vms", [])
        if not isinstance(vms, list):
            raise ScenarioError(f"{path}: groups.{name}: vms must be a list")
        unknown = [str(v) for v in vms if str(v) not in declared]
        if unknown:
            raise ScenarioError(f"{path}: groups.{name}: no VM {', '.join(unknown)} in 'vms'")


def kind_of(ex: dict) -> str | None:
    """`vm:` and `work:` name their subject; `host` (and `cluster`) are then
    attributes."""
    for kind in ("vm", "work", "incident", "host", "action", "cluster", *COUNT_KINDS):
        if kind in ex:
            return kind
    return None


def checks_of(data: dict) -> list[Check]:
    out = []
    for ex in data["expect"]:
        kind = kind_of(ex)
        if kind in COUNT_KINDS:
            out.append(Check(at=ex["at"], kind=kind, name="", key=kind, expected=ex[kind]))
            continue
        for key in sorted(EXPECT_KEYS[kind] & set(ex)):
            out.append(Check(at=ex["at"], kind=kind, name=str(ex[kind]), key=key,
                             expected=ex[key], work_type=str(ex.get("type", "HA"))))
    return out


# --- running ----------------------------------------------------------------------------

class Run:
    """One scenario against the current (fresh) database."""

    def __init__(self, data: dict, path: str):
        from fleet.sim import SimAgentClient, SimFleet, SimOobClient
        from hadash.ha.engine import Engine

        self.data = data
        self.result = Result(path=path, name=str(data.get("name", Path(path).stem)))
        self.clock = VirtualClock()
        self.fleet = SimFleet()
        self.engine = Engine(agents=SimAgentClient(self.fleet), oob=SimOobClient(self.fleet),
                             clock=self.clock, worker_id="scenario-worker")
        self.checks = checks_of(data)
        last = max([e["at"] for e in data["events"]] + [c.at for c in self.checks] + [0])
        self.until = int(data.get("until", last + 60))

    # set-up
    def setup(self) -> None:
        from hadash import config
        from hadash.ha import actions
        from hosts.models import Host
        from vms.choices import VmState
        from vms.models import VmGroup, VMInstance

        now = self.clock.now()
        for k, v in (self.data.get("config") or {}).items():
            config.set_value(k, v, now=now, by="scenario")
        for name, spec in self.data["hosts"].items():
            spec = {**HOST_DEFAULTS, **(spec or {})}
            tags = spec["tags"] if isinstance(spec["tags"], list) else [spec["tags"]]
            self.fleet.add_host(str(name), cluster=str(spec["cluster"]), cpus=int(spec["cpus"]),
                                memory_mb=int(spec["memory_mb"]), tags=[str(t) for t in tags])
        for name, spec in self.data["vms"].items():
            spec = {**VM_DEFAULTS, **(spec or {})}
            if spec["state"] == "Running":
                if not spec.get("host"):
                    raise ScenarioError(f"vm {name}: a Running VM needs a host")
                self.fleet.host(str(spec["host"])).vms[str(name)] = "PowerOn"
        for h in self.fleet.hosts.values():
            self.connect(h.name)
            Host.objects.filter(name=h.name).update(
                tags=",".join(h.tags), oobm_enabled=True, oobm_address=f"sim://{h.name}-bmc",
                oobm_system_id=h.name,
            )
        for name, spec in self.data["vms"].items():
            spec = {**VM_DEFAULTS, **(spec or {})}
            if spec["state"] == "Running":
                # The world as the scenario describes it: not an operator's
                # registration, so admission control (R23) is not asked.
                actions.register_vm(
                    name=str(name), host_name=str(spec["host"]), cpus=int(spec["cpus"]),
                    memory_mb=int(spec["memory_mb"]), ha_enabled=bool(spec["ha"]),
                    priority=str(spec["priority"]), now=now, admission=False,
                )
            else:
                VMInstance.objects.create(
                    name=str(name), state=spec["state"], cpus=int(spec["cpus"]),
                    memory_mb=int(spec["memory_mb"]), ha_enabled=bool(spec["ha"]),
                    priority=str(spec["priority"]),
                    last_host=Host.objects.filter(name=spec.get("host")).first(),
                )
                if spec["state"] not in VmState.values:
                    raise ScenarioError(f"vm {name}: unknown state {spec['state']!r}")
        for name, spec in (self.data.get("groups") or {}).items():
            group = VmGroup.objects.create(name=str(name), kind=spec["kind"])
            group.members.set(VMInstance.objects.filter(
                name__in=[str(v) for v in spec.get("vms", [])]))

    def connect(self, name: str) -> None:
        from hosts.agent.service import ConnectData, connect

        h = self.fleet.host(name)
        connect(ConnectData(
            name=h.name, type=h.type, hypervisor="Simulated", cluster=h.cluster, cpus=h.cpus,
            memory_mb=h.memory_mb, address=f"sim-{h.name}", agent_url=h.agent_url,
            vms=h.report(),
        ), now=self.clock.now())

    # the timeline
    def perform(self, do: str, t: int) -> None:
        """Apply one event of the timeline. An operator action that hadash refuses is
        recorded and the run goes on; so does one that fails unexpectedly (recorded
        as an error, which fails the scenario)."""
        import traceback

        if not is_operator_action(do):
            self.apply(do)
            return
        try:
            self.apply(do)
        except Refused as exc:
            self.result.actions.append(ActionRecord(t, do, "refused", str(exc)))
        except Exception as exc:  # a bug in hadash: report it, and see the rest
            self.result.actions.append(ActionRecord(
                t, do, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        else:
            self.result.actions.append(ActionRecord(t, do, "done"))

    def apply(self, do: str) -> None:
        """Apply one event now; an operator action that hadash refuses raises
        Refused (tests that drive a world call this directly)."""
        from hadash.config import ConfigError
        from hadash.ha.actions import ActionError

        try:
            self._apply(do)
        except (ActionError, ConfigError) as exc:
            raise Refused(str(exc)) from None

    def _apply(self, do: str) -> None:
        from hadash import config
        from hadash.ha import actions
        from hosts.models import Host
        from vms.models import VMInstance

        def host_named(name):
            host = Host.objects.filter(name=name).first()
            if host is None:
                raise Refused(f"unknown host {name!r}")
            return host

        now = self.clock.now()
        if m := HOST_EVENT.match(do):
            name, what = m.group(1), m.group(2)
            f = self.fleet
            if what == "power off":
                f.power_off(name)
            elif what == "power on":
                f.power_on(name)
                self.connect(name)
            elif what == "agent stop":
                f.agent_stop(name)
            elif what == "agent start":
                f.agent_start(name)
                if f.host(name).reachable:
                    self.connect(name)
            elif what == "network off":
                f.network(name, False)
            elif what == "network on":
                f.network(name, True)
            elif what.startswith("start-fail"):
                f.start_fail(name, int(m.group(3)))
            elif what == "bmc-off":
                f.bmc_reports_off(name)  # R27/R28: the BMC answers and reports Off
            else:
                host = host_named(name)
                if what in ("disable", "enable"):
                    actions.set_host_enabled(host, what == "enable", now=now, by="scenario")
                elif what == "maintenance":
                    actions.prepare_maintenance(host, now=now, by="scenario")
                else:
                    actions.cancel_maintenance(host, now=now, by="scenario")
        elif m := BMC_EVENT.match(do):
            self.fleet.bmc(m.group(1), m.group(2) == "ok")
        elif m := VM_EVENT.match(do):
            name, what = m.group(1), m.group(2)
            if what == "crash":
                self.fleet.vm_crash(name)
            elif what == "vanish":
                self.fleet.vm_vanish(name)
            else:
                vm = VMInstance.objects.filter(name=name).first()
                if vm is None:
                    raise Refused(f"unknown VM {name!r}")
                if what == "stop":
                    actions.stop_vm(vm, now=now, by="scenario")
                elif what == "start":
                    actions.start_vm(vm, engine=self.engine, by="scenario")
                else:  # ha on / ha off (R23: admission may refuse "ha on")
                    actions.set_vm_ha(vm, what == "ha on", now=now, by="scenario")
        elif m := CLUSTER_EVENT.match(do):
            from hadash.ha import modes

            mode = "" if m.group(2) == "inherit" else m.group(2)
            modes.set_mode(mode, cluster=m.group(1), now=now, by="scenario")
        elif m := CONFIG_EVENT.match(do):
            config.set_value(m.group(1), m.group(2), now=now, by="scenario")

    def pings(self, t: int) -> None:
        from hadash import config
        from hosts.agent.service import ping
        from hosts.models import Host

        interval = config.get("ping.interval")
        if t % interval:
            return
        for h in self.fleet.hosts.values():
            if h.reachable:
                host = Host.objects.get(name=h.name)
                ping(host, h.report(), now=self.clock.now())

    def engine_second(self) -> None:
        from hadash import config
        from hadash.ha.cleanup import cleanup_step
        from hadash.ha.worker import worker_step
        from hosts.liveness import monitor_step

        cfg = config.snapshot()
        monitor_step(self.engine, cfg)
        for _ in range(MAX_WORK_PER_SECOND):
            if not worker_step(self.engine, cfg):
                break
        cleanup_step(self.engine, cfg=cfg)

    def second(self, t: int) -> None:
        """Everything that happens at virtual second ``t``: events first, then pings,
        then the engine; then the invariant and the expectations due at ``t``."""
        self.clock.set(t)
        for ev in self.data["events"]:
            if ev["at"] == t:
                self.perform(ev["do"], t)
        self.pings(t)
        self.engine_second()
        for vm, hosts in self.fleet.double_runs().items():
            self.result.violations.append(
                f"t={t} invariant: VM {vm} powered on on {', '.join(hosts)} at once"
            )
        for c in self.checks:
            if c.at == t:
                self.check(c)
        self.t = t

    def advance_to(self, t: int) -> None:
        """Run every second up to and including ``t`` (tests drive the engine so)."""
        start = getattr(self, "t", -1) + 1
        for s in range(start, t + 1):
            self.second(s)

    def next_second(self, t: int) -> int:
        """The next second after ``t`` at which anything can happen: an event, an
        expectation, a ping, or the engine having something due (hadash.ha.due).
        Seconds in between would run sweeps and worker steps that do nothing."""
        import math

        from hadash import config
        from hadash.ha.due import next_due

        cfg = config.snapshot()
        interval = cfg["ping.interval"]
        marks = [e["at"] for e in self.data["events"] if e["at"] > t]
        marks += [c.at for c in self.checks if c.at > t]
        marks.append((t // interval + 1) * interval)
        due = next_due(self.clock.now(), cfg)
        # R28: the BMC check round keeps its schedule in the engine, not the database.
        bmc = self.engine.bmc_checks.next_due(self.clock.now())
        if bmc is not None:
            due = min(due, max(bmc, self.clock.now()))
        marks.append(math.ceil((due - self.clock.epoch).total_seconds()))
        return max(t + 1, min(marks))

    def run(self, every_second: bool = False) -> Result:
        self.data["events"] = sorted(self.data["events"], key=lambda e: e["at"])
        self.setup()
        if every_second:
            self.advance_to(self.until)
        else:
            t = 0
            while t <= self.until:
                self.second(t)
                t = self.next_second(t)
        self.result.checks = self.checks
        return self.result

    # expectations
    def found_incident(self, c: Check):
        """R18/R19 expectations: alert counts, or the latest incident of host/VM N."""
        from hadash.choices import AlertState
        from hadash.models import Alert

        if c.kind == "alerts_open":
            return Alert.objects.filter(state=AlertState.OPEN).count()
        if c.kind == "alerts":
            return Alert.objects.count()
        incidents = _latest_incident(c.name)
        if c.key == "count":
            return incidents.count()
        inc = incidents.order_by("-id").first()
        if inc is None:
            return "no incident"
        if c.key == "alert":
            alert = Alert.objects.filter(incident=inc).first()
            return alert.state if alert else "no alert"
        if c.key == "fenced":
            return inc.fenced_at is not None
        if c.key == "vms_observed":
            return inc.vms.filter(outcome="observed").count()
        return getattr(inc, c.key)

    def found_cluster(self, c: Check):
        """R22/R23: the stored failover plan's capacity (as the engine keeps it), or
        the cluster's failover-level alert."""
        from clusters.admission import ALERT_KIND
        from clusters.models import FailoverPlan
        from hadash.models import Alert

        if c.key == "alert":
            alert = (Alert.objects.filter(kind=ALERT_KIND, subject_name=c.name)
                     .order_by("-id").first())
            return alert.state if alert else "no alert"
        plan = FailoverPlan.objects.filter(cluster=c.name).first()
        return plan.capacity if plan else "no plan"

    def check(self, c: Check) -> None:
        from hadash.models import Event, HaWork
        from hosts.models import Host
        from vms.models import VMInstance

        if c.kind in COUNT_KINDS or c.kind == "incident":
            c.found = self.found_incident(c)
            c.ok = c.found == c.expected
            return
        if c.kind == "cluster":
            c.found = self.found_cluster(c)
            c.ok = c.found == c.expected
            return
        if c.kind == "action":
            done = [a for a in self.result.actions if a.do == c.name and a.at <= c.at]
            if not done:
                c.found, c.ok = "not applied", False
                return
            c.found = done[-1].outcome == "refused"
            c.ok = c.found == c.expected
            return
        if c.kind == "vm":
            vm = VMInstance.objects.select_related("host").filter(name=c.name).first()
            if vm is None:
                c.found, c.ok = "no such VM", False
                return
            if c.key in ("ha_status", "cause"):
                from vms import hastatus

                status = hastatus.status_of(vm, now=self.clock.now())
                c.found = status.code if c.key == "ha_status" else str(status.cause)
            elif c.key == "restarts":
                c.found = Event.objects.filter(vm=vm, event="HaStarted").count()
            elif c.key in ("host", "host_not"):
                c.found = vm.host.name if vm.host else None
            else:
                c.found = getattr(vm, c.key)
            if c.key == "host_not":
                c.ok = c.found != c.expected
            else:
                c.ok = c.found == c.expected
        elif c.kind == "host":
            host = Host.objects.filter(name=c.name).first()
            if host is not None and c.key == "ha_status":
                from hosts import hastatus

                c.found = hastatus.status_of(host, now=self.clock.now()).code
            elif host is not None and c.key == "bmc_check":
                from hosts import hastatus

                c.found = "failing" if host.name in hastatus.bmc_failures([host.name]) \
                    else "ok"
            else:
                c.found = getattr(host, c.key) if host else "no such host"
            c.ok = c.found == c.expected
        else:
            items = HaWork.objects.filter(instance__name=c.name, type=c.work_type)
            if c.key == "count":
                c.found = items.count()
            else:
                latest = items.order_by("-id").first()
                c.found = getattr(latest, c.key) if latest else None
            c.ok = c.found == c.expected


def _latest_incident(name: str):
    from django.db.models import Q

    from hadash.models import Incident

    return Incident.objects.filter(Q(kind="host", host_name=name) | Q(kind="vm", vm_name=name))


def fmt_time(t: dt.timedelta) -> str:
    return f"{t.total_seconds():.2f}s"
