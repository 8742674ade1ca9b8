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
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Sum

from hosts.choices import HostStatus, ResourceState
from hosts.models import Host

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


def tag_allows(tags, *, ha: bool, ha_tag: str) -> bool:
    """R13/ha.tag: HA restarts only on tagged hosts; ordinary placement avoids them."""
    return not ha_tag or ((ha_tag in tags) == ha)


def spread_key(room: Room, cpus: int, memory_mb: int):
    """R24 order: largest free share after placement first, ties by host name."""
    return (-room.share_after(cpus, memory_mb), room.name)


def rank(rooms, cpus: int, memory_mb: int, *, ha: bool, ha_tag: str,
         exclude=()) -> list[Room]:
    """The rooms that fit a VM of this size (R13 filters on a copy: the rooms are
    already Up, Enabled and of the cluster), best first (R24)."""
    fitting = [r for r in rooms
               if r.id not in exclude and tag_allows(r.tags, ha=ha, ha_tag=ha_tag)
               and r.fits(cpus, memory_mb)]
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
             exclude=frozenset()) -> Room | None:
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
              exclude=frozenset()) -> Room | None:
        """`best`, then `take` it; returns the pool's room, the VM now counted on it."""
        room = self.best(cpus, memory_mb, ha=ha, ha_tag=ha_tag, exclude=exclude)
        if room is None:
            return None
        self.take(room, cpus, memory_mb)
        return self.changed[room.id]


# --- from the database --------------------------------------------------------------------

def allocations(host_ids=None) -> dict[int, tuple[int, int]]:
    """Allocated (cpus, memory_mb) per host id: VMs that occupy capacity there, and VMs
    migrating towards it (a Migration item under way names it as target), so that each
    migration of an evacuation sees the ones before it (R24)."""
    from hadash.choices import FINAL_STEPS, Step, WorkType
    from hadash.models import HaWork

    qs = VMInstance.objects.filter(state__in=ACTIVE_STATES, host__isnull=False)
    if host_ids is not None:
        qs = qs.filter(host_id__in=host_ids)
    rows = qs.values("host_id").annotate(c=Sum("cpus"), m=Sum("memory_mb"))
    used = {r["host_id"]: [r["c"] or 0, r["m"] or 0] for r in rows}
    moving = HaWork.objects.filter(
        type=WorkType.MIGRATION, step=Step.MIGRATING, target_host__isnull=False,
        instance__state=VmState.MIGRATING,
    ).exclude(step__in=FINAL_STEPS)
    if host_ids is not None:
        moving = moving.filter(target_host_id__in=host_ids)
    for r in moving.values("target_host_id").annotate(c=Sum("instance__cpus"),
                                                      m=Sum("instance__memory_mb")):
        u = used.setdefault(r["target_host_id"], [0, 0])
        u[0] += r["c"] or 0
        u[1] += r["m"] or 0
    return {k: (c, m) for k, (c, m) in used.items()}


def rooms_for(cluster: str | None, *, exclude=(), only=()) -> list[Room]:
    """The Up, Enabled hosts of ``cluster`` as rooms, with their allocations."""
    hosts = Host.objects.filter(status=HostStatus.UP, resource_state=ResourceState.ENABLED)
    if cluster:
        hosts = hosts.filter(cluster=cluster)
    if exclude:
        hosts = hosts.exclude(pk__in=exclude)
    if only:
        hosts = hosts.filter(pk__in=only)
    hosts = list(hosts)
    used = allocations([h.pk for h in hosts])
    rooms = []
    for h in hosts:
        c, m = used.get(h.pk, (0, 0))
        rooms.append(Room(h.pk, h.name, h.cpus, h.memory_mb, c, m, tuple(h.tag_list), h))
    return rooms


def ranked(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
           exclude: tuple[int, ...] = (), only: tuple[int, ...] = ()) -> list[Room]:
    """Rooms that fit ``vm``, best first (R13 filters, R24 order)."""
    rooms = rooms_for(cluster, exclude=exclude, only=only)
    return rank(rooms, vm.cpus, vm.memory_mb, ha=ha, ha_tag=ha_tag)


def candidates(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
               exclude: tuple[int, ...] = (), only: tuple[int, ...] = ()) -> list[Host]:
    """Hosts that fit ``vm``, best first. ``ha`` selects the HA rule for ha.tag:
    HA restarts may only land on tagged hosts; ordinary placement avoids them."""
    return [r.host for r in ranked(vm, ha=ha, ha_tag=ha_tag, cluster=cluster,
                                   exclude=exclude, only=only)]


def pick_host(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
              exclude: tuple[int, ...] = ()) -> Host | None:
    found = candidates(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)
    return found[0] if found else None


def pick_with_reason(vm: VMInstance, *, ha: bool, ha_tag: str, cluster: str | None,
                     exclude: tuple[int, ...] = ()) -> tuple[Host | None, str]:
    """The chosen host and why (R24), or (None, why none fits)."""
    found = ranked(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)
    if not found:
        return None, no_room(vm, ha=ha, ha_tag=ha_tag, cluster=cluster, exclude=exclude)
    return found[0].host, explain(found[0], vm.cpus, vm.memory_mb, fitting=len(found))


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
