"""The failover plan (R22): per cluster, where each HA VM of each host would restart if
that host failed, and which would not fit; the cluster's failover capacity — the
largest k (up to 3) such that any k hosts may fail and every HA VM still fits.

Computed with the very placement code HA uses (vms.placement: R13 filters, R24 order,
each placement of a batch seeing the ones before it) on a **copy** of the state:
`load` reads hosts, VMs and the configuration in a fixed number of queries; `compute`,
`simulate` and `what_if` are pure functions of that copy and never touch the database.

How a failure is simulated, as the engine would handle it: the failed hosts are no
longer targets; their HA VMs (R9: ha_enabled or force.ha, and vm.ha.enabled) are placed
one at a time in the engine's restart order (R10/R11: system VMs, then priority high →
low, then name) on the cluster's Up, Enabled hosts with `ha=True` (ha.tag), each seeing
the ones before it; their other VMs are simply gone. Groups (R25) are honoured as HA
honours them: a VM never lands where another member of one of its anti-affinity groups
is (as the plan stands: members already placed in this scenario count where they were
placed), and prefers a host with a member of one of its affinity groups.

Capacity for k ≥ 2 (the approximation): every combination of k failing hosts is tried
when there are at most COMBINATIONS of them; otherwise the combinations of the hosts
with the most HA load (the largest share of the cluster's HA cpus or memory on them),
as many of them as keep the count within COMBINATIONS. A cluster too big for an
exhaustive check may thus report a k that some unusual pair or triple of lightly
loaded hosts would break; the single-host plan (k = 1) is always exhaustive.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from dataclasses import dataclass, field

from hosts.choices import HostStatus, ResourceState

from .choices import ACTIVE_STATES, PRIORITY_RANK, SYSTEM_VM_TYPES, GroupKind, VmState
from .placement import Pool, Room

MAX_CAPACITY = 3
COMBINATIONS = 300
# Hosts that have failed already: they are not failed again in the plan.
GONE = (HostStatus.DOWN, HostStatus.REMOVED)


def _cfg(cfg, name, default):
    try:
        return cfg[name]
    except Exception:  # a key another release adds (ha.failover.level, R22/R23)
        return default


# --- the copy --------------------------------------------------------------------------

@dataclass(slots=True)
class HostCopy:
    id: int
    name: str
    status: str
    resource_state: str
    cpus: int
    memory_mb: int
    tags: tuple[str, ...]

    @property
    def target(self) -> bool:
        """R13: may receive VMs."""
        return self.status == HostStatus.UP and self.resource_state == ResourceState.ENABLED


@dataclass(slots=True)
class VmCopy:
    id: int
    name: str
    host_id: int
    cpus: int
    memory_mb: int
    ha: bool   # restarted by HA if its host fails (R9, with the configuration)
    rank: int  # R11 order: 0 system, 1 high, 2 medium, 3 low


@dataclass
class ClusterState:
    """What the plan needs of one cluster, copied out of the database."""
    name: str
    hosts: list[HostCopy]
    vms: list[VmCopy]   # VMs occupying capacity on the cluster's hosts
    ha_tag: str = ""
    level: int = 1
    # R25: vm id → [(group name, kind, member ids)] for the VMs in a group.
    groups: dict = field(default_factory=dict)
    _pool: Pool | None = field(default=None, repr=False)
    _home: dict | None = field(default=None, repr=False)
    _by_host: dict | None = field(default=None, repr=False)
    _names: dict | None = field(default=None, repr=False)
    _ha_load: dict | None = field(default=None, repr=False)

    def names(self) -> dict[int, str]:
        if self._names is None:
            self._names = {h.id: h.name for h in self.hosts}
        return self._names

    def pool(self) -> Pool:
        """The cluster's targets as a placement pool (shared; scenarios fork it)."""
        if self._pool is None:
            used: dict[int, list[int]] = {}
            for v in self.vms:
                u = used.setdefault(v.host_id, [0, 0])
                u[0] += v.cpus
                u[1] += v.memory_mb
            rooms = []
            for h in self.hosts:
                if h.target:
                    c, m = used.get(h.id, (0, 0))
                    rooms.append(Room(h.id, h.name, h.cpus, h.memory_mb, c, m, h.tags))
            self._pool = Pool(rooms)
        return self._pool

    def ha_vms_by_host(self) -> dict[int, list[VmCopy]]:
        """Each host's HA VMs in restart order (R10/R11)."""
        if self._by_host is None:
            by: dict[int, list[VmCopy]] = {}
            for v in self.vms:
                if v.ha:
                    by.setdefault(v.host_id, []).append(v)
            for lst in by.values():
                lst.sort(key=lambda v: (v.rank, v.name))
            self._by_host = by
        return self._by_host

    def home(self) -> dict[int, int]:
        """Where each VM of the copy is: {vm id: host id}."""
        if self._home is None:
            self._home = {v.id: v.host_id for v in self.vms}
        return self._home

    def group_hosts(self, vm_id: int, where: dict) -> tuple[frozenset, frozenset]:
        """(hosts to avoid, hosts to prefer) for ``vm_id`` by its groups (R25), the
        other members counted where ``where`` (this scenario's placements; None: did
        not fit) or else the copy puts them."""
        avoid, prefer = set(), set()
        home = self.home()
        for _name, kind, members in self.groups.get(vm_id, ()):
            for m in members:
                if m == vm_id:
                    continue
                h = where[m] if m in where else home.get(m)
                if h is None:
                    continue
                (avoid if kind == GroupKind.ANTI_AFFINITY else prefer).add(h)
        return frozenset(avoid), frozenset(prefer)

    def failable(self) -> list[HostCopy]:
        """Hosts that may still fail: every host not already Down or Removed."""
        return [h for h in self.hosts if h.status not in GONE]

    def host_named(self, name: str) -> HostCopy | None:
        for h in self.hosts:
            if h.name == name:
                return h
        return None


def vm_rank(vm_type: str, priority: str) -> int:
    if vm_type in SYSTEM_VM_TYPES:
        return 0
    return 1 + PRIORITY_RANK.get(priority, 1)


def load(clusters=None, *, cfg=None) -> dict[str, ClusterState]:
    """Copy the state of ``clusters`` (all when None) out of the database: two queries
    plus the configuration's one, and two for the VM groups (R25)."""
    from hadash import config
    from hosts.models import Host

    from .models import VMInstance

    if cfg is None:
        cfg = config.snapshot()
    ha_tag = _cfg(cfg, "ha.tag", "")
    level = int(_cfg(cfg, "ha.failover.level", 1))
    master = bool(_cfg(cfg, "vm.ha.enabled", True))
    force = bool(_cfg(cfg, "force.ha", False))
    hosts = Host.objects.all()
    if clusters is not None:
        hosts = hosts.filter(cluster__in=list(clusters))
    states: dict[str, ClusterState] = {}
    cluster_of: dict[int, ClusterState] = {}
    for hid, name, cluster, status, rstate, cpus, mem, tags in hosts.values_list(
            "id", "name", "cluster", "status", "resource_state", "cpus", "memory_mb", "tags"):
        st = states.get(cluster)
        if st is None:
            st = states[cluster] = ClusterState(cluster, [], [], ha_tag=ha_tag, level=level)
        st.hosts.append(HostCopy(hid, name, status, rstate, cpus, mem,
                                 tuple(t.strip() for t in tags.split(",") if t.strip())))
        cluster_of[hid] = st
    vms = VMInstance.objects.filter(state__in=ACTIVE_STATES, host__isnull=False)
    if clusters is not None:
        vms = vms.filter(host__cluster__in=list(clusters))
    for vid, name, host_id, cpus, mem, ha_enabled, vtype, prio in vms.values_list(
            "id", "name", "host_id", "cpus", "memory_mb", "ha_enabled", "type", "priority"):
        st = cluster_of.get(host_id)
        if st is not None:
            st.vms.append(VmCopy(vid, name, host_id, cpus, mem,
                                 master and (ha_enabled or force), vm_rank(vtype, prio)))
    for st in states.values():
        st.hosts.sort(key=lambda h: h.name)
    _load_groups(states)
    return states


def _load_groups(states: dict[str, ClusterState]) -> None:
    """R25: each copied VM's groups, with their members' ids."""
    from .models import VmGroup

    rows = list(VmGroup.members.through.objects.values_list("vmgroup_id", "vminstance_id"))
    if not rows:
        return
    kinds = {g: (n, k) for g, n, k in VmGroup.objects.values_list("id", "name", "kind")}
    members: dict[int, list[int]] = {}
    for gid, vid in rows:
        members.setdefault(gid, []).append(vid)
    of_vm: dict[int, list[int]] = {}
    for gid, vid in rows:
        of_vm.setdefault(vid, []).append(gid)
    for st in states.values():
        for v in st.vms:
            for gid in of_vm.get(v.id, ()):
                name, kind = kinds[gid]
                st.groups.setdefault(v.id, []).append((name, kind, tuple(members[gid])))


def fingerprints(*, cfg) -> dict[str, str]:
    """A cheap signature of each cluster's capacity state (two aggregate-sized queries):
    hosts' status, resource_state, capacity and tags; the count, size, placement, HA flag
    and update counters of the VMs occupying capacity per host; the configuration the
    plan depends on. A change in any of these changes the cluster's fingerprint."""
    from django.db.models import Count, Q, Sum

    from hosts.models import Host

    from .models import VMInstance

    per_host = {
        r["host_id"]: r for r in VMInstance.objects.filter(
            state__in=ACTIVE_STATES, host__isnull=False,
        ).values("host_id").annotate(
            n=Count("id"), c=Sum("cpus"), m=Sum("memory_mb"), u=Sum("update_count"),
            ha=Count("id", filter=Q(ha_enabled=True)), i=Sum("id"),
        )
    }
    from .models import VmGroup

    conf = "|".join(str(_cfg(cfg, k, "")) for k in (
        "ha.tag", "ha.failover.level", "vm.ha.enabled", "force.ha"))
    # R25: any change of a group's kind or members changes every fingerprint.
    g = VmGroup.members.through.objects.aggregate(n=Count("id"), i=Sum("id"),
                                                  v=Sum("vminstance_id"))
    conf += f"|groups:{g['n']},{g['i']},{g['v']}:" + ",".join(
        f"{i}{k[0]}" for i, k in VmGroup.objects.order_by("id").values_list("id", "kind"))
    parts: dict[str, list[str]] = {}
    for hid, cluster, status, rstate, cpus, mem, tags in Host.objects.order_by("id").values_list(
            "id", "cluster", "status", "resource_state", "cpus", "memory_mb", "tags"):
        r = per_host.get(hid)
        vm = (f"{r['n']},{r['c']},{r['m']},{r['u']},{r['ha']},{r['i']}" if r else "-")
        parts.setdefault(cluster, [conf]).append(
            f"{hid}:{status}:{rstate}:{cpus}:{mem}:{tags}:{vm}")
    return {c: hashlib.sha256("\n".join(p).encode()).hexdigest() for c, p in parts.items()}


# --- simulation (pure) -----------------------------------------------------------------------

@dataclass
class Outcome:
    """One failure scenario: where each HA VM of the failed hosts would restart."""
    failed: list[str]                      # host names
    placements: dict[str, str | None]      # vm name → target host name, None: does not fit
    unfit_ids: list[int]
    ha_vms: int

    @property
    def fits(self) -> bool:
        return not self.unfit_ids

    def summary(self) -> str:
        """"10 HA VMs → kvm-03 ×4, kvm-07 ×3, kvm-09 ×3; all fit"."""
        if not self.placements:
            return "no HA VMs to restart"
        return spread_summary(list(self.placements.values()), what="HA VM")

    def as_json(self) -> dict:
        return {"failed": self.failed, "placements": self.placements,
                "fits": self.fits, "unfit": len(self.unfit_ids), "summary": self.summary()}


def spread_summary(targets: list[str | None], *, what: str = "VM") -> str:
    """"10 VMs → kvm-03 ×4, kvm-07 ×3, kvm-09 ×3; all fit" (None: does not fit)."""
    counts: dict[str, int] = {}
    for target in targets:
        if target:
            counts[target] = counts.get(target, 0) + 1
    spread = ", ".join(f"{t} ×{n}" for t, n in
                       sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    n = len(targets)
    head = f"{n} {what}{'s' if n != 1 else ''} → {spread or 'nowhere'}"
    unfit = sum(1 for t in targets if not t)
    return f"{head}; all fit" if not unfit else f"{head}; {unfit} would not fit"


def simulate(state: ClusterState, failed_ids, *, stop_at_unfit: bool = False) -> Outcome:
    """The hosts ``failed_ids`` fail together: place their HA VMs (pure)."""
    failed_ids = frozenset(failed_ids)
    pool = state.pool().fork()
    by_host = state.ha_vms_by_host()
    vms = [v for hid in failed_ids for v in by_host.get(hid, ())]
    if len(failed_ids) > 1:
        vms.sort(key=lambda v: (v.rank, v.name))
    names = state.names()
    placements: dict[str, str | None] = {}
    unfit: list[int] = []
    where: dict[int, int | None] = {}  # R25: this scenario's placements by VM id
    grouped = state.groups
    for v in vms:
        exclude, prefer = failed_ids, frozenset()
        if grouped and v.id in grouped:
            avoid, prefer = state.group_hosts(v.id, where)
            if avoid:
                exclude = failed_ids | avoid
        room = pool.place(v.cpus, v.memory_mb, ha=True, ha_tag=state.ha_tag,
                          exclude=exclude, prefer=prefer)
        if grouped:
            where[v.id] = room.id if room else None
        placements[v.name] = room.name if room else None
        if room is None:
            unfit.append(v.id)
            if stop_at_unfit:
                break
    return Outcome(sorted(names[i] for i in failed_ids), placements, unfit, len(vms))


def what_if(state: ClusterState, host_names) -> Outcome:
    """"What if hosts X, Y fail now?" Raises ValueError naming unknown hosts."""
    ids, unknown = [], []
    for name in host_names:
        h = state.host_named(name)
        (ids.append(h.id) if h else unknown.append(name))
    if unknown:
        raise ValueError(f"not hosts of cluster {state.name}: {', '.join(unknown)}")
    return simulate(state, ids)


@dataclass
class Plan:
    cluster: str
    level: int
    capacity: int
    per_host: dict[str, dict[str, str | None]]   # host → {vm: target | None}
    unfit_ids: list[int]                          # VMs that would not fit if their host failed
    worst: dict                                   # the `level` hosts failing together
    exhaustive: bool                              # capacity from every combination
    hosts: int
    ha_vms: int
    took_ms: float = 0.0
    summaries: dict[str, str] = field(default_factory=dict)  # host → one line


def _ha_load(state: ClusterState) -> dict[int, float]:
    """Each host's share of the cluster's HA cpus or memory (the larger), computed once
    per copy (k = 2 and k = 3 both rank hosts by it)."""
    if state._ha_load is None:
        state._ha_load = _ha_load_of(state)
    return state._ha_load


def _ha_load_of(state: ClusterState) -> dict[int, float]:
    by_host = state.ha_vms_by_host()
    total_c = sum(v.cpus for lst in by_host.values() for v in lst) or 1
    total_m = sum(v.memory_mb for lst in by_host.values() for v in lst) or 1
    return {hid: max(sum(v.cpus for v in lst) / total_c, sum(v.memory_mb for v in lst) / total_m)
            for hid, lst in by_host.items()}


def _combinations(state: ClusterState, k: int):
    """Sets of k failing hosts to try, and whether that is every such set."""
    hosts = [h.id for h in state.failable()]
    if math.comb(len(hosts), k) <= COMBINATIONS:
        return itertools.combinations(hosts, k), True
    load = _ha_load(state)
    m = k
    while math.comb(m + 1, k) <= COMBINATIONS and m + 1 <= len(hosts):
        m += 1
    top = sorted(hosts, key=lambda hid: (-load.get(hid, 0.0), hid))[:m]
    return itertools.combinations(top, k), False


def compute(state: ClusterState) -> Plan:
    """The cluster's failover plan (pure: runs on the copy only)."""
    started = time.perf_counter()
    by_host = state.ha_vms_by_host()
    per_host: dict[str, dict[str, str | None]] = {}
    summaries: dict[str, str] = {}
    unfit: list[int] = []
    worst1 = None
    for h in state.failable():
        out = simulate(state, (h.id,))
        per_host[h.name] = out.placements
        summaries[h.name] = out.summary()
        unfit.extend(out.unfit_ids)
        if worst1 is None or (len(out.unfit_ids), out.ha_vms) > (len(worst1.unfit_ids),
                                                                  worst1.ha_vms):
            worst1 = out
    ha_vms = sum(len(v) for v in by_host.values())
    exhaustive = True
    failable = len(state.failable())
    if not ha_vms:
        capacity = MAX_CAPACITY
    elif unfit:
        capacity = 0
    else:
        capacity = 1
        for k in range(2, MAX_CAPACITY + 1):
            if k > failable:
                break  # every host failing: nothing is left to restart on
            combos, complete = _combinations(state, k)
            exhaustive = exhaustive and complete
            if any(not simulate(state, c, stop_at_unfit=True).fits for c in combos):
                break
            capacity = k
        if failable <= capacity:
            capacity = max(0, failable - 1)
    level = max(1, int(state.level))
    if level == 1 or worst1 is None:
        worst = worst1.as_json() if worst1 else {"failed": [], "placements": {}, "fits": True,
                                                 "unfit": 0, "summary": "no hosts"}
    else:
        combos, _ = _combinations(state, min(level, max(1, failable)))
        best = None
        for c in combos:
            out = simulate(state, c)
            if best is None or (len(out.unfit_ids), out.ha_vms) > (len(best.unfit_ids),
                                                                   best.ha_vms):
                best = out
        worst = (best or worst1).as_json()
    return Plan(state.name, state.level, capacity, per_host, sorted(set(unfit)), worst,
                exhaustive, len(state.hosts), ha_vms,
                took_ms=(time.perf_counter() - started) * 1000, summaries=summaries)


# --- maintenance preview ----------------------------------------------------------------

def preview_evacuation(host) -> list[dict]:
    """Before an operator confirms maintenance (R15): where each VM running on ``host``
    would migrate and which would not fit — ordinary placement (ha=False, R13/R24) on the
    current state, each migration seeing the ones before it. One dict per VM, in the
    order maintenance schedules them: {"vm", "vm_id", "cpus", "memory_mb", "target"
    (host name or None), "reason", "free_after"}. Reads the database, changes nothing."""
    from hadash import config

    from . import placement
    from .models import VMInstance

    cfg = config.snapshot()
    ha_tag = _cfg(cfg, "ha.tag", "")
    pool = Pool(placement.rooms_for(host.cluster, exclude=(host.pk,)))
    out = []
    moved: dict[int, int | None] = {}  # R25: this preview's earlier placements
    # As prepare-for-maintenance schedules them: every Running VM, by name (R15).
    for vm in VMInstance.objects.filter(host=host, state=VmState.RUNNING).order_by("name"):
        rule = placement.group_rule(vm, moved=moved)
        room = pool.place(vm.cpus, vm.memory_mb, ha=False, ha_tag=ha_tag,
                          exclude=frozenset(rule.avoid), prefer=rule.prefer)
        moved[vm.pk] = room.id if room else None
        c, m = room.shares_after(0, 0) if room else (None, None)
        out.append({
            "vm": vm.name, "vm_id": vm.pk, "cpus": vm.cpus, "memory_mb": vm.memory_mb,
            "target": room.name if room else None,
            "free_after": f"{round(c * 100)} % cpu / {round(m * 100)} % memory free after"
                          if room else "",
            "reason": (placement.explain(room, 0, 0) if room else
                       f"needs {vm.cpus} cpus / {vm.memory_mb} MB; no host has room"),
        })
    return out
