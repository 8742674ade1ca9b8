"""HA work enums (SPEC §1), CloudStack's names kept verbatim."""

from django.db import models


class WorkType(models.TextChoices):
    HA = "HA"
    MIGRATION = "Migration"
    STOP = "Stop"
    CHECK_STOP = "CheckStop"
    FORCE_STOP = "ForceStop"
    DESTROY = "Destroy"


class Step(models.TextChoices):
    SCHEDULED = "Scheduled"
    INVESTIGATING = "Investigating"
    FENCING = "Fencing"
    STOPPING = "Stopping"
    RESTARTING = "Restarting"
    MIGRATING = "Migrating"
    CANCELLED = "Cancelled"
    DONE = "Done"
    ERROR = "Error"


# Terminal steps: an item in one of these is finished and never processed again.
FINAL_STEPS = (Step.CANCELLED, Step.DONE, Step.ERROR)
# R16: finished items that cleanup purges (Error items stay for operators).
PURGEABLE_STEPS = (Step.DONE, Step.CANCELLED)


class Reason(models.TextChoices):
    HOST_DOWN = "HostDown"
    HOST_DEGRADED = "HostDegraded"
    HOST_MAINTENANCE = "HostMaintenance"
    VM_POWER_OFF = "VmPowerOff"
    VM_REPORT_MISSING = "VmReportMissing"
    OPERATOR = "Operator"
    # R26 observe mode: the item ended having recorded what it would have done.
    OBSERVED = "Observed"


class Subject(models.TextChoices):
    """What an event is about."""

    HOST = "host"
    VM = "vm"
    WORK = "work"
    CONFIG = "config"
    CLUSTER = "cluster"
    ENGINE = "engine"
    INCIDENT = "incident"
    CHANNEL = "channel"


class Severity(models.TextChoices):
    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


class IncidentKind(models.TextChoices):
    """R18: what failed."""

    HOST = "host"  # a host found behind on ping
    VM = "vm"  # a VM that powered off or went missing while Running


class IncidentState(models.TextChoices):
    """R18: Open → Recovering → Resolved | Failed | Dismissed."""

    OPEN = "Open"
    RECOVERING = "Recovering"
    RESOLVED = "Resolved"
    FAILED = "Failed"
    DISMISSED = "Dismissed"  # the host came back with nothing to do


OPEN_INCIDENT_STATES = (IncidentState.OPEN, IncidentState.RECOVERING)


class VmOutcome(models.TextChoices):
    """What became of one VM of an incident."""

    PENDING = "pending"
    RESTARTED = "restarted"
    FAILED = "failed"  # HA gave up
    NOT_HA = "not-ha"  # not HA-enabled: stays Stopped
    SETTLED = "settled"  # someone else acted on it (R12.1), or it came back by itself
    OBSERVED = "observed"  # R26 observe mode: what would have been done is recorded


class AlertState(models.TextChoices):
    OPEN = "open"
    RESOLVED = "resolved"


class Transition(models.TextChoices):
    """R20: what a notification is about."""

    OPENED = "opened"
    DECLARED = "declared"
    FENCED = "fenced"
    FENCE_FAILED = "fence-failed"
    RESOLVED = "resolved"
    FAILED = "failed"
    TEST = "test"


class WaitCause(models.TextChoices):
    """R17: why an HA item (and so its VM) waits; stored on the item (HaWork.waiting)."""

    NO_CAPACITY = "no-capacity"
    BRAKED = "braked"
    BACKOFF = "backoff"
    FENCING_FAILED = "fencing-failed"
    HOST_UNREACHABLE = "host-unreachable"
    ORDER = "order"
    ANTI_AFFINITY = "anti-affinity"
    DISARMED = "disarmed"
    OBSERVED = "observed"
