"""Mass-failure brake (R14): while more than ha.max.hosts.down.ratio of a cluster's
hosts are Down or Alert, no VM of that cluster is started. Engagement and release
are each announced once (a conditional UPDATE on the cluster's brake row)."""

from __future__ import annotations

from collections import defaultdict

from django.db import connection, transaction
from django.db.models import Count

from hadash import alerts
from hadash.choices import FINAL_STEPS, Severity, Step, Subject, WorkType
from hadash.events import record_event
from hadash.models import ClusterBrake, HaWork
from hosts.choices import FAILED_STATUSES, HostStatus, HostType
from hosts.models import Host

WAITING = "mass-failure brake engaged"


def cluster_counts(cluster: str | None = None) -> dict[str, tuple[int, int]]:
    """(failed, total) Routing hosts per cluster (only ``cluster``'s when given)."""
    hosts = Host.objects.filter(type=HostType.ROUTING)
    if cluster is not None:
        hosts = hosts.filter(cluster=cluster)
    rows = (
        hosts.exclude(status=HostStatus.REMOVED)
        .values("cluster", "status")
        .annotate(n=Count("id"))
    )
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in rows:
        counts[r["cluster"]][1] += r["n"]
        if r["status"] in FAILED_STATUSES:
            counts[r["cluster"]][0] += r["n"]
    return {c: (f, t) for c, (f, t) in counts.items()}


def over_ratio(failed: int, total: int, cfg) -> bool:
    return total > 0 and failed / total > cfg["ha.max.hosts.down.ratio"]


def ratio_words(cluster: str, cfg) -> str:
    """R17 braked words: "3 of 5 hosts Down or Alert, limit 0.5"."""
    failed, total = cluster_counts(cluster).get(cluster, (0, 0))
    return f"{failed} of {total} hosts Down or Alert, limit {cfg['ha.max.hosts.down.ratio']}"


def is_braked(cluster: str | None, *, now, cfg) -> bool:
    if not cluster:
        return False
    # Every HA restart asks: one cluster's hosts counted with its brake's state in one
    # statement (issue 12: on a failed host's restarts' way to placement), and a write
    # only when the brake changes (the sweep's update_all normally got there first).
    failed, total, engaged = _counts_and_brake(cluster)
    braked = over_ratio(failed, total, cfg)
    if engaged is None or bool(engaged) != braked:
        _announce(cluster, braked, failed, total, now=now, cfg=cfg)
    return braked


def _counts_and_brake(cluster: str) -> tuple[int, int, bool | None]:
    """cluster_counts(cluster)[cluster] and the cluster's brake row's ``engaged``
    (None without a row), in one statement."""
    failed = ", ".join(["%s"] * len(FAILED_STATUSES))
    with connection.cursor() as cur:
        cur.execute(
            f'SELECT COUNT(*) FILTER (WHERE "status" IN ({failed})), COUNT(*), '
            f'(SELECT "engaged" FROM "{ClusterBrake._meta.db_table}" WHERE "cluster" = %s) '
            f'FROM "{Host._meta.db_table}" '
            f'WHERE "type" = %s AND "cluster" = %s AND "status" <> %s',
            [*FAILED_STATUSES, cluster, HostType.ROUTING, cluster, HostStatus.REMOVED])
        failed_n, total, engaged = cur.fetchone()
    return failed_n or 0, total or 0, engaged


def update_all(*, now, cfg) -> None:
    """Called by the monitor sweep: engage or release brakes as ratios change.
    Writes only where a cluster's brake changes."""
    counts = cluster_counts()
    engaged = set(ClusterBrake.objects.filter(engaged=True).values_list("cluster", flat=True))
    for cluster in set(counts) | engaged:
        failed, total = counts.get(cluster, (0, 0))
        braked = over_ratio(failed, total, cfg)
        if braked != (cluster in engaged):
            _announce(cluster, braked, failed, total, now=now, cfg=cfg)


def _announce(cluster: str, braked: bool, failed: int, total: int, *, now, cfg) -> None:
    with transaction.atomic():
        ClusterBrake.objects.get_or_create(cluster=cluster)
        changed = ClusterBrake.objects.filter(cluster=cluster, engaged=not braked).update(
            engaged=braked, since=now
        )
        if not changed:
            return
        ratio = cfg["ha.max.hosts.down.ratio"]
        if braked:
            text = (f"Cluster {cluster}: {failed} of {total} hosts Down or Alert "
                    f"(more than {ratio:.0%}); automatic restarts paused")
            record_event(
                Subject.CLUSTER, None, name=cluster, event="BrakeEngaged",
                severity=Severity.CRITICAL, now=now, old="released", new="engaged",
                message=text,
            )
            # R19: one alert per cluster while engaged, resolved on release.
            alerts.open_alert("BrakeEngaged", Subject.CLUSTER, cluster, now=now,
                              cluster=cluster, severity=Severity.CRITICAL,
                              title=f"Mass-failure brake engaged in cluster {cluster}",
                              message=text)
        else:
            record_event(
                Subject.CLUSTER, None, name=cluster, event="BrakeReleased", now=now,
                old="engaged", new="released",
                message=f"Cluster {cluster}: {failed} of {total} hosts Down or Alert "
                        f"(within {ratio:.0%}); automatic restarts resume",
            )
            alerts.resolve_alert("BrakeEngaged", Subject.CLUSTER, cluster, now=now,
                                 message=f"Cluster {cluster}: brake released ({failed} of "
                                         f"{total} hosts Down or Alert)")
            # R14: waiting items start as soon as the ratio is back within bounds.
            HaWork.objects.exclude(step__in=FINAL_STEPS).filter(
                type=WorkType.HA, step=Step.SCHEDULED, last_error__startswith=WAITING,
                taken__isnull=True, time_to_try__gt=now,
            ).update(time_to_try=now)
