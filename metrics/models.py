"""Durable counters for /metrics (R21): one row per (name, labels, shard), so every
process serves the same values (read from the database, never in-process counters)."""

from django.db import models


class Counter(models.Model):
    """A monotonic counter. ``labels`` is the canonical ``k=v,k=v`` string (sorted by
    key, metrics.counters.label_string); ``shard`` spreads writers of one counter over a
    few rows (by process id) so concurrent ingestion transactions do not queue on one
    row lock. /metrics sums the shards."""

    name = models.CharField(max_length=64)
    labels = models.CharField(max_length=255, blank=True, default="")
    shard = models.PositiveSmallIntegerField(default=0)
    value = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metric_counter"
        constraints = [
            models.UniqueConstraint(fields=["name", "labels", "shard"],
                                    name="metric_counter_key"),
        ]

    def __str__(self) -> str:
        return f"{self.name}{{{self.labels}}}[{self.shard}]={self.value}"
