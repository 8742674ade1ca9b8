"""What the overview shows, in a handful of aggregate queries (no per-host query):
counts of hosts by status and VMs by state, HA work in flight, open alerts (the alert
table, R19), engine health, and the fleet map (one tile per host with its VM count).

The same data feeds the page and ``summary.json``, which the overview refetches (at
most about once a second) while events arrive.
"""

from __future__ import annotations

import datetime as dt
import html
import os
import re
from collections import Counter
from urllib.parse import quote

from django.db.models import BooleanField, Count, ExpressionWrapper, Max, Q
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe

from hadash import config
from hadash.choices import AlertState, Step
from hadash.ha import runtime
from hadash.ha.work import in_flight
from hadash.models import Alert, Event, HaWork
from hosts.choices import SWEPT_STATUSES, HostStatus, ResourceState
from hosts.models import Host
from vms.choices import ACTIVE_STATES, VmState
from vms.models import VMInstance

# Host statuses always shown on the overview (others appear when a host has them).
MAIN_STATUSES = (HostStatus.UP, HostStatus.CONNECTING, HostStatus.ALERT, HostStatus.DOWN,
                 HostStatus.DISCONNECTED)
MAIN_VM_STATES = (VmState.RUNNING, VmState.STARTING, VmState.STOPPING, VmState.MIGRATING,
                  VmState.STOPPED, VmState.ERROR)
IN_FLIGHT_STEPS = (Step.SCHEDULED, Step.INVESTIGATING, Step.FENCING, Step.STOPPING,
                   Step.RESTARTING, Step.MIGRATING)
OPEN_ALERTS_SHOWN = 50


def size_class(vms: int) -> str:
    """Tile size bucket by VM count (the label carries the exact number)."""
    if vms <= 0:
        return "v0"
    if vms < 5:
        return "v1"
    if vms < 10:
        return "v2"
    if vms < 20:
        return "v3"
    return "v4"


def hosts_and_vm_counts() -> tuple[list[tuple], dict[int, int]]:
    """Every host as (id, name, cluster, status, resource_state, agent_name,
    agent_version, behind on ping now) ordered by cluster and name, and the number of
    VMs on each (VMs that occupy it: Starting … Migrating)."""
    hosts, per_host, _ = fleet()
    return hosts, per_host


def fleet(now=None, cfg=None) -> tuple[list[tuple], dict[int, int], dict[str, int]]:
    """`hosts_and_vm_counts`, and the VMs by state — the VM table read once (one
    aggregate by host and state) for both: at 100,000 VMs each pass over it counts.
    Each host's last field is whether its last ping is older than ping.interval ×
    ping.timeout at ``now`` (compared in the database: 10,000 timestamps are not worth
    reading to compare them here), None when it never pinged."""
    cutoff = behind_cutoff(now, cfg)
    hosts = list(
        Host.objects.order_by("cluster", "name")
        .annotate(ping_late=ExpressionWrapper(Q(last_ping__lt=cutoff),
                                              output_field=BooleanField()))
        .values_list("id", "name", "cluster", "status", "resource_state",
                     "agent_name", "agent_version", "ping_late")
    )
    per_host: dict[int, int] = {}
    by_state: dict[str, int] = {}
    active = set(ACTIVE_STATES)
    for host_id, state, n in (VMInstance.objects.order_by().values("host_id", "state")
                              .annotate(n=Count("id")).values_list("host_id", "state", "n")):
        by_state[state] = by_state.get(state, 0) + n
        if host_id is not None and state in active:
            per_host[host_id] = per_host.get(host_id, 0) + n
    return hosts, per_host, by_state


def behind_cutoff(now=None, cfg=None) -> dt.datetime:
    now = now or timezone.now()
    cfg = cfg or config.snapshot()
    return now - dt.timedelta(seconds=cfg["ping.interval"] * cfg["ping.timeout"])


def suspect_ids(hosts: list[tuple], now=None, cfg=None) -> set[int]:
    """R17 on the map: hosts Up or Connecting but behind on ping (ping.interval ×
    ping.timeout) — suspect or under investigation, not declared yet — so an operator
    sees a failure before its verdict. A host's last field: its last ping, or (from
    `fleet`) whether that is older than the limit already."""
    cutoff = None
    out = set()
    for h in hosts:
        if h[3] not in SWEPT_STATUSES or h[7] is None:
            continue
        if isinstance(h[7], dt.datetime):
            cutoff = cutoff or behind_cutoff(now, cfg)
            late = h[7] < cutoff
        else:
            late = h[7]
        if late:
            out.add(h[0])
    return out


def counts(alerts: bool = True, vm_counts: dict[str, int] | None = None) -> dict:
    """VMs by state (``vm_counts`` when read already), unfinished HA work by step, and
    (``alerts``) the open alerts."""
    if vm_counts is None:
        vm_counts = dict(
            VMInstance.objects.order_by().values("state").annotate(n=Count("id"))
            .values_list("state", "n")
        )
    work = dict(
        HaWork.objects.unfinished().order_by().values("step").annotate(n=Count("id"))
        .values_list("step", "n")
    )
    out = {"vms": vm_counts, "work": work}
    if alerts:
        out["alerts_open"] = Alert.objects.filter(state=AlertState.OPEN).count()  # R19
    return out


def engine_health(now=None, cfg=None) -> dict:
    """runtime.status() shaped for the page: healthy iff the sweeper lease is fresh."""
    now = now or timezone.now()
    st = runtime.status(now)
    sweeper = st["sweeper"]
    loops = st["loops"]
    return {
        "healthy": bool(sweeper["healthy"]),
        "holder": sweeper["holder"],
        "expires": sweeper["expires"].isoformat() if sweeper["expires"] else None,
        "alive_loops": st["alive_loops"],
        "target_loops": st["target_loops"],
        "loops": len(loops),
        # Issue 10 item 7: installation-wide slots (ha.workers: every loop runs that many
        # threads, but together they hold at most that many items) and the items in
        # progress now (taken, lease unexpired) — not per-loop sums.
        "workers": (cfg or config.snapshot())["ha.workers"],
        "busy": in_flight(now),
    }


def ordered_counts(counter: dict, main: tuple, all_values: list[str]) -> list[tuple[str, int]]:
    keys = list(main) + [v for v in all_values if v not in main and counter.get(v)]
    return [(k, counter.get(k, 0)) for k in keys]


def open_alert_ids() -> list[int]:
    """Ids of the open alerts (R19: rows of the alert table), newest first."""
    return list(
        Alert.objects.filter(state=AlertState.OPEN)
        .order_by("-id").values_list("id", flat=True)[:OPEN_ALERTS_SHOWN]
    )


def summary_json(hosts_version: str = "") -> dict:
    """``summary.json``: everything the overview updates in place. ``hosts`` (one row
    per host for the fleet map) is left out (null) when it is exactly what the page
    painted last — ``hosts_version``, the ``hosts_version`` of that answer — so a page
    refetching once a second while events arrive does not re-read 10,000 tiles that did
    not change (issue 12). ``host_total`` is always there."""
    cfg = config.snapshot()
    hosts, per_host, by_state = fleet(cfg=cfg)
    c = counts(alerts=False, vm_counts=by_state)
    alert_ids = open_alert_ids()
    alerts_open = (len(alert_ids) if len(alert_ids) < OPEN_ALERTS_SHOWN
                   else Alert.objects.filter(state=AlertState.OPEN).count())
    host_counts = Counter(h[3] for h in hosts)
    late = suspect_ids(hosts, cfg=cfg)
    # [id, name, cluster, status, resource state, VMs, suspect (R17)]
    rows = tuple((h[0], h[1], h[2], h[3], h[4], per_host.get(h[0], 0), h[0] in late)
                 for h in hosts)
    # Python's hash of the rows: cheap, and per process (another web process answers
    # with its own version, and so the whole list once).
    version = f"{os.getpid()}.{hash(rows) & 0xFFFFFFFFFFFF:x}"
    return {
        "time": timezone.now().isoformat(),
        "top_event": Event.objects.aggregate(m=Max("id"))["m"] or 0,
        "hosts": None if hosts_version == version else rows,
        "hosts_version": version,
        "host_total": len(rows),
        "host_counts": dict(host_counts),
        "vm_counts": c["vms"],
        "work": c["work"],
        "work_in_flight": sum(c["work"].values()),
        "alerts_open": alerts_open,
        "open_alert_ids": alert_ids,
        "engine": engine_health(cfg=cfg),
    }


def agent_of(name: str, version: str) -> str:
    """Who serves a host, for its tile's title (issue 9 part 5): " · hadash-agent 1.0"."""
    if not name:
        return ""
    return f" · {name} {version}".rstrip()


def tiles_html(hosts: list[tuple], per_host: dict[int, int],
               suspect: set[int] = frozenset()) -> SafeString:
    """The fleet map, built as one string (1,000 tiles through the template engine
    would cost more than every query of the page together; at 10,000 each tile's
    constant parts are made once per status and resource state). A ``suspect`` host
    (behind on ping, no verdict yet, R17) gets a dashed outline and says so in its
    name."""
    href = reverse("dash:host", args=["__HOST__"])
    head, tail = href.split("__HOST__", 1)
    out: list[str] = []
    cluster = None
    members: list[str] = []
    tally: Counter = Counter()
    plain = _PLAIN_NAME.fullmatch
    parts: dict[tuple, tuple[str, str, str]] = {}

    def close():
        if cluster is None:
            return
        c = _esc(cluster)
        bad = tally[HostStatus.DOWN] + tally[HostStatus.ALERT]
        out.append(
            f'<section class="cluster" data-cluster="{c}"><h3 class="cluster-head">'
            f'<span class="cluster-name">{c}</span> <span class="cluster-count" '
            f'data-cluster-count="{c}">{sum(tally.values())} hosts'
            f'{f" · {bad} Down/Alert" if bad else ""}</span></h3><div class="tiles">'
        )
        out.extend(members)
        out.append("</div></section>")

    for hid, name, cl, status, rs, agent, version, _last_ping in hosts:
        if cl != cluster:
            close()
            cluster, members, tally = cl, [], Counter()
        n = per_host.get(hid, 0)
        tally[status] += 1
        e = name if plain(name) else _esc(name)
        url = name if plain(name) else quote(name, safe="")
        late = hid in suspect
        key = (status, rs, late)
        p = parts.get(key)
        if p is None:
            # The tile's accessible name says what its colour does (issue 10 item 6).
            sus = ", suspect: behind on ping" if late else ""
            p = parts[key] = (
                f'{status}{"" if rs == ResourceState.ENABLED else ", " + rs}{sus}',
                f'{status}{"" if rs == ResourceState.ENABLED else " · " + rs}'
                f'{" · suspect (behind on ping)" if late else ""}',
                f'data-status="{status}" data-rs="{rs}" ',
            )
        said, title, data = p
        members.append(
            f'<a class="tile st-{status} rs-{rs} {size_class(n)}{" suspect" if late else ""}" '
            f'href="{head}{url}{tail}" data-host="{e}" '
            f'data-host-id="{hid}" {data}data-vms="{n}" '
            f'data-suspect="{"1" if late else ""}" aria-label="{e}: {said}, {n} VMs" '
            f'title="{e} · {title} · '
            f'{n} VMs{_esc(agent_of(agent, version)) if agent else ""}">{n}</a>'
        )
    close()
    return mark_safe("".join(out))


# Names that escaping and URL quoting leave as they are (the usual host names).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.\-]*")


def _esc(text) -> str:
    """django.utils.html.escape's text (html.escape, quotes too) without its SafeString
    wrapper — ten thousand times per overview."""
    return html.escape(str(text))


def overview(now=None) -> dict:
    now = now or timezone.now()
    cfg = config.snapshot()
    hosts, per_host, by_state = fleet(now, cfg)
    # The alerts panel counts the alerts (dashboard.alerts.panel).
    c = counts(alerts=False, vm_counts=by_state)
    host_counts = Counter(h[3] for h in hosts)
    return {
        "host_total": len(hosts),
        "host_counts": ordered_counts(host_counts, MAIN_STATUSES, HostStatus.values),
        "vm_total": sum(c["vms"].values()),
        "vm_counts": ordered_counts(c["vms"], MAIN_VM_STATES, VmState.values),
        "work_counts": [(s, c["work"].get(s, 0)) for s in IN_FLIGHT_STEPS],
        "work_in_flight": sum(c["work"].values()),
        "tiles": tiles_html(hosts, per_host, suspect_ids(hosts, now, cfg)),
        "clusters": len({h[2] for h in hosts}),
        "engine": engine_health(now, cfg),
        "maintenance_hosts": sum(1 for h in hosts if h[4] != ResourceState.ENABLED),
    }


def age_seconds(when: dt.datetime | None, now=None) -> float | None:
    if when is None:
        return None
    return ((now or timezone.now()) - when).total_seconds()
