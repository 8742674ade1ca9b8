"""Placement (R13 filters, R24 order).

R13: a host that is Up, resource_state Enabled, in the VM's cluster, with free cpus and
memory for the VM, honouring ha.tag. R24: among those, the one whose free share after
placement — the smaller of free cpus / cpus and free memory / memory — is largest (ties
by host name), each placement of a batch seeing the ones before it.

The decision is a pure function of a copy of the state (`Room`s): the engine's
reservation (hadash.ha.placement_guard), an operator's start, maintenance's migrations
and the failover plan (vms.failover, R22) all run `rank` / `Pool.best` on rooms; only
`rooms_for` / `candidates` read the database to build them.

Batch-awareness: in the database a placed VM occupies its target at once — an HA restart
is Starting on it, and a migration under way (its item Migrating towards a target) is
counted on that target too — so the next placement of a batch sees it. In memory
(`Pool`) every `take` is seen by the next `best`.

Groups (R25): a `GroupRule` says which hosts a VM may not go to — a member of one of
its anti-affinity groups runs there (strict) — and which it prefers — a member of one of
its affinity groups runs there (soft: among the hosts that fit, those come first).
`group_rule` reads it from the database for `ranked` / `candidates` (so HA restarts,
operator starts and maintenance migrations honour it); the failover plan builds it from
its copy (vms.failover).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.utils.dateparse import parse_datetime

from hosts.choices import HostStatus, ResourceState
from hosts.models import Host, split_tags

from .choices import ACTIVE_STATES, VmState
from .models import VMInstance

# --- the copy of the state ------------------------------------------------------------------

@dataclass(slots=True)
class Room:
    """A host as placement sees it: its capacity and what is allocated on it."""
    id: int
    name: str
    cpus: int
    memory_mb: int
    used_cpus: int = 0
    used_memory_mb: int = 0
    tags: tuple[str, ...] = ()
    host: object = None  # the Host row, when built from the database
    last_ping: object = None  # when built from the database (placement's late hosts)

    @property
    def free_cpus(self) -> int:
        return self.cpus - self.used_cpus

    @property
    def free_memory_mb(self) -> int:
        return self.memory_mb - self.used_memory_mb

    def fits(self, cpus: int, memory_mb: int) -> bool:
        return self.free_cpus >= cpus and self.free_memory_mb >= memory_mb

    def shares_after(self, cpus: int, memory_mb: int) -> tuple[float, float]:
        """(free cpu share, free memory share) once a VM of this size is placed here."""
        c = (self.free_cpus - cpus) / self.cpus if self.cpus else 0.0
        m = (self.free_memory_mb - memory_mb) / self.memory_mb if self.memory_mb else 0.0
        return c, m

    def share_after(self, cpus: int, memory_mb: int) -> float:
        return min(self.shares_after(cpus, memory_mb))

    def share_now(self) -> float:
        return self.share_after(0, 0)


@dataclass(frozen=True, slots=True)
class GroupRule:
    """What R25 asks of one VM's placement."""
    avoid: dict            # host id → (group name, member name): anti-affinity forbids it
    prefer: frozenset      # host ids running a member of one of its affinity groups

    def __bool__(self) -> bool:
        return bool(self.avoid or self.prefer)


NO_RULE = GroupRule({}, frozenset())


def build_rule(members) -> GroupRule:
    """The rule from the other members' positions: ``members`` are (group, kind,
    member name, host id) of the VM's groups' other members that occupy a host."""
    from .choices import GroupKind

    avoid: dict = {}
    prefer = set()
    for group, kind, name, host_id in members:
        if host_id is None:
            continue
        if kind == GroupKind.ANTI_AFFINITY:
            avoid.setdefault(host_id, (group, name))
        else:
            prefer.add(host_id)
    return GroupRule(avoid, frozenset(prefer)) if avoid or prefer else NO_RULE


def tag_allows(tags, *, ha: bool, ha_tag: str) -> bool:
    """R13/ha.tag: HA restarts only on tagged hosts; ordinary placement avoids them."""
    return not ha_tag or ((ha_tag in tags) == ha)


def spread_key(room: Room, cpus: int, memory_mb: int):
    """R24 order: largest free share after placement first, ties by host name."""
    return (-room.share_after(cpus, memory_mb), room.name)


def rank(rooms, cpus: int, memory_mb: int, *, ha: bool, ha_tag: str,
         exclude=(), rule: GroupRule = NO_RULE) -> list[Room]:
    """The rooms that fit a VM of this size (R13 filters on a copy: the rooms are
    already Up, Enabled and of the cluster), best first (R24). ``rule`` (R25): hosts
    it avoids are left out, hosts it prefers come first."""
    avoid, prefer = rule.avoid, rule.prefer
    fitting = [r for r in rooms
               if r.id not in exclude and r.id not in avoid
               and tag_allows(r.tags, ha=ha, ha_tag=ha_tag) and r.fits(cpus, memory_mb)]
    if prefer:
        fitting.sort(key=lambda r: (r.id not in prefer, *spread_key(r, cpus, memory_mb)))
    else:
        fitting.sort(key=lambda r: spread_key(r, cpus, memory_mb))
    return fitting


def explain(room: Room, cpus: int, memory_mb: int, *, fitting: int | None = None) -> str:
    """Why ``room`` was chosen (R24), recorded on the HA or Migration item:
    "kvm-07: most free after placement, 38 % cpu / 41 % memory free (5 hosts fit)"."""
    c, m = room.shares_after(cpus, memory_mb)
    text = (f"{room.name}: most free after placement, {round(c * 100)} % cpu / "
            f"{round(m * 100)} % memory free")
    if fitting is not None:
        text += f" ({fitting} host{'s' if fitting != 1 else ''} fit)"
    return text


class Pool:
    """A copy of one cluster's candidate hosts for a batch of placements: `best` picks
    as `rank` does (the same filters and order), `take` allocates, so each placement
    sees the ones before it. `fork` gives a scenario its own allocations over a shared
    base — the failover plan (R22) runs one scenario per failed host without copying
    the cluster.

    The base's ranking is computed once per VM size (and HA rule) and shared by every
    fork; a scenario's best host is then the first ranked base host it has not touched
    or excluded, or one it has touched (looked at separately), whichever comes first."""

    __slots__ = ("base", "by_id", "changed", "_orders")

    def __init__(self, rooms, *, _base=None):
        if _base is None:
            self.base = list(rooms)
            self.by_id = {r.id: r for r in self.base}
            self._orders: dict = {}
        else:
            self.base, self.by_id, self._orders = _base
        self.changed: dict[int, Room] = {}

    def fork(self) -> Pool:
        return Pool((), _base=(self.base, self.by_id, self._orders))

    def room(self, host_id: int) -> Room | None:
        return self.changed.get(host_id) or self.by_id.get(host_id)

    def take(self, room: Room, cpus: int, memory_mb: int) -> None:
        mine = self.changed.get(room.id)
        if mine is None:
            base = self.by_id[room.id]
            mine = Room(base.id, base.name, base.cpus, base.memory_mb, base.used_cpus,
                        base.used_memory_mb, base.tags, base.host)
            self.changed[room.id] = mine
        mine.used_cpus += cpus
        mine.used_memory_mb += memory_mb

    def release(self, host_id: int, cpus: int, memory_mb: int) -> None:
        room = self.room(host_id)
        if room is not None:
            self.take(room, -cpus, -memory_mb)

    def best(self, cpus: int, memory_mb: int, *, ha: bool, ha_tag: str,
             exclude=frozenset(), prefer=frozenset()) -> Room | None:
        """As `rank` would order them; ``exclude`` includes the hosts an anti-affinity
        group forbids, ``prefer`` the hosts an affinity group prefers (R25)."""
        if prefer:
            liked = [r for r in (self.room(h) for h in prefer if h not in exclude)
                     if r is not None and r.fits(cpus, memory_mb)
                     and tag_allows(r.tags, ha=ha, ha_tag=ha_tag)]
            if liked:
                return min(liked, key=lambda r: spread_key(r, cpus, memory_mb))
        # The same filters and order as `rank` (spread_key), written out: this is the
        # failover plan's inner loop.
        best, best_share = None, 0.0
        for room in self.changed.values():
            if room.id in exclude or (ha_tag and (ha_tag in room.tags) != ha):
                continue
            fc = room.cpus - room.used_cpus - cpus
            fm = room.memory_mb - room.used_memory_mb - memory_mb
            if fc < 0 or fm < 0:
                continue
            share = min(fc / room.cpus if room.cpus else 0.0,
                        fm / room.memory_mb if room.memory_mb else 0.0)
            if best is None or share > best_share or \
                    (share == best_share and room.name < best.name):
                best, best_share = room, share
        okey = (cpus, memory_mb, ha, ha_tag if ha_tag else "")
        order = self._orders.get(okey)
        if order is None:
            order = self._orders[okey] = rank(self.base, cpus, memory_mb, ha=ha,
                                              ha_tag=ha_tag)
        changed = self.changed
        for room in order:
            if room.id in changed or room.id in exclude:
                continue
            if best is None:
                return room
            share = room.share_after(cpus, memory_mb)
            if share > best_share or (share == best_share and room.name < best.name):
                return room
            break
        return best

    def place(self, cpus: int, memory_mb: int, *, ha: bool, ha_tag: str,
              exclude=frozenset(), prefer=frozenset()) -> Room | None:
        """`best`, then `take` it; returns the pool's room, the VM now counted on it."""
        room = self.best(cpus, memory_mb, ha=ha, ha_tag=ha_tag, exclude=exclude,
                         prefer=prefer)
        if room is None:
            return None
        self.take(room, cpus, memory_mb)
        return self.changed[room.id]


# --- from the database --------------------------------------------------------------------

# One statement for the rooms (issue 12): the hosts, what is allocated on each, and what
# migrates towards each — built by hand, not through the ORM, whose query building cost
# more CPU than the database's answer (two rankings an HA restart, ten restarts at once
# when a host fails). ``{hosts}`` is the host filter, applied inside each part so that
# only the cluster's VMs are summed.
_ROOMS_SELECT = """
SELECT h.id, h.name, h.cpus, h.memory_mb, h.tags, h.last_ping,
       COALESCE(a.c, 0), COALESCE(a.m, 0), COALESCE(g.c, 0), COALESCE(g.m, 0)
  FROM host h
"""
_ROOMS_MIGRATIONS = """
  LEFT JOIN (SELECT w.target_host_id AS hid, SUM(v.cpus) AS c, SUM(v.memory_mb) AS m
               FROM op_ha_work w JOIN vm_instance v ON v.id = w.instance_id
               JOIN host h ON h.id = w.target_host_id
              WHERE w.type = %s AND w.step = %s AND v.state = %s AND {hosts}
              GROUP BY w.target_host_id) g ON g.hid = h.id
 WHERE {hosts}
"""
_ROOMS_SQL = _ROOMS_SELECT + """
  LEFT JOIN (SELECT v.host_id AS hid, SUM(v.cpus) AS c, SUM(v.memory_mb) AS m
               FROM vm_instance v JOIN host h ON h.id = v.host_id
              WHERE v.state IN ({active}) AND {hosts}
              GROUP BY v.host_id) a ON a.hid = h.id""" + _ROOMS_MIGRATIONS
# PostgreSQL: each host's allocations summed from its own VMs (vm_host_state_idx),
# not by scanning every VM of the installation and keeping the cluster's (issue 12: a
# restart ranks its cluster twice; at 1,000 hosts / 10,000 VMs the scan was ≈ 6 of the
# query's 7 ms, and it grows with the fleet rather than the cluster).
_ROOMS_SQL_PG = _ROOMS_SELECT + """
  LEFT JOIN LATERAL (SELECT SUM(v.cpus) AS c, SUM(v.memory_mb) AS m
                       FROM vm_instance v
                      WHERE v.host_id = h.id AND v.state IN ({active})) a ON true""" \
    + _ROOMS_MIGRATIONS


def rooms_for(cluster: str | None, *, exclude=(), only=()) -> list[Room]:
    """The Up, Enabled hosts of ``cluster`` as rooms, with their allocations — VMs that
    occupy capacity there (Starting, Running, Stopping, Migrating), and VMs migrating
    towards them (a Migration item under way names it as target), so that each
    migration of an evacuation sees the ones before it (R24) — and their last ping
    (``Room.last_ping``). One query whatever the cluster's size, reading columns, not
    Host rows; ``Room.host`` is filled by `with_hosts` for the callers that want the
    rows. ``only``: just these hosts (a re-check of a few)."""
    from django.db import connection

    from hadash.choices import Step, WorkType

    where, params = ["h.status = %s", "h.resource_state = %s"], \
        [HostStatus.UP, ResourceState.ENABLED]
    if cluster:
        where.append("h.cluster = %s")
        params.append(cluster)
    if exclude:
        where.append(f"h.id NOT IN ({', '.join(['%s'] * len(exclude))})")
        params.extend(exclude)
    if only:
        where.append(f"h.id IN ({', '.join(['%s'] * len(only))})")
        params.extend(only)
    active = sorted(ACTIVE_STATES)
    pg = connection.vendor == "postgresql"
    sql = (_ROOMS_SQL_PG if pg else _ROOMS_SQL).format(
        hosts=" AND ".join(where), active=", ".join(["%s"] * len(active)))
    args = [*active, *([] if pg else params), WorkType.MIGRATION, Step.MIGRATING,
            VmState.MIGRATING, *params, *params]
    with connection.cursor() as cur:
        cur.execute(sql, args)
        rows = cur.fetchall()
    rows.sort(key=lambda r: r[1])
    return [Room(pk, name, cpus, memory_mb, int(c) + int(mc), int(m) + int(mm),
                 split_tags(tags), last_ping=_aware(last_ping))
            for pk, name, cpus, memory_mb, tags, last_ping, c, m, mc, mm in rows]


def _aware(value):
    """A timestamp read by a raw cursor: aware on PostgreSQL; on SQLite naive UTC (or
    text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = parse_datetime(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def with_hosts(rooms: list[Room]) -> list[Room]:
    """``rooms`` with their Host rows (one query)."""
    rows = Host.objects.in_bulk([r.id for r in rooms if r.host is None])
    for r in rooms:
        if r.host is None:
            r.host = rows.get(r.id)
    return [r for r in rooms if r.host is not None]


def groups_of(vm: VMInstance) -> dict[int, tuple[str, str]]:
    """``vm``'s groups: {group id: (name, kind)} (one query)."""
    from .models import VmGroup

    return {g: (n, k) for g, n, k in
            VmGroup.objects.filter(members=vm.pk).values_list("id", "name", "kind")}


def group_members(vm: VMInstance, *, moved=None,
                  groups: dict | None = None) -> list[tuple[str, str, str, int]]:
    """(group, kind, member name, host id) for every other member of ``vm``'s groups
    that occupies a host: where it runs (or starts, stops, migrates from), and the
    target of a migration under way (R25). ``moved`` ({vm id: host id}) overrides
    positions (a maintenance preview's earlier placements). ``groups``: `groups_of`,
    when the caller read them. One query when the VM is in no group (none when the
    caller passes its groups), three otherwise."""
    from hadash.choices import FINAL_STEPS, Step, WorkType
    from hadash.models import HaWork

    from .models import VmGroup

    Through = VmGroup.members.through
    if groups is None:
        groups = groups_of(vm)
    if not groups:
        return []
    rows = (Through.objects.filter(vmgroup_id__in=list(groups))
            .exclude(vminstance_id=vm.pk)
            .values_list("vmgroup_id", "vminstance_id", "vminstance__name",
                         "vminstance__state", "vminstance__host_id"))
    out, ids = [], set()
    moved = moved or {}
    for gid, vid, name, state, host_id in rows:
        name_, kind = groups[gid]
        ids.add(vid)
        if vid in moved:
            out.append((name_, kind, name, moved[vid]))
        elif state in ACTIVE_STATES and host_id is not None:
            out.append((name_, kind, name, host_id))
    targets = dict(HaWork.objects.filter(
        instance_id__in=ids, type=WorkType.MIGRATION, step=Step.MIGRATING,
        target_host__isnull=False).exclude(step__in=FINAL_STEPS)
        .values_list("instance_id", "target_host_id")) if ids else {}
    if targets:
        for gid, vid, name, _state, _host in rows:
            if vid in targets and vid not in moved:
                name_, kind = groups[gid]
                out.append((name_, kind, name, targets[vid]))
    return out


def group_rule(vm: VMInstance, *, moved=None, groups: dict | None = None) -> GroupRule:
    """``vm``'s R25 rule from the database (NO_RULE for a VM in no group; ``groups``:
    `groups_of`, when the caller read them)."""
    return build_rule(group_members(vm, moved=moved, groups=groups))


def ranked(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
           exclude: tuple[int, ...] = (), only: tuple[int, ...] = (),
           rule: GroupRule | None = None, extra=None) -> list[Room]:
    """Rooms that fit ``vm``, best first (R13 filters, R24 order), honouring its
    groups (R25; ``rule`` when the caller read it already). ``extra`` ({host name:
    (cpus, memory_mb)}) counts placements the database does not hold — an observe-mode
    batch's earlier "would restart here" (R26) — as allocated."""
    rooms = rooms_for(cluster, exclude=exclude, only=only)
    for room in rooms:
        c, m = (extra or {}).get(room.name, (0, 0))
        room.used_cpus += c
        room.used_memory_mb += m
    if rule is None:
        rule = group_rule(vm)
    return rank(rooms, vm.cpus, vm.memory_mb, ha=ha, ha_tag=ha_tag, rule=rule)


def candidates(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
               exclude: tuple[int, ...] = (), only: tuple[int, ...] = ()) -> list[Host]:
    """Hosts that fit ``vm``, best first. ``ha`` selects the HA rule for ha.tag:
    HA restarts may only land on tagged hosts; ordinary placement avoids them."""
    return [r.host for r in with_hosts(ranked(vm, ha=ha, ha_tag=ha_tag, cluster=cluster,
                                              exclude=exclude, only=only))]


def pick_host(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
              exclude: tuple[int, ...] = ()) -> Host | None:
    found = candidates(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)
    return found[0] if found else None


def pick_with_reason(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
                     exclude: tuple[int, ...] = (), extra=None,
                     moved=None) -> tuple[Host | None, str]:
    """The chosen host and why (R24), or (None, why none fits). ``extra`` and
    ``moved`` ({vm id: host id}, for its groups): placements not in the database."""
    rule = group_rule(vm, moved=moved) if moved else None
    found = ranked(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude, rule=rule,
                   extra=extra)
    if not found:
        return None, why_none(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)[1]
    best = with_hosts(found[:1])
    if not best:  # deleted meanwhile
        return None, why_none(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)[1]
    return best[0].host, explain(found[0], vm.cpus, vm.memory_mb, fitting=len(found))


def why_none(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
             exclude: tuple[int, ...] = ()) -> tuple[str, str]:
    """Why no host takes ``vm``: ("anti-affinity", "group db: every fitting host
    already runs a member (kvm-03, kvm-04)") when hosts fit but each runs a member of
    one of its anti-affinity groups (R25), else ("no-capacity", `no_room`'s words)."""
    rule = group_rule(vm)
    if rule.avoid:
        fitting = ranked(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude,
                         rule=NO_RULE)
        if fitting and all(r.id in rule.avoid for r in fitting):
            by_group: dict[str, list[str]] = {}
            for r in fitting:
                by_group.setdefault(rule.avoid[r.id][0], []).append(r.name)
            words = "; ".join(
                f"group {g}: every fitting host already runs a member ({', '.join(sorted(h))})"
                for g, h in sorted(by_group.items()))
            return "anti-affinity", words
    return "no-capacity", no_room(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)


def no_room(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
            exclude: tuple[int, ...] = ()) -> str:
    """Why no host fits: "needs 4 cpus / 8192 MB; best host kvm-07 has 2 cpus /
    16384 MB free" (R17 no-capacity words)."""
    rooms = [r for r in rooms_for(cluster, exclude=exclude)
             if tag_allows(r.tags, ha=ha, ha_tag=ha_tag)]
    need = f"needs {vm.cpus} cpus / {vm.memory_mb} MB"
    if not rooms:
        return f"{need}; no Up, Enabled host{' tagged ' + ha_tag if ha and ha_tag else ''} " \
               f"in cluster {cluster}"
    top = min(rooms, key=lambda r: (-r.share_now(), r.name))
    return f"{need}; best host {top.name} has {top.free_cpus} cpus / " \
           f"{top.free_memory_mb} MB free"
