"""Clusters' own settings (`Cluster`: the per-cluster HA mode override, R26) and computed
failover plans (R22), one row per cluster, kept current by the engine's sweep
(clusters.plans.refresh, called from Engine.cluster_checks)."""

from __future__ import annotations

from django.db import models

HA_MODE_CHOICES = [("armed", "armed"), ("observe", "observe"), ("disarmed", "disarmed")]


class ClusterQuerySet(models.QuerySet):
    def mode_overrides(self) -> dict[str, str]:
        """{cluster: ha_mode} of the clusters that override the installation's
        ha.mode (R26), one query."""
        return dict(self.exclude(ha_mode="").values_list("name", "ha_mode"))


class Cluster(models.Model):
    """A cluster's own settings. Hosts name their cluster as text (Host.cluster); a
    row exists only for a cluster with a setting of its own."""

    name = models.CharField(max_length=255, primary_key=True)
    # R26: blank = the installation's ha.mode; else armed, observe or disarmed.
    ha_mode = models.CharField(
        "HA mode", max_length=16, blank=True, default="", choices=HA_MODE_CHOICES,
        help_text="Blank: the installation's ha.mode. observe: HA records what it would "
                  "do without doing it; disarmed: no new HA work.")

    objects = ClusterQuerySet.as_manager()

    class Meta:
        db_table = "cluster"
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class FailoverPlanQuerySet(models.QuerySet):
    def unfit_vm_ids(self, clusters=None) -> set[int]:
        """Ids of the HA VMs that would not fit if their host failed, per the stored plans
        (R17 `at-risk`), of ``clusters`` (names; all when None). One query."""
        qs = self if clusters is None else self.filter(cluster__in=list(clusters))
        out: set[int] = set()
        for ids in qs.values_list("unfit", flat=True):
            out.update(int(i) for i in ids or ())
        return out

    def capacities(self) -> dict[str, int]:
        """{cluster: failover capacity} (R21's gauge, R23)."""
        return dict(self.values_list("cluster", "capacity"))


class FailoverPlan(models.Model):
    cluster = models.CharField(max_length=255, unique=True)
    computed_at = models.DateTimeField()
    # R22: largest k (0..3) such that any k hosts may fail and every HA VM still fits.
    capacity = models.PositiveSmallIntegerField(default=0)
    # ha.failover.level when computed (R22/R23).
    level = models.PositiveSmallIntegerField(default=1)
    # {host: {vm: target host | null}}: where each HA VM of each host would restart.
    plan = models.JSONField(default=dict)
    # {host: "10 HA VMs → kvm-03 ×4, kvm-07 ×3, kvm-09 ×3; all fit"}
    summaries = models.JSONField(default=dict)
    # Ids of HA VMs that would not fit if their own host failed.
    unfit = models.JSONField(default=list)
    # The `level` worst hosts failing together: {failed, placements, fits, unfit, summary}.
    worst = models.JSONField(default=dict)
    # Capacity from every combination of hosts (False: the most HA-loaded ones, k ≥ 2).
    exhaustive = models.BooleanField(default=True)
    hosts = models.PositiveIntegerField(default=0)
    ha_vms = models.PositiveIntegerField(default=0)
    took_ms = models.FloatField(default=0.0)
    # The cluster's capacity state it was computed from (vms.failover.fingerprints).
    fingerprint = models.CharField(max_length=64, blank=True)

    objects = FailoverPlanQuerySet.as_manager()

    class Meta:
        db_table = "cluster_failover_plan"
        ordering = ["cluster"]

    def __str__(self) -> str:
        return f"failover plan of {self.cluster}: capacity {self.capacity}"

    @property
    def below_level(self) -> bool:
        return self.capacity < self.level

    def as_json(self) -> dict:
        return {
            "cluster": self.cluster,
            "computed_at": self.computed_at.isoformat(),
            "capacity": self.capacity,
            "level": self.level,
            "below_level": self.below_level,
            "exhaustive": self.exhaustive,
            "hosts": self.hosts,
            "ha_vms": self.ha_vms,
            "took_ms": round(self.took_ms, 1),
            "unfit_vm_ids": self.unfit,
            "plan": self.plan,
            "summaries": self.summaries,
            "worst": self.worst,
        }
